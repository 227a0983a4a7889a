"""What the Trainer tests share: a learnable toy dataset for tiny causal LMs."""
import torch


def affine_dataset(n: int, vocab: int, seq: int, seed: int = 1):
    """Sequences of affine recurrences t <- (a·t + b) mod vocab, (a, b) per sequence: learnable from
    the context, so the loss falls fast. Items hold ``input_ids`` and ``labels`` (a copy)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        a, b, t = (int(v) for v in torch.randint(1, vocab, (3,), generator=g))
        ids = []
        for _ in range(seq):
            ids.append(t)
            t = (a * t + b) % vocab
        out.append({"input_ids": torch.tensor(ids), "labels": torch.tensor(ids)})
    return out
