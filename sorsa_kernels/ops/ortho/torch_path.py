"""The torch path of the orthonormal regularizer: matrices of one shape stacked and handled with
``bmm`` (a few launches per distinct shape; the grouping is cached by the parameters' structure).
Like the Triton path it has two phases, ``forward`` (per-matrix ‖E‖ and a state) and
``backward`` (``coef_m · dE/dM`` into ``.grad`` or as new tensors)."""
from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence

import torch


class _TorchGroup:
    def __init__(self, idx: List[int], b: bool, r: int, dtype: torch.dtype, device: torch.device, reduce_key):
        self.idx, self.b, self.dtype, self.reduce_key = idx, b, dtype, reduce_key
        # math in fp32 (exact products of bf16/fp16), float64 kept for float64 adapters
        self.ct = torch.float64 if dtype == torch.float64 else torch.float32
        self.eye = torch.eye(r, dtype=self.ct, device=device)
        self.vidx = torch.tensor(idx, device=device)


class TorchPlan:
    """Grouping of the matrices by (shape, kind, dtype, device, reduction group). It holds no
    pointers, so it is cached by that structure alone (parameters replaced in place reuse it)."""

    def __init__(self, mats: Sequence[torch.Tensor], is_b: Sequence[bool], reduce_keys: Sequence[object]):
        by: Dict[tuple, List[int]] = {}
        for i, (m, b, rk) in enumerate(zip(mats, is_b, reduce_keys)):
            by.setdefault((tuple(m.shape), bool(b), m.dtype, m.device, id(rk)), []).append(i)
        rks = {id(rk): rk for rk in reduce_keys}
        self.groups = []
        for (shape, b, dt, dev, rk), idx in by.items():
            # chunks of ~CHUNK_BYTES of fp32 operand: the stacked copy is still in cache when
            # the Gram and the gradient read it (measured 1.6x faster than whole groups on CPU)
            step = max(1, CHUNK_BYTES // (4 * shape[0] * shape[1]))
            self.groups += [_TorchGroup(idx[s:s + step], b, shape[1] if b else shape[0], dt, dev, rks[rk])
                            for s in range(0, len(idx), step)]
        self.device = mats[0].device
        self.ct = torch.float64 if any(g.ct == torch.float64 for g in self.groups) else torch.float32


_TORCH_PLANS: Dict[tuple, TorchPlan] = {}
CHUNK_BYTES = 2 << 20


def torch_plan(mats: Sequence[torch.Tensor], is_b: Sequence[bool], reduce_keys: Optional[Sequence[object]] = None) -> TorchPlan:
    reduce_keys = list(reduce_keys) if reduce_keys is not None else [None] * len(mats)
    key = tuple((m.shape, m.dtype, m.device, b, id(rk)) for m, b, rk in zip(mats, is_b, reduce_keys))
    plan = _TORCH_PLANS.get(key)
    if plan is None:
        if len(_TORCH_PLANS) >= 8:
            _TORCH_PLANS.pop(next(iter(_TORCH_PLANS)))
        plan = _TORCH_PLANS[key] = TorchPlan(mats, is_b, reduce_keys)
    return plan


GramReducer = Callable[[object, torch.Tensor], None]  # (reduce key, flat fp32 partial Grams) -> summed in place


def ortho_torch_forward(mats: Sequence[torch.Tensor], is_b: Sequence[bool],
                        reduce_keys: Optional[Sequence[object]] = None, reducer: Optional[GramReducer] = None):
    """Per-matrix ``‖E‖_F`` (fp32, shape (n,)) and the state for :func:`ortho_torch_backward`.

    Matrices with a non-None reduce key hold a shard of their long dimension: their Gram is a
    partial sum, added across the key's process group by ``reducer`` (one call per key)."""
    plan = torch_plan(mats, is_b, reduce_keys)
    with torch.no_grad():
        Xs, Gs = [], []
        for g in plan.groups:
            X = torch.stack([mats[i] for i in g.idx]).to(g.ct)  # (k, rows, cols); no second copy for fp32
            Gs.append(torch.bmm(X.mT, X) if g.b else torch.bmm(X, X.mT))
            Xs.append(X)
        keys = {id(g.reduce_key): g.reduce_key for g in plan.groups if g.reduce_key is not None}
        for kid, rk in keys.items():  # one collective per process group, over all its Grams
            sel = [G for g, G in zip(plan.groups, Gs) if id(g.reduce_key) == kid]
            flat = torch.cat([G.reshape(-1) for G in sel])
            reducer(rk, flat)
            off = 0
            for G in sel:
                G.copy_(flat[off:off + G.numel()].view_as(G))
                off += G.numel()
        norms = torch.empty(len(mats), dtype=plan.ct, device=plan.device)
        Es = []
        for g, G in zip(plan.groups, Gs):
            E = G.sub_(g.eye)
            norms.index_copy_(0, g.vidx, torch.linalg.vector_norm(E, dim=(1, 2)))
            Es.append(E)
    return norms, (plan, Xs, Es)


def ortho_torch_backward(mats: Sequence[torch.Tensor], state, coef: torch.Tensor, inplace: bool,
                         cast: bool = True, local_coef: bool = False) -> Optional[List[Optional[torch.Tensor]]]:
    """``coef[m] · (E·A or B·E)``: added into ``.grad`` of each matrix that requires grad when
    ``inplace`` (created where None, as views of the group's one output buffer), else returned
    (new tensors in the matrices' dtypes, or fp32 with ``cast=False``)."""
    plan, Xs, Es = state
    out: List[Optional[torch.Tensor]] = [None] * len(mats)
    with torch.no_grad():
        for g, X, E in zip(plan.groups, Xs, Es):
            c = coef if local_coef else coef.index_select(0, g.vidx)  # local: already the group's
            Es_ = E * c[:, None, None]
            gr = torch.bmm(X, Es_) if g.b else torch.bmm(Es_, X)
            if cast and g.dtype != g.ct:
                gr = gr.to(g.dtype)
            views = gr.unbind(0)
            if not inplace:
                for i, v in zip(g.idx, views):
                    out[i] = v
                continue
            add_to, add_from = [], []
            for i, v in zip(g.idx, views):
                p = mats[i]
                if not p.requires_grad:
                    continue
                if p.grad is None:
                    p.grad = v  # a view of this group's output buffer: no per-matrix allocation
                elif p.grad.dtype != p.dtype:
                    raise TypeError(f"adapter {i}'s .grad must have its dtype {p.dtype}, got {p.grad.dtype}")
                else:
                    add_to.append(p.grad)
                    add_from.append(v)
            if add_to:
                torch._foreach_add_(add_to, add_from)
    return None if inplace else out
