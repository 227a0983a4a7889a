"""``SORSALinear4bit`` (QSORSA): a SORSA layer whose frozen residual ``W_r`` is stored 4-bit
(bitsandbytes NF4/FP4) while ``A, S, B`` train in full precision.

The decomposition runs on the full-precision weight; only the residual is quantized, so the
principal part ``scale·B·diag(S)·A`` (the largest singular values) never loses precision. The
quantized residual is a deterministic function of the base weight and the initial adapter:
``W_r = quant(round_w(W − scale·B0·diag(S0)·A0))``, so :func:`sorsa_kernels.load_adapter` rebuilds
it bit for bit. ``quant_iters = k`` alternates "quantize the residual / re-decompose what
quantization lost" (LoftQ-style: the adapter is the top-r SVD of ``W − deq(W_r)``), keeping the
iterate with the smallest ``‖W − deq(W_r) − scale·B·diag(S)·A‖_F``.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from . import quant
from ._fingerprint import base_fingerprint
from .init import adapters_from_factors, sorsa_decompose
from .layer import _INIT_NAMES, CHECKPOINT_KEYS, SORSALinear
from .ops.linear4bit import sorsa_linear_4bit


class SORSALinear4bit(SORSALinear):
    """:class:`SORSALinear` with ``weight`` a frozen ``bitsandbytes.nn.Params4bit`` holding ``W_r``.

    Extra args: ``quant_type`` ("nf4" | "fp4"), ``quant_blocksize`` (64, as QLoRA),
    ``double_quant`` (quantize the block scales too, as QLoRA). The forward is
    :func:`sorsa_kernels.ops.linear4bit.sorsa_linear_4bit` (W_r dequantized per pass, to ``x``'s
    dtype). ``merge_weights`` is always False: folding the adapter into a 4-bit weight would
    re-quantize it; :func:`sorsa_kernels.merge_and_unload` gives dequantized merged weights.
    Build one with :func:`sorsa_kernels.apply_sorsa` (``quantize="nf4"``) or :meth:`from_sorsa`.

    The state dict holds the packed ``weight`` and its quantization statistics under
    ``weight.<key>`` (bitsandbytes' ``Linear4bit`` layout) besides ``bias`` and ``sorsa_A/S/B``.
    """

    def __init__(self, in_features: int, out_features: int, r: int = 1, alpha: Optional[float] = None,
                 dropout: float = 0.0, merge_weights: bool = False, bias: bool = False, device=None, dtype=None,
                 backend: str = "auto", quant_type: str = "nf4", quant_blocksize: int = 64,
                 double_quant: bool = True) -> None:
        if merge_weights:
            raise ValueError("merge_weights must be False for a 4-bit layer (a merge would re-quantize W_r); "
                             "use sk.merge_and_unload for dequantized merged weights")
        if isinstance(r, int) and not isinstance(r, bool) and r < 1:
            raise ValueError(f"r must be >= 1 for a 4-bit SORSA layer, got {r}")
        quant.check_quant_args(quant_type, quant_blocksize, double_quant)
        super().__init__(in_features, out_features, r, alpha, dropout, False, bias, device, dtype, backend)
        self.quant_type, self.quant_blocksize, self.double_quant = quant_type, quant_blocksize, double_quant
        self.quant_iters = 0
        #: fingerprint of the full-precision base weight (sorsa_kernels.adapters.base_fingerprint), set at
        #: init: the 4-bit layer cannot recompute it (its W_r lost the quantization error)
        self.base_fingerprint: Optional[dict] = None
        if not self.weight.is_meta:
            self.weight = quant.quantize(self.weight.detach(), quant_type, quant_blocksize, double_quant)

    # -- the 4-bit weight -------------------------------------------------------------------
    @property
    def weight_dtype(self) -> torch.dtype:
        return quant.weight_dtype(self.weight) if quant.is_params4bit(self.weight) else self.weight.dtype

    @property
    def w(self) -> torch.Tensor:
        """``W_r`` dequantized (out×in, in the dtype it was quantized from): a new tensor per call."""
        return quant.dequantize(self.weight) if quant.is_params4bit(self.weight) else self.weight

    def _set_w(self, W: torch.Tensor) -> None:
        self.weight = quant.quantize(W.detach(), self.quant_type, self.quant_blocksize, self.double_quant)

    def _apply(self, fn, recurse: bool = True):
        # Module.to(dtype) leaves the packed uint8 weight alone; what it dequantizes to follows the
        # conversion of the float tensors (model.to(torch.bfloat16) makes W_r a bf16 weight)
        out = super()._apply(fn, recurse)
        w = self._parameters.get("weight")
        if quant.is_params4bit(w) and getattr(w, "quant_state", None) is not None:
            try:
                new = fn(torch.empty((), dtype=w.quant_state.dtype, device=w.device)).dtype
            except Exception:  # e.g. an fn that only accepts parameters: nothing to follow
                new = w.quant_state.dtype
            # only to what bitsandbytes dequantizes to: after model.double() W_r stays fp32 (the op
            # casts it to x's dtype per call)
            if new in quant.DEQUANT_DTYPES and new != w.quant_state.dtype:
                w.quant_state.dtype = new
        return out

    def __setstate__(self, state) -> None:
        # pickle (torch.save(model)) rebuilds every Parameter subclass as a plain Parameter that keeps
        # the attributes: wrap the packed weight in a Params4bit again
        super().__setstate__(state)
        w = self._parameters.get("weight")
        if w is not None and not quant.is_params4bit(w) and getattr(w, "quant_state", None) is not None:
            bnb = quant.require_bnb()
            self._parameters["weight"] = bnb.nn.Params4bit(
                w.data, requires_grad=False, quant_state=w.quant_state, blocksize=self.quant_blocksize,
                compress_statistics=self.double_quant, quant_type=self.quant_type, bnb_quantized=True)

    def reset_parameters(self) -> None:
        if not quant.is_params4bit(self.weight):
            super().reset_parameters()

    def sorsa_init(self, *args, **kwargs) -> None:
        raise RuntimeError("a 4-bit layer cannot re-decompose its weight (W_r lost the quantization error): "
                           "initialise from the full-precision base with sk.apply_sorsa(..., quantize=...)")

    # -- construction -----------------------------------------------------------------------
    @classmethod
    @torch.no_grad()
    def from_sorsa(cls, layer: SORSALinear, quant_type: str = "nf4", quant_blocksize: int = 64,
                   double_quant: bool = True, quant_iters: int = 0, fingerprint: Optional[dict] = None
                   ) -> "SORSALinear4bit":
        """The 4-bit form of an initialised full-precision ``layer`` (an ``nn.Linear``-oriented
        :class:`SORSALinear`): its adapters, bias, dropout, scale and initial adapter, ``W_r``
        quantized. With ``quant_iters = k`` the adapter is re-fitted k times to what quantization
        lost (the layer's SVD method and seed); the best iterate is kept and becomes the initial
        adapter. ``fingerprint``: of the base weight (default: computed from ``layer``)."""
        if type(layer) is not SORSALinear:
            raise TypeError(f"layer must be a SORSALinear (not Conv1D-oriented or already 4-bit), got "
                            f"{type(layer).__name__}")
        if layer.r < 1 or layer.initial_adapter() is None:
            raise ValueError("layer must be an initialised SORSA layer with r >= 1 and a known initial adapter")
        quant.check_quant_args(quant_type, quant_blocksize, double_quant, quant_iters)
        mod = cls(layer.in_features, layer.out_features, r=layer.r, alpha=layer.alpha, dropout=layer.dropout,
                  bias=layer.bias is not None, device="meta", dtype=layer.weight_dtype, backend=layer.backend,
                  quant_type=quant_type, quant_blocksize=quant_blocksize, double_quant=double_quant)
        W = layer.original_weight()  # float32 (float64 for float64 weights)
        mod.base_fingerprint = fingerprint if fingerprint is not None else base_fingerprint(W)
        wdt, adt = layer.weight_dtype, layer.sorsa_A.dtype
        W_r, A, S, B = layer.residual_weight(), layer.sorsa_A.detach(), layer.sorsa_S.detach(), layer.sorsa_B.detach()
        best = None
        for it in range(quant_iters + 1):
            q = quant.quantize(W_r, quant_type, quant_blocksize, double_quant)
            lost = W - quant.dequantize(q, W.dtype)
            err = float(torch.linalg.matrix_norm(lost - layer.scale * (B.to(W.dtype) * S.to(W.dtype)) @ A.to(W.dtype)))
            if best is None or err < best[0]:
                best = (err, q, A, S, B)
            if it == quant_iters:
                break
            cfg = dict(layer.init_config or {"method": "svd"})
            method = cfg.pop("method", "svd")
            _, A1, S1, B1 = sorsa_decompose(lost, layer.r, layer.scale, wdt, adt, method=method, **cfg)
            W_r, A, S, B = adapters_from_factors(W, B1, S1, A1, layer.scale, wdt, adt)
        _, mod.weight, A, S, B = best
        dev = layer.sorsa_A.device
        mod.sorsa_A, mod.sorsa_S, mod.sorsa_B = (nn.Parameter(t.to(dev).clone(), requires_grad=p.requires_grad)
                                                for t, p in zip((A, S, B), (layer.sorsa_A, layer.sorsa_S,
                                                                            layer.sorsa_B)))
        mod._record_initial()
        if layer.bias is not None:
            mod.bias = nn.Parameter(layer.bias.detach(), requires_grad=layer.bias.requires_grad)
        mod.train(layer.training)
        mod.init_config = layer.init_config
        mod.quant_iters = quant_iters
        return mod

    def quant_config(self) -> dict:
        """The 4-bit settings (saved with the adapter; :func:`sorsa_kernels.load_adapter` reuses them)."""
        return {"type": self.quant_type, "blocksize": self.quant_blocksize, "double_quant": self.double_quant,
                "iters": self.quant_iters}

    # -- forward ----------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._adapters_disabled:
            A0, S0, B0 = self.initial_adapter()
            return sorsa_linear_4bit(x, self.weight, A0, S0, B0, self.scale, self.bias, training=False,
                                     backend=self.backend)
        return sorsa_linear_4bit(x, self.weight, self.sorsa_A, self.sorsa_S, self.sorsa_B, self.scale, self.bias,
                                 dropout_p=self.dropout, training=self.training, backend=self.backend)

    # -- state dict: bitsandbytes' Linear4bit layout ------------------------------------------
    def _save_to_state_dict(self, destination, prefix, keep_vars) -> None:
        nn.Module._save_to_state_dict(self, destination, prefix, keep_vars)
        if quant.is_params4bit(self.weight):
            for k, v in quant.packed_state(self.weight).items():
                destination[prefix + "weight." + k] = v if keep_vars else v.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs) -> None:
        wkey = prefix + "weight"
        stats = {k[len(wkey) + 1:]: v for k, v in state_dict.items() if k.startswith(wkey + ".")}
        init0 = [state_dict.get(prefix + n) for n in _INIT_NAMES]
        own = {k: v for k, v in state_dict.items()
               if not (k == wkey or k.startswith(wkey + ".") or k[len(prefix):] in CHECKPOINT_KEYS)}
        nn.Module._load_from_state_dict(self, own, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                        error_msgs)
        if wkey in missing_keys:
            missing_keys.remove(wkey)
        if prefix + MERGED in state_dict:
            error_msgs.append(f"{prefix[:-1]}: a checkpoint with merged full-precision weights cannot be loaded into "
                              f"a 4-bit layer; load the adapter with sk.load_adapter onto the base model")
            return
        if wkey not in state_dict:
            missing_keys.append(wkey)
            return
        dev = self.sorsa_A.device
        if stats:  # packed 4-bit W_r: bitsandbytes' layout
            new = quant.from_packed(state_dict[wkey], stats, dev)
            shape = quant.weight_shape(new)
        else:  # a full-precision W_r (an unquantized SORSA layer's state dict): quantize it
            new, shape = state_dict[wkey], tuple(state_dict[wkey].shape)
        if shape != (self.out_features, self.in_features):
            error_msgs.append(f"size mismatch for {wkey}: W_r of shape {shape} in the checkpoint, "
                              f"{(self.out_features, self.in_features)} in the model")
            return
        if not stats:
            new = quant.quantize(new.to(dev, self.weight_dtype), self.quant_type, self.quant_blocksize,
                                 self.double_quant)
        same = (quant.is_params4bit(self.weight) and torch.equal(new.data.to(self.weight.device), self.weight.data)
                and torch.equal(quant.dequantize(new).to(self.weight.device), self.w))
        self.weight = new
        if all(t is not None for t in init0):  # a checkpoint of this layer carries its initial adapter
            self._record_initial(*(t.to(dev, self.sorsa_A.dtype) for t in init0))
        elif not same:
            self._forget_initial()

    def extra_repr(self) -> str:
        return super().extra_repr() + f", quant={self.quant_type}/{self.quant_blocksize}"


MERGED = CHECKPOINT_KEYS[0]


@torch.no_grad()
def dequantized_linear(mod: nn.Module) -> nn.Linear:
    """A plain ``nn.Linear`` holding a bitsandbytes ``Linear4bit``'s weight dequantized (to the dtype
    it was quantized from) and its bias: what a 4-bit base is decomposed from."""
    W = quant.dequantize(mod.weight)
    out_f, in_f = W.shape
    new = nn.Linear(in_f, out_f, bias=mod.bias is not None, device="meta", dtype=W.dtype)
    new.weight = nn.Parameter(W, requires_grad=False)
    if mod.bias is not None:
        new.bias = nn.Parameter(mod.bias.detach(), requires_grad=mod.bias.requires_grad)
    new.train(mod.training)
    return new
