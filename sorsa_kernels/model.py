"""Model-level helpers: inject SORSA layers, merge/unmerge, select parameters."""
from __future__ import annotations

from typing import Dict, Iterable, List, Optional, Sequence, Union

import torch.nn as nn

from .init import DEFAULT_CHUNK_BYTES, init_layers
from .layer import SORSALinear


def _targets(target_modules) -> List[str]:
    if isinstance(target_modules, str):
        return [target_modules]
    if isinstance(target_modules, dict):  # the reference accepts a dict of names too
        target_modules = list(target_modules.values())
    if not isinstance(target_modules, (list, tuple, set)) or not all(isinstance(t, str) for t in target_modules):
        raise TypeError(f"target_modules must be a str or a list of str, got {target_modules!r}")
    if not target_modules or any(t == "" for t in target_modules):
        raise ValueError(f"target_modules must hold non-empty names, got {target_modules!r}")
    return list(target_modules)


def apply_sorsa(
    model: nn.Module,
    target_modules: Union[str, Sequence[str]],
    r: int,
    alpha: Optional[float] = None,
    dropout: float = 0.0,
    init: Optional[str] = "rsvd",
    *,
    progress: bool = False,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    **svd_kwargs,
) -> nn.Module:
    """Replace every ``nn.Linear`` whose qualified name contains one of ``target_modules``
    (sorsa 1.0.1's rule: substring match on ``named_modules`` names) by a
    :class:`SORSALinear` sharing its weight and bias, then initialise all of them with
    ``init``: "rsvd" (default: batched randomized SVD, layers grouped by shape and processed
    in chunks of ``chunk_bytes``; ``svd_kwargs`` go to :func:`sorsa_kernels.rsvd`), "svd"
    (exact, as the reference) or None (adapters stay zero). ``progress`` shows a tqdm bar.
    ``W_r`` is exact either way, so the model's output is unchanged. A linear registered under
    several names is replaced by one SORSA layer everywhere. Returns ``model`` itself.

    Raises ``ValueError`` when nothing matches.
    """
    targets = _targets(target_modules)
    matched: Dict[int, SORSALinear] = {}
    sites = []  # (parent, attribute, old module)
    for name, mod in model.named_modules(remove_duplicate=False):
        if not name or not isinstance(mod, nn.Linear) or not any(t in name for t in targets):
            continue
        parent_name, _, attr = name.rpartition(".")
        sites.append((model.get_submodule(parent_name) if parent_name else model, attr, mod))
    if not sites:
        linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
        raise ValueError(
            f"target_modules={targets!r} matched no nn.Linear in the model; "
            f"its linear layers are: {linears[:20]}{' ...' if len(linears) > 20 else ''}"
        )
    if init is None and svd_kwargs:
        raise TypeError(f"init=None takes no SVD arguments, got {sorted(svd_kwargs)}")
    for parent, attr, old in sites:
        if id(old) not in matched:
            matched[id(old)] = SORSALinear.from_linear(old, r, alpha=alpha, dropout=dropout, init=None)
        setattr(parent, attr, matched[id(old)])
    if init is not None and r > 0:
        init_layers(list(matched.values()), init, chunk_bytes=chunk_bytes, progress=progress, **svd_kwargs)
    return model


def sorsa_layers(model: nn.Module) -> Iterable[SORSALinear]:
    """Every :class:`SORSALinear` in ``model`` (once each)."""
    return (m for m in model.modules() if isinstance(m, SORSALinear))


def merge_sorsa(model: nn.Module) -> nn.Module:
    """Fold every adapter into its weight (layers with ``merge_weights``)."""
    for m in sorsa_layers(model):
        m._merge(True)
    return model


def unmerge_sorsa(model: nn.Module) -> nn.Module:
    """Undo :func:`merge_sorsa`."""
    for m in sorsa_layers(model):
        m._merge(False)
    return model


def sorsa_parameters(model: nn.Module) -> List[nn.Parameter]:
    """Parameters whose name contains ``sorsa_`` (the reference's ``get_parameters``)."""
    return [p for n, p in model.named_parameters() if "sorsa_" in n]


def mark_only_sorsa_trainable(model: nn.Module) -> nn.Module:
    """``requires_grad`` True for ``sorsa_*`` parameters, False for all others."""
    for n, p in model.named_parameters():
        p.requires_grad = "sorsa_" in n
    return model
