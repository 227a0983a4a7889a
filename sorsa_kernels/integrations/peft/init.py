"""Batched SVD init for PEFT: PiSSA's SVDs and KaSA's base-weight truncations recorded inside
:func:`fast_svd_init` and run through :func:`sorsa_kernels.init.svd_factors`, one call per
weight shape and rank."""
from __future__ import annotations

import contextlib
from collections import OrderedDict, defaultdict
from typing import Iterator, Tuple

import torch

try:
    from peft.tuners.lora import LoraLayer
except ImportError as exc:  # pragma: no cover - exercised only without peft
    raise ImportError("sorsa_kernels.integrations.peft needs the 'peft' package (pip install peft)") from exc

from ..._precision import no_tf32
from .forward import KasaLinearVariant
from ...init import INIT_METHODS, memory_budget, svd_bottom, svd_factors


def _weight_of(layer) -> torch.Tensor:
    """The base weight as ``(out, in)`` float32 (PEFT's ``transpose(weight, fan_in_fan_out)``)."""
    w = layer.get_base_layer().weight.detach().to(torch.float32)
    return w.t() if getattr(layer, "fan_in_fan_out", False) else w


class _PendingSVD:
    """PiSSA inits and KaSA truncations recorded inside :func:`fast_svd_init`, run batched."""

    def __init__(self, method: str, svd_kwargs: dict):
        self.method, self.svd_kwargs = method, svd_kwargs
        self.pissa: "OrderedDict[Tuple[int, str], tuple]" = OrderedDict()
        self.kasa: "OrderedDict[int, tuple]" = OrderedDict()

    def pending(self, layer) -> bool:
        return any(k[0] == id(layer) for k in self.pissa) or id(layer) in self.kasa

    def add_pissa(self, layer, adapter: str) -> None:
        if self.pending(layer):  # a second adapter on the same layer must see the first's residual
            self.flush()
        self.pissa[(id(layer), adapter)] = (layer, adapter)

    def add_kasa(self, layer, r: int) -> None:
        if self.pending(layer):
            self.flush()
        self.kasa[id(layer)] = (layer, r)

    def _groups(self, items, rank_of):
        groups = defaultdict(list)
        for item in items:
            layer = item[0]
            w = layer.get_base_layer().weight
            shape = tuple(w.shape[::-1]) if getattr(layer, "fan_in_fan_out", False) else tuple(w.shape)
            groups[(shape, rank_of(item), w.device)].append(item)
        return groups.items()

    @torch.no_grad()
    def flush(self) -> None:
        pissa, kasa = list(self.pissa.values()), list(self.kasa.values())
        self.pissa.clear()
        self.kasa.clear()
        # PiSSA (PEFT's pissa_init): A = sqrt(S_r/scaling)·Vh_r, B = U_r·sqrt(S_r/scaling),
        # base ← W − scaling·B·A (in fp32 from the unrounded factors, then the base dtype)
        for (_, r, _), items in self._groups(pissa, lambda it: it[0].r[it[1]]):
            W = torch.stack([_weight_of(layer) for layer, _ in items])
            U, S, Vh = svd_factors(W, r, self.method, **self.svd_kwargs)
            for j, (layer, adapter) in enumerate(items):
                sr = (S[j] / layer.scaling[adapter]).sqrt()
                A, B = sr[:, None] * Vh[j], U[j] * sr[None, :]
                lA, lB = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
                base = layer.get_base_layer().weight
                with no_tf32():
                    res = W[j] - layer.scaling[adapter] * (B @ A)
                if getattr(layer, "fan_in_fan_out", False):
                    res = res.t()
                lA.data = A.contiguous().to(lA.dtype)
                lB.data = B.contiguous().to(lB.dtype)
                base.data = res.contiguous().to(base.dtype)
        # KaSA (KasaLinearVariant._truncate_base_weight): drop the r smallest components. "svd":
        # PEFT's own exact float32 SVD, batched; else the r minor triplets from the float64 Gram
        # matrix (svd_bottom: faster and more accurate), a memory-bounded chunk at a time
        for (shape, r, dev), items in self._groups(kasa, lambda it: it[1]):
            m, n = shape
            per = 8 * (4 * m * n + 3 * min(m, n) ** 2)  # fp64 weight, product, difference, fp32 stack; Gram, eigh
            step = len(items) if self.method == "svd" else max(1, memory_budget(dev) // per)
            for c in range(0, len(items), step):
                chunk = items[c:c + step]
                W = torch.stack([_weight_of(layer) for layer, _ in chunk])
                with no_tf32():
                    if self.method == "svd":
                        keep = min(m, n) - r
                        U, S, Vh = svd_factors(W, keep, "svd")
                        T = (U * S[:, None, :]) @ Vh
                    else:
                        U, S, Vh = svd_bottom(W, r)
                        T = (W.double() - (U.double() * S.double()[:, None, :]) @ Vh.double()).float()
                for j, (layer, _) in enumerate(chunk):
                    base = layer.get_base_layer().weight
                    base.data = T[j].to(base.dtype)


@contextlib.contextmanager
def fast_svd_init(method: str = "rsvd", **svd_kwargs) -> Iterator[None]:
    """Batch the SVDs of PEFT's PiSSA init and KaSA base truncation made inside the block.

    Use around model creation only::

        with sk.integrations.peft.fast_svd_init():
            model = get_peft_model(base, LoraConfig(init_lora_weights="pissa", ...))

    Each ``pissa_init`` (``"pissa"`` and ``"pissa_niter_K"``) and each KaSA truncation is
    recorded instead of computed; on leaving the block they run grouped by weight shape and
    rank, one :func:`sorsa_kernels.init.svd_factors` call per group, with PEFT's formulas
    (PiSSA: ``A = sqrt(σ/scaling)·Vᵀ``, ``B = U·sqrt(σ/scaling)``, base ``W − scaling·B·A``;
    KaSA: base = its top ``min(m, n) − r`` components). Forward passes inside the block see
    the not-yet-initialised weights.

    ``method``: ``"rsvd"`` (default: randomized where the cost model says it is cheaper, exact
    otherwise; KaSA's truncation takes its r minor triplets from the float64 Gram matrix,
    :func:`sorsa_kernels.init.svd_bottom`: more accurate than PEFT's float32 SVD and faster),
    ``"rsvd_always"`` (the same for KaSA) or ``"svd"`` (exact float32 SVDs, batched; for KaSA
    PEFT's own computation). ``svd_kwargs`` go to
    :func:`sorsa_kernels.rsvd` (``oversample``, ``niter``, ``tol``, ``seed`` — 0 unless given —,
    ``backend``).
    ``pissa_niter_K``'s K is ignored: our defaults are far more accurate (docs/usage.md).
    """
    if method not in INIT_METHODS:
        raise ValueError(f"method must be one of {INIT_METHODS}, got {method!r}")
    if method != "svd":
        svd_kwargs.setdefault("seed", 0)  # deterministic, never the global RNG (as apply_sorsa)
    pend = _PendingSVD(method, svd_kwargs)
    orig_pissa = LoraLayer.pissa_init
    orig_trunc = KasaLinearVariant.__dict__.get("_truncate_base_weight")

    def pissa_init(self, adapter_name, init_lora_weights):
        if init_lora_weights != "pissa" and len(str(init_lora_weights).split("_niter_")) != 2:
            return orig_pissa(self, adapter_name, init_lora_weights)  # PEFT raises its own error
        if self.get_base_layer().weight.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            return orig_pissa(self, adapter_name, init_lora_weights)
        pend.add_pissa(self, adapter_name)

    def truncate(module, r):
        if getattr(module, "_lora_kasa_truncation_deferred", None):  # deferred path needs the result
            pend.flush()
            return orig_trunc.__func__(module, r)
        k = min(module.get_base_layer().weight.shape)
        if r >= k:
            raise ValueError(f"KaSA requires `r` ({r}) to be smaller than min(in_features, out_features) ({k})")
        pend.add_kasa(module, r)

    LoraLayer.pissa_init = pissa_init
    if orig_trunc is not None:
        KasaLinearVariant._truncate_base_weight = staticmethod(truncate)
    try:
        yield
        pend.flush()
    finally:
        LoraLayer.pissa_init = orig_pissa
        if orig_trunc is not None:
            KasaLinearVariant._truncate_base_weight = orig_trunc
