"""ΔΣ/ΔD of two checkpoints against one base: sk.spectral_shift (base decomposed once, one batched SVD
per shape group) vs the paper's notebook loop (a torch.linalg.svd of the base and of the tuned weight
per matrix and checkpoint), interleaved rounds on this machine.

    python benchmarks/analysis_speed.py [--layers 2] [--d 512] [--h 1376] [--rounds 5]
"""
import argparse
import statistics
import time

import torch

import sorsa_kernels as sk
from sorsa_kernels.analysis import shift_of
from sorsa_kernels.synthetic import synthetic_weights


def model(layers, d, h, seed):
    out = {}
    for i in range(layers):
        for j, (m, n) in enumerate([(d, d)] * 4 + [(h, d), (h, d), (d, h)]):
            out[f"layers.{i}.{j}.weight"] = synthetic_weights(1, m, n, seed=seed + 7 * i + j)[0]
    return out


def notebook(base, tuned_list):
    res = []
    for tuned in tuned_list:
        r = {}
        for n, W0 in base.items():
            U0, S0, V0h = torch.linalg.svd(W0.float(), full_matrices=False)
            U, S, Vh = torch.linalg.svd(tuned[n].float(), full_matrices=False)
            ds, dd = shift_of(U0[None], S0[None], V0h.mT[None], U[None], S[None], Vh.mT[None])
            r[n] = (float(ds), float(dd))
        res.append(r)
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--d", type=int, default=512)
    ap.add_argument("--h", type=int, default=1376)
    ap.add_argument("--rounds", type=int, default=5)
    a = ap.parse_args()
    base = model(a.layers, a.d, a.h, 0)
    g = torch.Generator().manual_seed(1)
    tuned = [{n: W + 0.01 * torch.randn(W.shape, generator=g) for n, W in base.items()} for _ in range(2)]
    ours = lambda: sk.spectral_shift(base, tuned)  # noqa: E731
    ref = lambda: notebook(base, tuned)  # noqa: E731
    a_res, b_res = ours(), ref()
    worst = max(abs(x[1] - y[1]) for ra, rb in zip(a_res, b_res) for x, y in zip(ra.values(), rb.values()))
    times = {"ours": [], "notebook": []}
    for _ in range(a.rounds):
        for name, fn in (("ours", ours), ("notebook", ref)):
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    ratios = [n / o for o, n in zip(times["ours"], times["notebook"])]
    print(f"{len(base)} matrices ({a.layers} Llama-shaped layers, d={a.d}, h={a.h}), 2 checkpoints, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"ours {statistics.median(times['ours']):.2f} s, notebook loop {statistics.median(times['notebook']):.2f} s: "
          f"×{statistics.median(ratios):.2f} (rounds {', '.join(f'{r:.2f}' for r in ratios)}); "
          f"max |ΔD ours − notebook| {worst:.1e}")


if __name__ == "__main__":
    main()
