"""Orthonormal regularizer: ``reg = mean_i ‖A_i·A_iᵀ − I‖_F`` over every ``A``-like matrix
(rows orthonormal, r × in: SORSA's ``sorsa_A``, PEFT's ``lora_A.weight``) and
``‖B_iᵀ·B_i − I‖_F`` over every ``B``-like matrix (columns orthonormal, out × r: ``sorsa_B``,
``lora_B.weight``); ``squared=True``: ``‖·‖_F²``.

Gradients (E symmetric): ``d‖E‖/dA = 2·E·A/‖E‖`` and ``d‖E‖/dB = 2·B·E/‖E‖``;
squared: ``4·E·A`` and ``4·B·E``. ``‖E‖ = 0`` gives a zero gradient, never NaN.

This module holds the plain-torch naive reference (:func:`calc_ortho_naive`, sorsa 1.0.1's
formula), the torch backend (matrices of one shape stacked and handled with ``bmm``: a few
launches per distinct shape, grouping cached by the parameters) and the goal-shape benchmark
case (:func:`ortho_bench_case`). Both backends expose the same two phases, ``forward``
(per-matrix ‖E‖ + state) and ``backward`` (``coef_m · dE/dM`` into ``.grad`` or as new
tensors), used by ``orthonormal_grad_`` (in place) and ``ortho_loss`` (autograd).
"""
from __future__ import annotations

from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch

OP = "orthonormal_grad"


def calc_ortho_naive(named_params: Iterable[Tuple[str, torch.Tensor]]) -> Optional[torch.Tensor]:
    """sorsa 1.0.1's ``calc_ortho`` formula, literally (differentiable, one loop step per matrix)."""
    total, den = 0.0, 0
    for name, p in named_params:
        if "sorsa_A" in name:
            total = total + torch.linalg.matrix_norm(p @ p.T - torch.eye(p.shape[0], device=p.device), "fro")
            den += 1
        elif "sorsa_B" in name:
            total = total + torch.linalg.matrix_norm(p.T @ p - torch.eye(p.shape[1], device=p.device), "fro")
            den += 1
    return total / den if den else None


def grad_coefs(norms: torch.Tensor, squared: bool, scale: Union[float, torch.Tensor]) -> torch.Tensor:
    """Per-matrix factor ``c_m`` with ``scale · d reg_m / dM = c_m · (E·A or B·E)`` (fp32, device)."""
    if squared:
        return torch.ones_like(norms) * (4.0 * scale)
    safe = torch.where(norms > 0, norms, torch.ones_like(norms))
    return torch.where(norms > 0, (2.0 * scale) / safe, torch.zeros_like(norms))


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


def ortho_value_and_grads(
    mats: Sequence[torch.Tensor], is_b: Sequence[bool], squared: bool = False
) -> Tuple[torch.Tensor, List[torch.Tensor]]:
    """Torch backend: per-matrix reg values (fp32, shape (n,)) and d reg_m/dM (fp32), batched by shape."""
    norms, state = ortho_torch_forward(mats, is_b)
    grads = ortho_torch_backward(mats, state, grad_coefs(norms, squared, 1.0), inplace=False, cast=False)
    return (norms * norms if squared else norms), grads  # type: ignore[return-value]


def ortho_torch_(mats: Sequence[torch.Tensor], is_b: Sequence[bool], squared: bool, coef) -> torch.Tensor:
    """Torch backend of the in-place step: per-matrix values (fp32, (n,)), and ``coef ·`` the
    gradient into each ``.grad``; forward and gradient run chunk by chunk while the chunk's
    stacked copy is in cache (one pass over the adapters instead of two)."""
    plan = torch_plan(mats, is_b)
    norms = torch.empty(len(mats), dtype=plan.ct, device=plan.device)
    with torch.no_grad():
        for g in plan.groups:
            X = torch.stack([mats[i] for i in g.idx]).to(g.ct)
            E = (torch.bmm(X.mT, X) if g.b else torch.bmm(X, X.mT)).sub_(g.eye)
            n = torch.linalg.vector_norm(E, dim=(1, 2))
            norms.index_copy_(0, g.vidx, n)
            ortho_torch_backward(mats, (_OnePlan(g), [X], [E]), grad_coefs(n, squared, coef), inplace=True,
                                 local_coef=True)
    return norms * norms if squared else norms


class _OnePlan:
    def __init__(self, g):
        self.groups = [g]


def ortho_bench_case(layers: int = 32, d: int = 512, h: int = 1376, r: int = 16, *, dtype: torch.dtype = torch.float32,
                     device: Union[str, torch.device] = "cpu", seed: int = 0, gamma: float = 0.5,
                     lr: float = 1.0) -> Dict[str, object]:
    """The regularizer step over a Llama-shaped model's adapters: ``layers`` × {q, k, v, o (d×d),
    gate, up (d→h), down (h→d)} with rank ``r``, i.e. ``14·layers`` adapter matrices.

    Defaults are the CPU goal shape (448 adapters of 512×512 / 512×1376, r = 16); the GPU goal
    is ``d=4096, h=11008, r=128``. Returns ``model`` (an ``nn.ModuleList`` whose modules hold
    ``sorsa_A`` / ``sorsa_B``), ``params`` and zero-argument callables, each one full step with
    grads set to None first (``set_to_none``): ``"ours"`` (``orthonormal_grad_``, backend auto),
    ``"ours[torch]"``, ``"reference"`` (sorsa 1.0.1: ``calc_ortho`` loop + autograd backward of
    ``gamma/lr · reg``), and ``nbytes``: the bytes a step must move (adapters read twice, grads
    written), for a bandwidth floor.
    """
    from ..regularizer import orthonormal_grad_
    device = torch.device(device)
    gen = torch.Generator().manual_seed(seed)
    model = torch.nn.ModuleList()
    for _ in range(layers):
        for k, n in [(d, d)] * 4 + [(d, h), (d, h), (h, d)]:
            mod = torch.nn.Module()
            mod.sorsa_A = torch.nn.Parameter((torch.randn(r, k, generator=gen) / k ** 0.5).to(device, dtype))
            mod.sorsa_B = torch.nn.Parameter((torch.randn(n, r, generator=gen) / n ** 0.5).to(device, dtype))
            model.append(mod)
    params = [p for p in model.parameters()]

    def clear():
        for p in params:
            p.grad = None

    def ours(backend="auto"):
        clear()
        return orthonormal_grad_(model, gamma, lr, backend=backend)

    def reference():
        clear()
        (gamma / lr * calc_ortho_naive(model.named_parameters())).backward()

    return {"model": model, "params": params, "ours": ours, "ours[torch]": lambda: ours("torch"),
            "reference": reference, "nbytes": sum(p.numel() * p.element_size() for p in params) * 3,
            "label": f"{layers}x7 adapters d={d} h={h} r={r} {str(dtype).replace('torch.', '')}"}
