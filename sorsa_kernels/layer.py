"""``SORSALinear``: drop-in for sorsa 1.0.1's ``sorsa.layer.Linear`` (same parameter names,
shapes and semantics), with a factored forward that never builds ``B·diag(S)·A`` per step."""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ._validate import check_dropout_p, check_float, check_rank
from .init import init_layers
from .ops.linear import sorsa_linear


class SORSALinear(nn.Module):
    """Linear layer ``y = x·W_rᵀ + scale·((drop(x)·Aᵀ)⊙S)·Bᵀ + bias``.

    Args:
        in_features, out_features: as ``nn.Linear``.
        r: adapter rank; 0 makes a plain (trainable) linear layer, as in the reference.
        alpha: ``scale = alpha / r``; ``None`` gives ``scale = 1``.
        dropout: dropout probability on the adapter branch's input (training only).
        merge_weights: whether :meth:`_merge` may fold the adapter into ``weight``.
        bias: add a bias parameter.
        backend: "auto" | "torch" | "triton" for the unmerged forward.

    Parameters ``weight`` (out, in; frozen when r > 0), ``bias``, ``sorsa_A`` (r, in),
    ``sorsa_S`` (r,), ``sorsa_B`` (out, r) match the reference, so state dicts load
    strictly in both directions. Adapters start at zero until :meth:`sorsa_init`.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        r: int = 0,
        alpha: Optional[float] = None,
        dropout: float = 0.0,
        merge_weights: bool = True,
        bias: bool = False,
        device=None,
        dtype=None,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        for name, v in (("in_features", in_features), ("out_features", out_features)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        self.in_features, self.out_features = in_features, out_features
        self.r = check_rank(r, in_features, out_features)
        self.alpha = alpha
        self.scale = 1 if alpha is None else alpha / r if r > 0 else 1
        self.dropout = check_dropout_p(dropout, "dropout")
        self.merge_weights = bool(merge_weights)
        self.merged = False
        self.backend = backend
        fk = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty((out_features, in_features), **fk))
        self.register_parameter("bias", nn.Parameter(torch.empty(out_features, **fk)) if bias else None)
        self.reset_parameters()
        if r > 0:
            self.sorsa_A = nn.Parameter(self.weight.new_zeros((r, in_features)))
            self.sorsa_S = nn.Parameter(self.weight.new_zeros(r))
            self.sorsa_B = nn.Parameter(self.weight.new_zeros((out_features, r)))
            self.weight.requires_grad = False

    def reset_parameters(self) -> None:
        """``nn.Linear``'s init for weight and bias (the reference leaves them uninitialised)."""
        if self.weight.is_meta:
            return
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1 / math.sqrt(self.in_features)
            nn.init.uniform_(self.bias, -bound, bound)

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        r: int,
        alpha: Optional[float] = None,
        dropout: float = 0.0,
        init: Optional[str] = "svd",
        **kwargs,
    ) -> "SORSALinear":
        """Wrap ``linear``'s weight and bias (shared storage; init replaces, never mutates it).

        ``init`` is an init method for :meth:`sorsa_init` or None (adapters stay zero).
        Extra ``kwargs`` go to the constructor (``merge_weights``, ``backend``) or, for
        keys it does not take, to :meth:`sorsa_init`.
        """
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        check_float("linear.weight", linear.weight)
        ctor = {k: kwargs.pop(k) for k in ("merge_weights", "backend") if k in kwargs}
        mod = cls(linear.in_features, linear.out_features, r=r, alpha=alpha, dropout=dropout,
                  bias=linear.bias is not None, device="meta", dtype=linear.weight.dtype, **ctor)
        mod.weight = nn.Parameter(linear.weight.detach(), requires_grad=r == 0)
        if linear.bias is not None:
            mod.bias = nn.Parameter(linear.bias.detach(), requires_grad=linear.bias.requires_grad)
        if r > 0:
            for name, shape in (("sorsa_A", (r, linear.in_features)), ("sorsa_S", (r,)),
                                ("sorsa_B", (linear.out_features, r))):
                setattr(mod, name, nn.Parameter(mod.weight.new_zeros(shape)))
            if init is not None:
                mod.sorsa_init(method=init, **kwargs)
        elif init is not None and kwargs:
            raise TypeError(f"unexpected arguments {sorted(kwargs)}")
        return mod

    @torch.no_grad()
    def _delta(self) -> torch.Tensor:
        """``scale·B·diag(S)·A`` in float32 (float64 for float64 params)."""
        work = torch.float64 if self.weight.dtype == torch.float64 else torch.float32
        return self.scale * (self.sorsa_B.to(work) * self.sorsa_S.to(work)) @ self.sorsa_A.to(work)

    @torch.no_grad()
    def effective_weight(self) -> torch.Tensor:
        """The weight the layer currently computes with: ``weight`` when merged, else
        ``weight + scale·B·diag(S)·A`` (float32, or float64 for float64 params)."""
        if self.merged or self.r == 0:
            return self.weight.detach()
        d = self._delta()
        return self.weight.to(d.dtype) + d

    @torch.no_grad()
    def set_decomposition(self, W_r: torch.Tensor, A: torch.Tensor, S: torch.Tensor, B: torch.Tensor) -> None:
        """Install ``W_r`` and the adapters (same Parameter objects, new data); marks unmerged."""
        self.weight.data, self.sorsa_A.data, self.sorsa_S.data, self.sorsa_B.data = W_r, A, S, B
        self.merged = False

    @torch.no_grad()
    def sorsa_init(
        self,
        weight_dtype: Optional[torch.dtype] = None,
        adapter_dtype: Optional[torch.dtype] = None,
        method: str = "svd",
        **svd_kwargs,
    ) -> None:
        """Initialise A, S, B from the SVD of the layer's current effective weight.

        The effective weight is ``weight`` (+ the current adapter product when unmerged),
        so a fresh layer decomposes its original weight, as the reference does, and calling
        this again re-decomposes instead of subtracting twice. The SVD runs in float32
        (float64 for float64 weights) even for bf16/fp16 weights — the reference means to
        but its ``.to(float32)`` is a no-op. Afterwards the layer is unmerged.

        Args:
            weight_dtype: dtype for ``weight`` (W_r); default: its current dtype.
            adapter_dtype: dtype for A, S, B; default: ``weight_dtype``.
            method: "svd" (exact, ``torch.linalg.svd``, the reference's choice) or "rsvd"
                (:func:`sorsa_kernels.rsvd`; ``svd_kwargs`` go to it: oversample, niter, tol,
                seed, backend). ``W_r`` is exact either way.
        """
        if self.r == 0:
            raise ValueError("sorsa_init needs r >= 1; this layer has r = 0 (no adapters)")
        init_layers([self], method, weight_dtype, adapter_dtype, **svd_kwargs)

    @torch.no_grad()
    def _merge(self, mode: bool) -> None:
        """Fold the adapter into ``weight`` (mode=True) or take it out again (False).

        No-op unless ``merge_weights``; sums in float32. Out of place, so a weight shared
        with the module this layer was built from is never modified.
        """
        if not self.merge_weights or mode == self.merged:
            return
        if self.r > 0:
            d = self._delta() if mode else -self._delta()
            self.weight.data = (self.weight.to(d.dtype) + d).to(self.weight.dtype)
        self.merged = bool(mode)

    def merge(self) -> None:
        """Same as ``_merge(True)``."""
        self._merge(True)

    def unmerge(self) -> None:
        """Same as ``_merge(False)``."""
        self._merge(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.r > 0 and not self.merged:
            return sorsa_linear(x, self.weight, self.sorsa_A, self.sorsa_S, self.sorsa_B, self.scale,
                                self.bias, dropout_p=self.dropout, training=self.training,
                                backend=self.backend)
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
                f"scale={self.scale}, dropout={self.dropout}, bias={self.bias is not None}, merged={self.merged}")
