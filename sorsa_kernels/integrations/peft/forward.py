"""Fused forward for PEFT LoRA / KaSA layers: :func:`accelerate` swaps the class of every servable
``lora.Linear`` (and QLoRA ``lora.Linear4bit``) for a subclass whose ``forward`` calls
:func:`sorsa_kernels.ops.linear.sorsa_linear` (:func:`sorsa_kernels.ops.linear4bit.sorsa_linear_4bit`
on a bitsandbytes 4-bit base) where that is faster than PEFT's own forward (see
:mod:`sorsa_kernels.integrations.peft`)."""
from __future__ import annotations

import sys
import warnings
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch
import torch.nn as nn

try:
    from peft.tuners.lora import LoraLayer
    from peft.tuners.lora import Linear as LoraLinear
except ImportError as exc:  # pragma: no cover - exercised only without peft
    raise ImportError("sorsa_kernels.integrations.peft needs the 'peft' package (pip install peft)") from exc
try:
    from peft.tuners.lora.variants import KasaLinearVariant
except ImportError:  # pragma: no cover - peft < 0.21 has no KaSA: LoRA / PiSSA still served

    class KasaLinearVariant:  # type: ignore[no-redef]
        """Placeholder: nothing is an instance of it."""

try:  # PEFT's QLoRA layer (LoRA on a bitsandbytes Linear4bit); absent without a usable bitsandbytes
    from peft.tuners.lora.bnb import Linear4bit as LoraLinear4bit
except Exception:  # pragma: no cover - ImportError, or whatever a broken bitsandbytes raises on import
    LoraLinear4bit = None

from ... import _backend
from ...ops.linear import OP as LINEAR_OP
from ...ops.linear import sorsa_linear
from ...ops.linear4bit import sorsa_linear_4bit
from ...quant import is_linear4bit


def _is_4bit_base(base: nn.Module) -> bool:
    """A bitsandbytes ``Linear4bit`` (or its NF4 / FP4 aliases) with bitsandbytes' own forward."""
    return is_linear4bit(base) and type(base).forward is sys.modules["bitsandbytes.nn"].Linear4bit.forward


def _compute_dtype(base: nn.Module) -> torch.dtype:
    """The dtype ``base`` computes in: its weight's, or for a 4-bit base bitsandbytes' ``compute_dtype``
    (where that is still unset, the dtype the weight was quantized from)."""
    w = base.weight
    if _is_4bit_base(base):
        return base.compute_dtype or getattr(w.quant_state, "dtype", w.dtype)
    return w.dtype


def servable_reason(layer: nn.Module, adapter: str) -> Optional[str]:
    """Why ``adapter`` of ``layer`` cannot run through the fused op (None: it can).

    Only static properties; per-call state (merged, disabled, several active adapters) is
    checked in the forward."""
    if type(layer) not in _ACCELERATED:
        return f"{type(layer).__module__}.{type(layer).__name__} is not a plain lora.Linear (or lora.Linear4bit)"
    base = layer.base_layer
    fifo = bool(getattr(layer, "fan_in_fan_out", False))
    if not fifo and _is_4bit_base(base):  # QLoRA: served through sorsa_linear_4bit
        pass
    elif type(base) is not (_CONV1D if fifo else nn.Linear):  # other quantised (bnb 8-bit, hqq, ...), nested, custom
        want = "transformers Conv1D (fan_in_fan_out=True)" if fifo else "torch.nn.Linear or bitsandbytes Linear4bit"
        return f"base layer is {type(base).__name__}, not {want}"
    if base._forward_hooks or base._forward_pre_hooks:  # e.g. accelerate's device-map hooks
        return "the base layer has forward hooks"
    variant = layer.lora_variant.get(adapter)
    if variant is not None and not isinstance(variant, KasaLinearVariant):
        return f"LoRA variant {type(variant).__name__}"
    if layer.lora_bias.get(adapter, False):
        return "lora_bias=True"
    if type(layer.lora_dropout[adapter]) not in (nn.Dropout, nn.Identity):
        return f"dropout module {type(layer.lora_dropout[adapter]).__name__}"
    return None


def _conv1d_cls():
    """transformers' GPT-2 ``Conv1D`` (weight stored in × out), or None without transformers."""
    try:
        from transformers.pytorch_utils import Conv1D
        return Conv1D
    except ImportError:  # pragma: no cover
        return None


_CONV1D = _conv1d_cls()  # peft imports transformers anyway; resolved once, not per forward

# Why backend="auto" keeps a call on PEFT's own forward: where the linear op has no fused kernel
# (CPU; CUDA without Triton; dtypes the kernels lack) it would run its torch path, which does
# PEFT's GEMMs plus a fixed per-call cost (argument checks, the custom op's dispatch and autograd
# node; on small layers more than the whole LoRA branch) and, with dropout, draws the mask twice
# (regenerated in backward instead of stored): never faster than PEFT's forward, often slower.
PEFT_PATH_REASON = ("no fused kernel for this device/dtype: PEFT's own forward is faster than the op's torch "
                    "path (per-call op overhead; with dropout the mask is drawn twice); backend='torch' "
                    "forces the op")


def fused_here(backend: str, device: torch.device, dtype: torch.dtype) -> bool:
    """Whether a call on ``device`` / ``dtype`` runs the fused op (False: PEFT's own forward).

    A forced backend (``"torch"``, ``"triton"``) always runs the op; ``"auto"`` runs it where the
    op has a fused kernel (:func:`sorsa_kernels._backend.resolve` gives other than ``"torch"``).
    On the CPU that is never (``"auto"`` does not pick the Triton interpreter), so the CPU answer
    needs no registry look-up."""
    if backend != "auto":
        return True
    if device.type == "cpu":
        return False
    return _backend.resolve(LINEAR_OP, "auto", device, dtype) != "torch"


def _bnb_set_compute_type(base: nn.Module, x: torch.Tensor) -> None:
    """What bitsandbytes' ``Linear4bit.forward`` does on its first call: fix ``compute_dtype`` from
    ``x`` (fp32 / bf16 inputs compute in their own dtype; fp16 keeps the configured one)."""
    if not getattr(base, "compute_type_is_set", True):
        base.set_compute_type(x)
        base.compute_type_is_set = True


def _bnb_cast_bias(base: nn.Module, dtype: torch.dtype) -> None:
    """What bitsandbytes' ``Linear4bit.forward`` does to a bias of another dtype than its compute
    dtype: recast it in place (the state after a fused call is that after PEFT's)."""
    if base.bias is not None and base.bias.dtype != dtype:
        base.bias.data = base.bias.data.to(dtype)


class _AcceleratedForward:
    """The fused ``forward`` shared by the accelerated PEFT layer classes (a mixin before PEFT's
    class: ``super().forward`` is PEFT's own)."""

    _sk_backend: str = "auto"

    def _sk_operands(self, x: torch.Tensor, args, kwargs):
        """The fused op's operands for this call, or None to take PEFT's path."""
        if args or kwargs or self.disable_adapters or self.merged:
            return None
        active = [a for a in self.active_adapters if a in self.lora_A]
        if len(active) != 1:
            return None
        a = active[0]
        if servable_reason(self, a) is not None:
            return None
        kasa = isinstance(self.lora_variant.get(a), KasaLinearVariant)
        if kasa and a in getattr(self, "_lora_kasa_truncation_deferred", ()):
            return None  # PEFT applies the deferred truncation on its first forward
        base = self.base_layer
        A, B = self.lora_A[a].weight, self.lora_B[a].weight
        # plain LoRA's S: made per call, never cached (a process-wide cache filled under
        # torch.inference_mode() would hand later training calls an inference tensor to save)
        S = self.lora_diag[a] if kasa else torch.ones(A.shape[0], dtype=A.dtype, device=A.device)
        autocast = torch.is_autocast_enabled(x.device.type)
        q4 = _is_4bit_base(base)
        if q4:
            # bitsandbytes computes x·deq(W)ᵀ + bias in its compute_dtype, untouched by autocast, and
            # casts back to x's dtype; the 4-bit op dequantizes to x's dtype: served where the two
            # agree, not under autocast nor before quantization (no quant_state yet)
            W = base.weight
            if autocast or W.quant_state is None:
                return None
            _bnb_set_compute_type(base, x)  # as the base layer's own first call would
            w_dtype, fn = base.compute_dtype or x.dtype, sorsa_linear_4bit
        else:
            W = base.weight.t() if self.fan_in_fan_out else base.weight  # Conv1D stores in × out: a view
            w_dtype, fn = base.weight.dtype, sorsa_linear
        # the op's dtype rule (sorsa_kernels.ops.linear); anything else goes to PEFT, which casts or raises
        if not autocast and (w_dtype != x.dtype or A.dtype not in (x.dtype, torch.float32)):
            return None
        if not (A.dtype == B.dtype == S.dtype):
            return None
        if q4:
            _bnb_cast_bias(base, x.dtype)  # as the base layer's own call would
        drop = self.lora_dropout[a]
        p = drop.p if isinstance(drop, nn.Dropout) else 0.0
        return fn, W, A, S, B, self.scaling[a], base.bias, p, drop.training

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if not fused_here(self._sk_backend, x.device, x.dtype):
            return super().forward(x, *args, **kwargs)
        ops = self._sk_operands(x, args, kwargs)
        if ops is None:
            return super().forward(x, *args, **kwargs)
        fn, weight, A, S, B, scale, bias, p, training = ops
        return fn(x, weight, A, S, B, scale, bias, dropout_p=p, training=training, backend=self._sk_backend)


class AcceleratedLoraLinear(_AcceleratedForward, LoraLinear):
    """``peft.tuners.lora.Linear`` whose single active LoRA / KaSA adapter runs through the
    fused SORSA linear op where :func:`fused_here` says so. Instances are made by
    :func:`accelerate` (class swap); everything but ``forward`` is PEFT's."""


# PEFT names its layers by class name: repr ("lora.Linear(...)"), hence get_layer_status() /
# get_model_status()'s module_type, and name checks in its tuners. The swap must not show there;
# __qualname__ stays, so pickle still finds the class and type() still tells it apart.
AcceleratedLoraLinear.__name__ = LoraLinear.__name__

# PEFT's class -> its accelerated subclass (and each accelerated class -> itself: accelerate is idempotent)
_ACCELERATED = {LoraLinear: AcceleratedLoraLinear, AcceleratedLoraLinear: AcceleratedLoraLinear}

if LoraLinear4bit is not None:

    class AcceleratedLoraLinear4bit(_AcceleratedForward, LoraLinear4bit):
        """``peft.tuners.lora.bnb.Linear4bit`` (QLoRA) whose single active LoRA adapter runs through
        :func:`sorsa_kernels.ops.linear4bit.sorsa_linear_4bit` (the base layer's 4-bit weight
        dequantized per pass) where :func:`fused_here` says so; as :class:`AcceleratedLoraLinear`."""

    AcceleratedLoraLinear4bit.__name__ = LoraLinear4bit.__name__
    _ACCELERATED.update({LoraLinear4bit: AcceleratedLoraLinear4bit,
                         AcceleratedLoraLinear4bit: AcceleratedLoraLinear4bit})
else:  # pragma: no cover
    AcceleratedLoraLinear4bit = None

# accelerated class -> PEFT's (unaccelerate)
_PEFT_CLASS = {acc: peft_cls for peft_cls, acc in _ACCELERATED.items() if acc is not peft_cls}


@dataclass
class AccelerateReport:
    """What :func:`accelerate` did and where each layer runs now.

    Attributes:
        accelerated: LoRA layers taken over (class swapped); each call runs the fused op or PEFT's
            own forward, re-decided per call by the input's device (a model moved to CUDA after
            :func:`accelerate` runs fused there).
        fused: of ``accelerated``, those that run the fused op on their weight's current device.
        peft_path: of ``accelerated``, those that run PEFT's own forward there, with why
            (:func:`fused_here`: ``backend="auto"`` where the op has no fused kernel).
        skipped: LoRA layers left on PEFT's path for good (cannot be served), with why.
    """

    accelerated: List[str] = field(default_factory=list)
    skipped: Dict[str, str] = field(default_factory=dict)
    fused: List[str] = field(default_factory=list)
    peft_path: Dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        lines = [f"{len(self.accelerated)} PEFT LoRA layers taken over: {len(self.fused)} run the fused op, "
                 f"{len(self.peft_path)} PEFT's own forward (faster on their device); "
                 f"{len(self.skipped)} left on PEFT's path"]
        by_reason: Dict[str, List[str]] = {}
        for name, why in self.peft_path.items():
            by_reason.setdefault(why, []).append(name)
        lines += [f"  PEFT's forward, {len(names)} layers ({why}): {', '.join(names[:3])}"
                  f"{', ...' if len(names) > 3 else ''}" for why, names in by_reason.items()]
        lines += [f"  {name}: {why}" for name, why in self.skipped.items()]
        return "\n".join(lines)


def accelerate(model: nn.Module, *, backend: str = "auto", warn: bool = True) -> AccelerateReport:
    """Run the adapter branch of a PEFT model's ``lora.Linear`` layers through the fused op.

    Served: plain LoRA (any init: default, gaussian, PiSSA, OLoRA, ...), rsLoRA, KaSA, on
    ``nn.Linear`` or (``fan_in_fan_out``) transformers ``Conv1D`` bases, and QLoRA: PEFT's
    ``lora.Linear4bit`` (or a ``lora.Linear``) on a bitsandbytes ``Linear4bit`` base (NF4 / FP4),
    through :func:`sorsa_kernels.ops.linear4bit.sorsa_linear_4bit` (per call, where bitsandbytes'
    ``compute_dtype`` is the input's dtype and autocast is off; else PEFT's forward); with or
    without ``lora_dropout`` (one mask per module call on the adapter branch's input, as PEFT);
    one active adapter per call. Left on PEFT's path (listed in the returned report and, when
    ``warn``, in one warning): other layer types (Embedding, Conv, other quantised or hooked base
    layers), DoRA and other variants, ``lora_bias``; layers with several
    active adapters are listed too and fall back per call. Idempotent; undo with
    :func:`unaccelerate`.

    Where it is not faster, a taken-over layer runs PEFT's own forward: with ``backend="auto"``,
    calls on a device where the op has no fused kernel (the CPU, CUDA without Triton) take PEFT's
    path, decided per call by the input's device (:func:`fused_here`); the report's ``fused`` /
    ``peft_path`` say where each layer runs on its current device. ``"torch"`` and ``"triton"``
    force the op.

    Args:
        model: a ``PeftModel`` (or any module containing PEFT LoRA layers).
        backend: ``"auto"`` | ``"torch"`` | ``"triton"`` (the op's backend; ``"auto"`` also picks
            between the op and PEFT's forward, as above).
        warn: emit one ``UserWarning`` listing the layers left on PEFT's path for good.

    Returns:
        An :class:`AccelerateReport`.
    """
    if backend not in ("auto", "torch", "triton"):
        raise ValueError(f"backend must be one of ('auto', 'torch', 'triton'), got {backend!r}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module (a PeftModel), got {type(model).__name__}")
    report = AccelerateReport()
    serve = []
    for name, mod in model.named_modules():
        if not isinstance(mod, LoraLayer):
            continue
        adapters = list(mod.lora_A.keys()) or list(getattr(mod, "lora_embedding_A", {}).keys())
        reasons = {a: servable_reason(mod, a) for a in adapters}
        if any(why is None for why in reasons.values()):
            serve.append(mod)
            report.accelerated.append(name)
        bad = [f"{a}: {why}" for a, why in reasons.items() if why is not None]
        n_active = sum(a in mod.lora_A for a in mod.active_adapters)
        if n_active > 1:
            bad.append(f"{n_active} active adapters (served only while one is active)")
        if bad or not adapters:
            report.skipped[name] = "; ".join(bad) or "no adapters"
    # a forced backend that cannot run on the layers' devices fails now (nothing changed yet)
    for dev in {m.base_layer.weight.device for m in serve}:
        _backend.resolve(LINEAR_OP, backend, dev)
    for name, mod in zip(report.accelerated, serve):
        mod.__class__ = _ACCELERATED[type(mod)]
        mod._sk_backend = backend
        w = mod.base_layer.weight
        if fused_here(backend, w.device, _compute_dtype(mod.base_layer)):
            report.fused.append(name)
        else:
            report.peft_path[name] = f"{w.device.type}, backend={backend!r}: {PEFT_PATH_REASON}"
    if warn and report.skipped:
        warnings.warn(f"sorsa_kernels.integrations.peft.accelerate: {report}", UserWarning, stacklevel=2)
    return report


def unaccelerate(model: nn.Module) -> nn.Module:
    """Undo :func:`accelerate`: every accelerated layer gets PEFT's class (``lora.Linear``,
    ``lora.Linear4bit``) back."""
    for mod in model.modules():
        peft_cls = _PEFT_CLASS.get(type(mod))
        if peft_cls is not None:
            mod.__class__ = peft_cls
            mod.__dict__.pop("_sk_backend", None)
    return model


