"""``SORSALinear``: drop-in for sorsa 1.0.1's ``sorsa.layer.Linear`` (same parameter names,
shapes and semantics), with a factored forward that never builds ``B·diag(S)·A`` per step.
``SORSAConv1D``: the same layer over a transformers ``Conv1D`` (GPT-2 family: weight stored in×out)."""
from __future__ import annotations

import inspect
import math
import warnings
from typing import List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ._validate import check_dropout_p, check_float, check_rank
from ._zero3 import full_shape, is_partitioned
from .init import INIT_METHODS, init_layers
from .ops.linear import sorsa_linear
from .ops.rsvd import check_options as check_rsvd_options, rsvd

_INIT_NAMES = ("sorsa_A0", "sorsa_S0", "sorsa_B0")
#: in a transformers checkpoint (:mod:`sorsa_kernels.checkpoints`): ``weight`` holds the merged weight
MERGED_KEY = "sorsa_merged"
#: state-dict keys only checkpoints carry (the layer's own state dict stays sorsa 1.0.1's)
CHECKPOINT_KEYS = (MERGED_KEY,) + _INIT_NAMES


def check_alpha(alpha: Optional[float]) -> Optional[float]:
    """``alpha`` must be None or a finite real; 0 is allowed but makes the adapter inert (warns)."""
    if alpha is None:
        return None
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        raise TypeError(f"alpha must be a real number or None, got {alpha!r}")
    alpha = float(alpha)
    if not math.isfinite(alpha):
        raise ValueError(f"alpha must be finite (scale = alpha / r), got {alpha}")
    if alpha == 0.0:
        warnings.warn("alpha = 0 makes scale = 0: the adapters have no effect and get no gradient",
                      UserWarning, stacklevel=3)
    return alpha


_RSVD_KWARGS = tuple(p for p in inspect.signature(rsvd).parameters if p not in ("W", "rank"))


_PEFT_NAMES = {"lora_alpha": "alpha", "lora_dropout": "dropout", "rank": "r", "lora_r": "r",
               "target_modules": "target_modules (the second positional argument)",
               # QLoRA's / bitsandbytes' names for the 4-bit residual's options
               "load_in_4bit": "quantize='nf4'", "bnb_4bit_quant_type": "quantize", "quant_type": "quantize",
               "bnb_4bit_use_double_quant": "double_quant", "compress_statistics": "double_quant",
               "blocksize": "quant_blocksize", "bnb_4bit_blocksize": "quant_blocksize"}


def _check_init_args(init: Optional[str], svd_kwargs: dict) -> None:
    """``init`` is None or an init method; only the randomized methods take (rsvd's) keywords."""
    # PEFT's / sorsa 1.0.1's names for our arguments: say which one was meant
    renamed = {k: _PEFT_NAMES[k] for k in svd_kwargs if k in _PEFT_NAMES}
    if renamed:
        raise TypeError("unexpected keyword argument(s) " + ", ".join(f"{k!r} (did you mean {v!r}?)"
                                                                      for k, v in renamed.items()))
    if init is None:
        if svd_kwargs:
            raise TypeError(f"init=None takes no SVD arguments, got {sorted(svd_kwargs)}")
        return
    if init not in INIT_METHODS:
        raise ValueError(f"init must be one of {INIT_METHODS} or None, got {init!r}")
    allowed = () if init == "svd" else _RSVD_KWARGS
    unknown = sorted(set(svd_kwargs) - set(allowed))
    if unknown:
        raise TypeError(f"init={init!r} takes {'the keywords ' + str(list(allowed)) if allowed else 'no extra arguments'}; "
                        f"unknown: {unknown}")
    check_rsvd_options(**svd_kwargs)  # values too: a group may take the exact SVD and never use them


def is_conv1d(module: nn.Module) -> bool:
    """transformers' ``Conv1D`` (GPT-2 family), recognised by name so transformers stays optional."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and hasattr(module, "nx")


class SORSALinear(nn.Module):
    """Linear layer ``y = x·W_rᵀ + scale·((drop(x)·Aᵀ)⊙S)·Bᵀ + bias``.

    Args:
        in_features, out_features: as ``nn.Linear``.
        r: adapter rank; 0 makes a plain (trainable) linear layer, as in the reference.
        alpha: ``scale = alpha / r``; ``None`` gives ``scale = 1``. Must be finite; 0 warns.
        dropout: dropout probability on the adapter branch's input (training only).
        merge_weights: whether :meth:`_merge` may fold the adapter into ``weight``.
        bias: add a bias parameter.
        backend: "auto" | "torch" | "triton" for the unmerged forward.

    Parameters ``weight`` (out, in; frozen when r > 0), ``bias``, ``sorsa_A`` (r, in),
    ``sorsa_S`` (r,), ``sorsa_B`` (out, r) match the reference, so state dicts load
    strictly in both directions. Adapters start at zero until :meth:`sorsa_init`.

    The state dict always holds the *unmerged* form (``weight`` = W_r), whatever the merge
    state, so a checkpoint of a merged layer reloads to the same outputs; loading into a
    merged layer keeps it merged. The initial adapter (A0, S0, B0 of the last init; zero for
    a layer never initialised) is kept in non-persistent buffers (one more adapter-sized copy,
    not in the state dict, so strict loads with the reference still work): it defines the original
    weight ``W = W_r + scale·B0·diag(S0)·A0`` used by :func:`sorsa_kernels.disable_adapters`,
    :func:`sorsa_kernels.save_adapter` and :func:`sorsa_kernels.export_lora`. It becomes
    unknown (None) when a state dict replaces ``weight`` with different values.
    """

    #: weight stored in×out (transformers ``Conv1D``) instead of out×in
    fan_in_fan_out = False

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
        self.alpha = check_alpha(alpha)
        self.scale = 1 if alpha is None else self.alpha / r if r > 0 else 1
        self.dropout = check_dropout_p(dropout, "dropout")
        self.merge_weights = bool(merge_weights)
        self.merged = False
        self.backend = backend
        self._adapters_disabled = False
        self._warned_merged = False
        #: how the adapters were initialised (method, seed, SVD settings); saved with the adapter
        self.init_config: Optional[dict] = None
        fk = {"device": device, "dtype": dtype}
        shape = (in_features, out_features) if self.fan_in_fan_out else (out_features, in_features)
        self.weight = nn.Parameter(torch.empty(shape, **fk))
        self.register_parameter("bias", nn.Parameter(torch.empty(out_features, **fk)) if bias else None)
        self.reset_parameters()
        if r > 0:
            self.sorsa_A = nn.Parameter(self.weight.new_zeros((r, in_features)))
            self.sorsa_S = nn.Parameter(self.weight.new_zeros(r))
            self.sorsa_B = nn.Parameter(self.weight.new_zeros((out_features, r)))
            self.weight.requires_grad = False
            self._record_initial()
            self._fresh = True  # adapters never set: an init decomposes the weight alone

    def reset_parameters(self) -> None:
        """``nn.Linear``'s init for weight and bias (the reference leaves them uninitialised)."""
        if self.weight.is_meta:
            return
        nn.init.kaiming_uniform_(self.w, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1 / math.sqrt(self.in_features)
            nn.init.uniform_(self.bias, -bound, bound)

    @property
    def weight_dtype(self) -> torch.dtype:
        """The dtype of ``W_r`` as a matrix (a 4-bit layer's: the dtype it dequantizes to)."""
        return self.weight.dtype

    # -- orientation: everything below works on the out×in view ``w`` ---------------------
    @property
    def w(self) -> torch.Tensor:
        """``weight`` as out×in (a transposed view for ``fan_in_fan_out`` layers)."""
        return self.weight.T if self.fan_in_fan_out else self.weight

    def _set_w(self, W: torch.Tensor) -> None:
        """Replace ``weight``'s data (same Parameter object) by the out×in matrix ``W``."""
        self.weight.data = W.T.contiguous() if self.fan_in_fan_out else W

    # -- construction ---------------------------------------------------------------------
    @classmethod
    def from_linear(
        cls,
        linear: nn.Module,
        r: int,
        alpha: Optional[float] = None,
        dropout: float = 0.0,
        init: Optional[str] = "svd",
        **kwargs,
    ) -> "SORSALinear":
        """Wrap ``linear``'s weight and bias (shared storage; init replaces, never mutates it).

        ``linear`` is an ``nn.Linear`` (or, for :class:`SORSAConv1D`, a transformers ``Conv1D``).
        ``init`` is an init method for :meth:`sorsa_init` or None (adapters stay zero).
        Extra ``kwargs`` go to the constructor (``merge_weights``, ``backend``) or, for
        keys it does not take, to :meth:`sorsa_init`.
        """
        if cls.fan_in_fan_out:
            if not is_conv1d(linear):
                raise TypeError(f"linear must be a transformers Conv1D, got {type(linear).__name__}")
            in_f, out_f = full_shape(linear.weight)  # a ZeRO-3 weight's local data is empty
        else:
            if not isinstance(linear, nn.Linear):
                raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
            in_f, out_f = linear.in_features, linear.out_features
        check_float("linear.weight", linear.weight)
        ctor = {k: kwargs.pop(k) for k in ("merge_weights", "backend") if k in kwargs}
        mod = cls(in_f, out_f, r=r, alpha=alpha, dropout=dropout, bias=linear.bias is not None,
                  device="meta", dtype=linear.weight.dtype, **ctor)
        mod.weight = nn.Parameter(linear.weight.detach(), requires_grad=r == 0)
        if linear.bias is not None:
            mod.bias = nn.Parameter(linear.bias.detach(), requires_grad=linear.bias.requires_grad)
        mod.train(linear.training)  # a layer swapped into an eval-mode model must not apply dropout
        if r > 0:
            for name, shape in (("sorsa_A", (r, in_f)), ("sorsa_S", (r,)), ("sorsa_B", (out_f, r))):
                setattr(mod, name, nn.Parameter(mod.weight.new_zeros(shape)))
            mod._record_initial()
            if init is not None:
                mod.sorsa_init(method=init, **kwargs)
        elif init is not None and kwargs:
            raise TypeError(f"unexpected arguments {sorted(kwargs)}")
        return mod

    # -- the initial adapter --------------------------------------------------------------
    @torch.no_grad()
    def _record_initial(self, A=None, S=None, B=None) -> None:
        """Keep (clones of) the initial adapter; default: the current adapters. Given ones (a
        loaded adapter) make the layer no longer fresh."""
        if A is not None:
            self._fresh = False
        for name, t in zip(_INIT_NAMES, (A, S, B) if A is not None else
                           (self.sorsa_A, self.sorsa_S, self.sorsa_B)):
            self.register_buffer(name, t.detach().clone(), persistent=False)

    def _forget_initial(self) -> None:
        for name in _INIT_NAMES:
            self.register_buffer(name, None, persistent=False)

    def initial_adapter(self) -> Optional[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """``(A0, S0, B0)`` of the last init, or None when unknown."""
        if self.r == 0 or getattr(self, "sorsa_A0", None) is None:
            return None
        return self.sorsa_A0, self.sorsa_S0, self.sorsa_B0

    # -- weights --------------------------------------------------------------------------
    @staticmethod
    def _work(dtype: torch.dtype) -> torch.dtype:
        return torch.float64 if dtype == torch.float64 else torch.float32

    @torch.no_grad()
    def _delta(self, A=None, S=None, B=None) -> torch.Tensor:
        """``scale·B·diag(S)·A`` (default: the current adapters) in float32 (float64 for float64
        params), out×in."""
        A, S, B = (self.sorsa_A, self.sorsa_S, self.sorsa_B) if A is None else (A, S, B)
        work = self._work(self.weight_dtype)
        return self.scale * (B.to(work) * S.to(work)) @ A.to(work)

    @torch.no_grad()
    def residual_weight(self) -> torch.Tensor:
        """``W_r`` (out×in, weight dtype) whatever the merge state."""
        if not self.merged or self.r == 0:
            return self.w.detach()
        d = self._delta()
        return (self.w.to(d.dtype) - d).to(self.weight_dtype)

    @torch.no_grad()
    def effective_weight(self) -> torch.Tensor:
        """The weight the layer currently computes with (out×in): ``weight`` when merged, else
        ``weight + scale·B·diag(S)·A`` (float32, or float64 for float64 params)."""
        if self.merged or self.r == 0:
            return self.w.detach()
        d = self._delta()
        return self.w.to(d.dtype) + d

    @torch.no_grad()
    def init_weight(self) -> torch.Tensor:
        """The weight an init decomposes: the effective weight, or ``weight`` alone while the
        adapters were never set (a layer made with ``init=None``: after ``to_empty`` its adapters
        hold garbage)."""
        return self.w.detach() if getattr(self, "_fresh", False) else self.effective_weight()

    @torch.no_grad()
    def original_weight(self) -> torch.Tensor:
        """The weight before fine-tuning, ``W_r + scale·B0·diag(S0)·A0`` (out×in, float32 or
        float64); raises when the initial adapter is unknown."""
        init = self.initial_adapter()
        if init is None:
            raise RuntimeError(
                "this layer's initial adapter is unknown (its weight was loaded from a state dict); "
                "use sk.load_adapter, or re-initialise, to know the original weight")
        d = self._delta(*init)
        return self.residual_weight().to(d.dtype) + d

    @torch.no_grad()
    def set_decomposition(self, W_r: torch.Tensor, A: torch.Tensor, S: torch.Tensor, B: torch.Tensor) -> None:
        """Install ``W_r`` (out×in) and the adapters (same Parameter objects, new data) and record
        them as the initial adapter; marks unmerged."""
        self._set_w(W_r)
        self.sorsa_A.data, self.sorsa_S.data, self.sorsa_B.data = A, S, B
        self._record_initial()
        self._fresh = False
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
                seed, backend; ``seed`` defaults to 0, never the global RNG). ``W_r`` is exact
                either way.
        """
        if self.r == 0:
            raise ValueError("sorsa_init needs r >= 1; this layer has r = 0 (no adapters)")
        if method not in INIT_METHODS:
            raise ValueError(f"method must be one of {INIT_METHODS}, got {method!r}")
        _check_init_args(method, svd_kwargs)
        if method != "svd":
            svd_kwargs.setdefault("seed", 0)
        init_layers([self], method, weight_dtype, adapter_dtype, **svd_kwargs)
        self.init_config = {"method": method, **svd_kwargs}

    # -- merge ------------------------------------------------------------------------------
    @torch.no_grad()
    def _merge(self, mode: bool) -> None:
        """Fold the adapter into ``weight`` (mode=True) or take it out again (False).

        No-op unless ``merge_weights``; sums in float32. Out of place, so a weight shared
        with the module this layer was built from is never modified.
        """
        if not self.merge_weights or mode == self.merged:
            return
        if any(is_partitioned(p) for p in (self.weight, self.sorsa_A, self.sorsa_S, self.sorsa_B)):
            # a partitioned weight is an empty placeholder outside the forward: folding into it
            # would silently drop the adapter
            raise ValueError("cannot merge/unmerge a SORSA layer whose parameters are DeepSpeed ZeRO-3 partitions; "
                             "save the adapters (sk.save_adapter(engine.module, path)), load them into a plain model "
                             "(sk.load_adapter) and merge there")
        if self.r > 0:
            d = self._delta() if mode else -self._delta()
            self._set_w((self.w.to(d.dtype) + d).to(self.weight_dtype))
        self.merged = bool(mode)
        self._warned_merged = False

    def merge(self) -> None:
        """Same as ``_merge(True)``."""
        self._merge(True)

    def unmerge(self) -> None:
        """Same as ``_merge(False)``."""
        self._merge(False)

    # -- state dict: always the unmerged form -------------------------------------------------
    def _save_to_state_dict(self, destination, prefix, keep_vars) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.merged and self.r > 0:
            W_r = self.residual_weight()
            destination[prefix + "weight"] = W_r.T.contiguous() if self.fan_in_fan_out else W_r

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs) -> None:
        was_merged = self.merged
        if was_merged and self.r > 0:
            self._merge(False)
        ckpt = any(prefix + n in state_dict for n in CHECKPOINT_KEYS)
        pending = self.__dict__.get("_sorsa_pending")
        if pending is not None and pending.get("unmarked") and not ckpt and prefix + "weight" in state_dict:
            del self.__dict__["_sorsa_pending"]  # another plain weight: the earlier one was no shard
            pending = None
        if self.r > 0 and (ckpt or pending is not None):
            self._load_checkpoint_form(state_dict, prefix, local_metadata, missing_keys, unexpected_keys,
                                       error_msgs)
        else:
            new_w = state_dict.get(prefix + "weight")
            # the state dict holds W_r: the initial adapter still applies only if W_r is unchanged
            same_w = (isinstance(new_w, torch.Tensor) and new_w.shape == self.weight.shape
                      and not self.weight.is_meta and not new_w.is_meta
                      and torch.equal(new_w.to(self.weight.device, self.weight.dtype), self.weight))
            super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                          unexpected_keys, error_msgs)
            seen = {n for n in ("sorsa_A", "sorsa_S", "sorsa_B") if prefix + n in state_dict}
            if seen:
                self._fresh = False  # the adapters now hold loaded values
            if self.r > 0 and new_w is None and seen:  # adapters alone: maybe a shard of a checkpoint
                self.__dict__.setdefault("_sorsa_seen", set()).update(seen)
            if self.r > 0 and new_w is not None and not same_w:
                self._forget_initial()
                if len(seen) < 3:  # a weight without its adapters: maybe a shard of a checkpoint
                    self._sorsa_pending = {"unmarked": True, "got": seen}  # whose marker comes later
        if was_merged:
            self._merge(True)

    @torch.no_grad()
    def _load_checkpoint_form(self, state_dict, prefix, local_metadata, missing_keys, unexpected_keys,
                              error_msgs) -> None:
        """Load a layer written by :mod:`sorsa_kernels.checkpoints` (transformers checkpoints):
        ``weight`` is the merged ``W_r + scale·B·diag(S)·A`` when ``sorsa_merged`` is present (so
        stock ``from_pretrained`` gets the tuned model), absent in adapter-only files; the initial
        adapter ``sorsa_A0/S0/B0`` comes along. A sharded checkpoint may split a layer's keys over
        files loaded in any order: the pieces are collected here until the layer is complete.
        ``W_r`` is kept bit for bit when this layer was initialised like the saved one (same
        initial adapter: a resume), else recovered from the merged weight (one rounding)."""
        pend = self.__dict__.pop("_sorsa_pending", None) or {"got": set()}
        self._fresh = False
        pend.update({n: state_dict[prefix + n] for n in CHECKPOINT_KEYS if prefix + n in state_dict})
        if prefix + "weight" in state_dict:
            pend["weight"] = state_dict[prefix + "weight"]
        own = {k: v for k, v in state_dict.items() if k[len(prefix):] not in CHECKPOINT_KEYS + ("weight",)}
        super()._load_from_state_dict(own, prefix, local_metadata, True, missing_keys, unexpected_keys,
                                      error_msgs)
        if prefix + "weight" in missing_keys:
            missing_keys.remove(prefix + "weight")  # present (merged), elsewhere, or not part of the form
        pend["got"] |= {n for n in ("sorsa_A", "sorsa_S", "sorsa_B") if prefix + n in state_dict}
        pend["got"] |= self.__dict__.pop("_sorsa_seen", set())  # adapters an earlier shard brought alone
        merged_form = MERGED_KEY in pend
        have_weight = "weight" in pend or pend.get("unmarked")
        if len(pend["got"]) < 3 or (merged_form and not have_weight) or (pend.get("unmarked") and not merged_form):
            self._sorsa_pending = pend  # the rest of this layer is in another shard
            return
        init0 = tuple(pend.get(n) for n in _INIT_NAMES)
        init0 = None if any(t is None for t in init0) else init0
        cur0 = self.initial_adapter()
        same_init = (init0 is not None and cur0 is not None and not self.weight.is_meta and all(
            c.shape == t.shape and torch.equal(c, t.to(c.device, c.dtype)) for c, t in zip(cur0, init0)))
        name = prefix[:-1] or type(self).__name__
        if merged_form:
            # the weight came in this load, or earlier alone and went in as W_r (its initial adapter forgotten)
            merged = pend["weight"] if "weight" in pend else self.weight.detach().clone()
            if tuple(merged.shape) != tuple(self.weight.shape):
                error_msgs.append(f"size mismatch for {prefix}weight: {tuple(merged.shape)} in the checkpoint, "
                                  f"{tuple(self.weight.shape)} in the model")
                return
            d = self._delta()
            W = merged.to(self.weight.device, d.dtype)
            W = W.T if self.fan_in_fan_out else W
            if same_init:  # a resume: W_r is this layer's own; the merged weight must agree with it
                u = max(torch.finfo(merged.dtype).eps, torch.finfo(self.weight.dtype).eps)
                err = float((W - (self.w.to(d.dtype) + d)).abs().max()) if W.numel() else 0.0
                if not err <= 2 * u * float(W.abs().max()) + 1e-30:
                    error_msgs.append(f"{name}: the checkpoint's merged weight differs from this layer's W_r + "
                                      f"adapter by {err:.3g} although both started from the same initial "
                                      f"adapter: the checkpoint was trained from other base weights")
                return
            self._set_w((W - d).to(self.weight.dtype))
            if init0 is not None:
                self._record_initial(*(t.to(self.sorsa_A.device, self.sorsa_A.dtype) for t in init0))
            else:
                self._forget_initial()
            # one message for all layers: the warnings filter shows it once per process
            warnings.warn("SORSA layers' W_r recovered from a checkpoint's merged weights (equal to the trained "
                          "model within one rounding of the weight dtype); for a bit-exact resume, build the "
                          "model with apply_sorsa on the same base and settings before loading",
                          UserWarning, stacklevel=4)
        elif init0 is not None and not same_init:
            why = ("this layer's initial adapter is unknown" if cur0 is None
                   else "this layer was initialised differently (other base weights, rank or init settings)")
            error_msgs.append(f"{name}: an adapter-only checkpoint, but {why}: its W_r would not be the one the "
                              f"adapters were trained with; build the model with apply_sorsa on the same base "
                              f"and settings, or use sk.load_adapter on the base model")

    # -- forward ----------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.r == 0:
            return F.linear(x, self.w, self.bias)
        if self._adapters_disabled:  # the original model: W_r + the initial adapter, no dropout
            A0, S0, B0 = self.initial_adapter()
            return sorsa_linear(x, self.w, A0, S0, B0, self.scale, self.bias, training=False,
                                backend=self.backend)
        if not self.merged:
            return sorsa_linear(x, self.w, self.sorsa_A, self.sorsa_S, self.sorsa_B, self.scale,
                                self.bias, dropout_p=self.dropout, training=self.training,
                                backend=self.backend)
        if not self._warned_merged and self.training and torch.is_grad_enabled() and (
                self.sorsa_A.requires_grad or self.sorsa_S.requires_grad or self.sorsa_B.requires_grad):
            # a merged forward never touches A, S, B: training would silently leave them unchanged.
            # A warning (once per merge), not an error: inference without .eval() is common and fine.
            self._warned_merged = True
            warnings.warn("SORSA layer is merged, so its adapters get no gradient: call "
                          "sk.unmerge_sorsa(model) before training (for inference use model.eval() or "
                          "torch.no_grad() to silence this)", UserWarning, stacklevel=4)
        return F.linear(x, self.w, self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
                f"scale={self.scale}, dropout={self.dropout}, bias={self.bias is not None}, merged={self.merged}")


class SORSAConv1D(SORSALinear):
    """:class:`SORSALinear` over a transformers ``Conv1D`` (GPT-2 family), whose ``weight`` is
    stored in×out: same parameter layout as the ``Conv1D`` it replaces (so the base model's
    checkpoint keys and shapes are unchanged), computing exactly ``x·weight + bias`` at init.
    Adapters have the usual shapes: ``sorsa_A`` (r, in), ``sorsa_B`` (out, r)."""

    fan_in_fan_out = True

    @classmethod
    def from_conv1d(cls, conv: nn.Module, r: int, alpha: Optional[float] = None, dropout: float = 0.0,
                    init: Optional[str] = "svd", **kwargs) -> "SORSAConv1D":
        """Same as :meth:`SORSALinear.from_linear` for a transformers ``Conv1D``."""
        return cls.from_linear(conv, r, alpha=alpha, dropout=dropout, init=init, **kwargs)


def named_sorsa_layers(model: nn.Module) -> List[Tuple[str, SORSALinear]]:
    """``(name, layer)`` for every SORSA layer with r ≥ 1 (each once, under its first name)."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, SORSALinear) and m.r > 0]
