"""PEFT integration: fused forward for PEFT LoRA / KaSA layers, batched SVD init, regularizer.

PEFT's ``lora.Linear`` computes ``base_layer(x) + scaling·lora_B(lora_A(dropout(x)))`` and, for
KaSA (``LoraConfig(kasa_config=KasaConfig())``), ``base_layer(x) + scaling·lora_B(lora_A(dropout(x))
⊙ lora_diag)``: both are our op ``x·Wᵀ + bias + scale·((drop(x)·Aᵀ)⊙S)·Bᵀ`` with ``W, bias`` the
base layer's, ``A = lora_A.weight``, ``B = lora_B.weight``, ``S = lora_diag`` (KaSA) or a constant,
non-trainable vector of ones (LoRA; PiSSA and OLoRA only change the init, not the forward).

* :func:`accelerate` swaps the class of every servable ``lora.Linear`` for a subclass whose
  ``forward`` calls :func:`sorsa_kernels.ops.linear.sorsa_linear`; parameters, state dict,
  ``save_pretrained`` / ``PeftModel.from_pretrained``, merge/unmerge, ``disable_adapter`` and
  ``set_adapter`` are PEFT's own. Each call re-checks the layer's state and falls back to PEFT's
  forward when it cannot be served *now* (adapters disabled or merged, several active adapters,
  mixed-batch ``adapter_names``, a pending KaSA truncation, unsupported dtypes).
  :func:`unaccelerate` restores the original class.
* :func:`fast_svd_init` batches PEFT's PiSSA SVDs (``init_lora_weights="pissa"`` /
  ``"pissa_niter_K"``) and KaSA's base-weight truncation SVDs through
  :func:`sorsa_kernels.init.svd_factors` (one call per weight shape and rank).
* :func:`ortho_loss`, :func:`orthonormal_grad_` (SORSA's regularizer) and :func:`kasa_loss`
  (KaSA's ``β·Σ lora_diag² + γ·Σ (‖BᵀB−I‖_F + ‖AAᵀ−I‖_F)``, equal to PEFT's
  ``LoraModel._get_kasa_loss``) on PEFT parameters through the fused regularizer.
"""
from __future__ import annotations

import contextlib
import warnings
from collections import OrderedDict, defaultdict
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional, Sequence, Tuple, Union

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

from .. import _backend
from ..init import INIT_METHODS, svd_factors
from ..ops.linear import OP as LINEAR_OP
from ..ops.linear import sorsa_linear
from ..rsvd import no_tf32

__all__ = ["accelerate", "unaccelerate", "AccelerateReport", "fast_svd_init", "ortho_loss",
           "orthonormal_grad_", "kasa_loss", "servable_reason", "export_lora"]


# ---------------------------------------------------------------- which layers we can serve

def servable_reason(layer: nn.Module, adapter: str) -> Optional[str]:
    """Why ``adapter`` of ``layer`` cannot run through the fused op (None: it can).

    Only static properties; per-call state (merged, disabled, several active adapters) is
    checked in the forward."""
    if type(layer) not in (LoraLinear, AcceleratedLoraLinear):
        return f"{type(layer).__module__}.{type(layer).__name__} is not a plain lora.Linear"
    base = layer.base_layer
    fifo = bool(getattr(layer, "fan_in_fan_out", False))
    if type(base) is not (_CONV1D if fifo else nn.Linear):  # quantised (bnb, hqq, ...), nested, custom
        want = "transformers Conv1D (fan_in_fan_out=True)" if fifo else "torch.nn.Linear"
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
_ONES: Dict[Tuple[int, torch.dtype, torch.device], torch.Tensor] = {}


def _ones(r: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The constant S of plain LoRA (never trainable, never in a state dict); cached."""
    key = (r, dtype, device)
    t = _ONES.get(key)
    if t is None:
        t = _ONES[key] = torch.ones(r, dtype=dtype, device=device)
    return t


class AcceleratedLoraLinear(LoraLinear):
    """``peft.tuners.lora.Linear`` whose single active LoRA / KaSA adapter runs through the
    fused SORSA linear op. Instances are made by :func:`accelerate` (class swap); everything
    but ``forward`` is PEFT's."""

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
        S = self.lora_diag[a] if kasa else _ones(A.shape[0], A.dtype, A.device)
        autocast = torch.is_autocast_enabled(x.device.type)
        # the op's dtype rule (ops/linear.py); anything else goes to PEFT, which casts or raises
        if not autocast and (base.weight.dtype != x.dtype or A.dtype not in (x.dtype, torch.float32)):
            return None
        if not (A.dtype == B.dtype == S.dtype):
            return None
        drop = self.lora_dropout[a]
        p = drop.p if isinstance(drop, nn.Dropout) else 0.0
        W = base.weight.t() if self.fan_in_fan_out else base.weight  # Conv1D stores in × out: a view
        return W, A, S, B, self.scaling[a], base.bias, p, drop.training

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        ops = self._sk_operands(x, args, kwargs)
        if ops is None:
            return super().forward(x, *args, **kwargs)
        weight, A, S, B, scale, bias, p, training = ops
        return sorsa_linear(x, weight, A, S, B, scale, bias, dropout_p=p, training=training,
                            backend=self._sk_backend)


@dataclass
class AccelerateReport:
    """What :func:`accelerate` did: module names served by the fused op, and the LoRA layers
    left on PEFT's path with the reason."""

    accelerated: List[str] = field(default_factory=list)
    skipped: Dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        lines = [f"{len(self.accelerated)} PEFT LoRA layers accelerated, {len(self.skipped)} left on PEFT's path"]
        lines += [f"  {name}: {why}" for name, why in self.skipped.items()]
        return "\n".join(lines)


def accelerate(model: nn.Module, *, backend: str = "auto", warn: bool = True) -> AccelerateReport:
    """Run the adapter branch of a PEFT model's ``lora.Linear`` layers through the fused op.

    Served: plain LoRA (any init: default, gaussian, PiSSA, OLoRA, ...), rsLoRA, KaSA, on
    ``nn.Linear`` or (``fan_in_fan_out``) transformers ``Conv1D`` bases; with or
    without ``lora_dropout`` (one mask per module call on the adapter branch's input, as PEFT);
    one active adapter per call. Left on PEFT's path (listed in the returned report and, when
    ``warn``, in one warning): other layer types (Embedding, Conv, quantised or hooked base
    layers), DoRA and other variants, ``lora_bias``; layers with several
    active adapters are listed too and fall back per call. Idempotent; undo with
    :func:`unaccelerate`.

    Args:
        model: a ``PeftModel`` (or any module containing PEFT LoRA layers).
        backend: the fused op's backend, ``"auto"`` | ``"torch"`` | ``"triton"``.
        warn: emit one ``UserWarning`` listing the layers left on PEFT's path.

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
    for mod in serve:
        mod.__class__ = AcceleratedLoraLinear
        mod._sk_backend = backend
    if warn and report.skipped:
        warnings.warn(f"sorsa_kernels.integrations.peft.accelerate: {report}", UserWarning, stacklevel=2)
    return report


def unaccelerate(model: nn.Module) -> nn.Module:
    """Undo :func:`accelerate`: every accelerated layer gets PEFT's ``lora.Linear`` back."""
    for mod in model.modules():
        if type(mod) is AcceleratedLoraLinear:
            mod.__class__ = LoraLinear
            mod.__dict__.pop("_sk_backend", None)
    return model


# ---------------------------------------------------------------- batched SVD init

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
        # KaSA (KasaLinearVariant._truncate_base_weight): keep the top k − r components
        for (_, keep, _), items in self._groups(kasa, lambda it: min(it[0].get_base_layer().weight.shape) - it[1]):
            W = torch.stack([_weight_of(layer) for layer, _ in items])
            U, S, Vh = svd_factors(W, keep, self.method, **self.svd_kwargs)
            with no_tf32():
                T = (U * S[:, None, :]) @ Vh
            for j, (layer, _) in enumerate(items):
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
    otherwise — KaSA keeps almost the full rank, so its truncation is always the exact SVD,
    batched), ``"rsvd_always"`` or ``"svd"`` (exact). ``svd_kwargs`` go to
    :func:`sorsa_kernels.rsvd` (``oversample``, ``niter``, ``tol``, ``seed`` — 0 unless given —,
    ``backend``).
    ``pissa_niter_K``'s K is ignored: our defaults are far more accurate (README).
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


# ---------------------------------------------------------------- regularizers

def _adapter_names(model: nn.Module, adapter_names) -> Optional[List[str]]:
    if adapter_names is None:
        return None
    return [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)


def _factor_pairs(model: nn.Module, adapter_names=None, kasa_only: bool = False):
    """``(layer, adapter, A, B)`` for every 2-D LoRA factor pair of the chosen adapters
    (default: each layer's active adapters)."""
    names = _adapter_names(model, adapter_names)
    out = []
    for mod in model.modules():
        if not isinstance(mod, LoraLayer):
            continue
        for a in (names if names is not None else mod.active_adapters):
            if a not in mod.lora_A or (kasa_only and a not in getattr(mod, "lora_diag", {})):
                continue
            A, B = mod.lora_A[a].weight, mod.lora_B[a].weight
            if A.dim() == 2 and B.dim() == 2:  # Conv factors are 4-D
                out.append((mod, a, A, B))
    return out


def ortho_loss(model: nn.Module, squared: bool = False, *, adapter_names: Union[str, Sequence[str], None] = None,
               backend: str = "auto") -> Optional[torch.Tensor]:
    """SORSA's regularizer on a PEFT model: mean over LoRA factors of ``‖AAᵀ−I‖_F`` (``lora_A``)
    and ``‖BᵀB−I‖_F`` (``lora_B``), differentiable, through :func:`sorsa_kernels.regularizer.ortho_loss`.

    ``adapter_names``: which adapters (default: each layer's active ones). Raises ``ValueError``
    when the model has no LoRA factors.
    """
    from ..regularizer import ortho_loss as _ortho_loss

    pairs = _factor_pairs(model, adapter_names)
    if not pairs:
        raise ValueError("ortho_loss found no PEFT LoRA factors (lora_A / lora_B) in the model"
                         + (f" for adapter_names={adapter_names!r}" if adapter_names is not None else ""))
    return _ortho_loss(None, squared, a=[p[2] for p in pairs], b=[p[3] for p in pairs], backend=backend)


def orthonormal_grad_(model: nn.Module, gamma: float, lr: float, *, squared: bool = False,
                      backend: str = "auto") -> Optional[torch.Tensor]:
    """:func:`sorsa_kernels.orthonormal_grad_` on a PEFT model's ``lora_A`` / ``lora_B`` weights
    (all adapters): adds ``∇ (gamma/lr)·ortho`` to their ``.grad`` before ``optimizer.step()``."""
    from ..regularizer import PEFT_NAMES
    from ..regularizer import orthonormal_grad_ as _grad_

    named = [(n, p) for n, p in model.named_parameters() if p.dim() == 2]
    return _grad_(named, gamma, lr, squared=squared, backend=backend, names=PEFT_NAMES)


def kasa_loss(model: nn.Module, adapter_names: Union[str, Sequence[str], None] = None, *,
              backend: str = "auto") -> Union[torch.Tensor, float]:
    """KaSA's auxiliary loss, equal to PEFT's ``LoraModel._get_kasa_loss`` (summed over KaSA
    layers: ``β·Σ lora_diag² + γ·(‖BᵀB−I‖_F + ‖AAᵀ−I‖_F)``, β, γ from each adapter's
    ``KasaConfig``), with the orthogonal term through the fused regularizer (one call per
    adapter). ``model``: the ``PeftModel`` (its ``peft_config`` holds β and γ). Returns 0.0
    without KaSA layers, like PEFT.
    """
    from ..regularizer import ortho_loss as _ortho_loss

    configs = getattr(model, "peft_config", None)
    if not isinstance(configs, dict):
        raise TypeError(f"model must be a PeftModel (with .peft_config), got {type(model).__name__}")
    names = _adapter_names(model, adapter_names)
    if names is None:
        names = list(getattr(model, "active_adapters", None) or [])
    total: Union[torch.Tensor, float] = 0.0
    for a in names:
        pairs = _factor_pairs(model, [a], kasa_only=True)
        if not pairs:
            continue
        cfg = configs[a].kasa_config
        l2 = sum((mod.lora_diag[a].float() ** 2).sum() for mod, _, _, _ in pairs)
        # the fused loss is the mean over the 2·len(pairs) matrices; KaSA sums them
        ortho = _ortho_loss(None, a=[p[2] for p in pairs], b=[p[3] for p in pairs], backend=backend)
        total = total + cfg.beta * l2 + cfg.gamma * (2 * len(pairs)) * ortho
    return total


# ---------------------------------------------------------------- export to a plain LoRA

@torch.no_grad()
def export_lora(model: nn.Module, out_dir: str, original: Union[nn.Module, Dict[str, torch.Tensor]],
                adapter_name: str = "default", dtype: torch.dtype = torch.float32) -> Dict[str, int]:
    """Write a PEFT model's adapter (plain LoRA, KaSA, PiSSA, OLoRA) as a plain PEFT LoRA for the
    **original, unmodified** base: ``ΔW = scaling·B·diag(d)·A + (W_now − W_orig)`` with ``d`` =
    ``lora_diag`` (KaSA) or ones. The second term is what the init took out of the base (KaSA's
    dropped r smallest components, PiSSA/OLoRA's principal part), rank ≤ r, factored by an exact
    SVD: the export has rank 2r where it is non-zero, r otherwise (scaling folded into
    ``lora_B``, ``lora_alpha = r``). KaSA adapters cannot be converted by PEFT itself
    (``supports_lora_conversion`` is False) because of that base change; this export carries it.

    Args:
        model: the ``PeftModel`` (adapters unmerged). original: the original base model, or its
            state dict (``<module>.weight`` keys, as the base model names them).
        adapter_name: which adapter. dtype: dtype of the written tensors.

    Returns:
        The rank written per module name.
    """
    import json
    import os

    from safetensors.torch import save_file

    from ..export import _lora_config

    sd = original.state_dict() if isinstance(original, nn.Module) else original
    inner = model.base_model.model if hasattr(model, "base_model") and hasattr(model.base_model, "model") else model
    tensors, r_of, problems = {}, {}, []
    for name, mod in inner.named_modules():
        if not isinstance(mod, LoraLinear) or adapter_name not in mod.lora_A:
            continue
        if mod.merged:
            problems.append(f"{name}: merged (unmerge first)")
            continue
        if f"{name}.weight" not in sd and f"{name}.base_layer.weight" not in sd:
            problems.append(f"{name}: no '{name}.weight' in original")
            continue
        W0 = sd.get(f"{name}.weight", sd.get(f"{name}.base_layer.weight")).to(torch.float32)
        W = mod.get_base_layer().weight.to(torch.float32)
        if mod.fan_in_fan_out:
            W0, W = W0.t(), W.t()
        A = mod.lora_A[adapter_name].weight.float()
        B = mod.lora_B[adapter_name].weight.float() * mod.scaling[adapter_name]
        if adapter_name in getattr(mod, "lora_diag", {}):
            B = B * mod.lora_diag[adapter_name].float()
        D = W.to(W0.device) - W0
        if D.abs().max() > 0:
            r = mod.r[adapter_name]
            U, S, Vh = torch.linalg.svd(D.double(), full_matrices=False)
            A = torch.cat([A.to(W0.device), Vh[:r].float()], 0)
            B = torch.cat([B.to(W0.device), (U[:, :r] * S[:r]).float()], 1)
        prefix = f"base_model.model.{name}"
        tensors[f"{prefix}.lora_A.weight"] = A.to(dtype).cpu().contiguous()
        tensors[f"{prefix}.lora_B.weight"] = B.to(dtype).cpu().contiguous()
        r_of[name] = A.shape[0]
    if problems or not r_of:
        raise ValueError("export_lora: " + ("\n  - ".join([""] + problems) if problems
                                            else f"no lora.Linear layer holds adapter {adapter_name!r}"))
    os.makedirs(out_dir, exist_ok=True)
    save_file(tensors, os.path.join(out_dir, "adapter_model.safetensors"), metadata={"format": "pt"})
    fifo = any(getattr(m, "fan_in_fan_out", False) for m in inner.modules() if isinstance(m, LoraLinear))
    with open(os.path.join(out_dir, "adapter_config.json"), "w") as fh:
        json.dump(_lora_config(r_of, fifo), fh, indent=2)
    return r_of
