"""Adapters as files: :func:`save_adapter` / :func:`load_adapter`.

A saved adapter is a directory with

* ``adapter_model.safetensors``: for each SORSA layer ``<name>``, its current adapters
  ``<name>.sorsa_A / .sorsa_S / .sorsa_B``, its *initial* adapter ``<name>.sorsa_A0 / .sorsa_S0 /
  .sorsa_B0`` and, when it is trainable (``requires_grad``), ``<name>.bias``;
* ``sorsa_config.json``: targets (exact module names), r, alpha, dropout, init method with its
  seed and SVD settings, dtypes and the library version, per layer.

Each layer's config also holds ``base_fingerprint``: float64 statistics of the layer's original
base weight ``W_r + scale·B0·diag(S0)·A0`` (see :func:`base_fingerprint`), so that
:func:`load_adapter` refuses a base with other weights of the same shapes (for SORSA that is
worse than for LoRA: ``W_r`` would subtract a principal part that is not the new base's).

``W_r`` is not saved. It is recomputed from the base model's weight and the saved initial
adapter with the same function init uses (:func:`sorsa_kernels.init.adapters_from_factors`):
``W_r = W − scale·B0·diag(S0)·A0`` in float32 (float64 for float64 weights), rounded to the
weight dtype — bit-identical to the ``W_r`` init produced on the same device type, with no
dependence on the SVD's determinism across devices or versions. Storing the initial adapter
(one more adapter-sized copy) is what makes this exact; re-running the init with the saved seed
would only be exact on the same backend and version.
"""
from __future__ import annotations

import json
import math
import os
import warnings
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn as nn

from .init import adapters_from_factors
from . import checkpoints
from .checkpoints import CONFIG_FILE, HF_ADAPTER_FILE
from . import quant
from . import _zero3
from ._fingerprint import base_fingerprint
from .layer import SORSAConv1D, SORSALinear, is_conv1d, named_sorsa_layers
from .layer_4bit import SORSALinear4bit, dequantized_linear

ADAPTER_FILE = "adapter_model.safetensors"
FORMAT = "sorsa-kernels-adapter/1"
_PARTS = ("sorsa_A", "sorsa_S", "sorsa_B")
_INIT_PARTS = ("sorsa_A0", "sorsa_S0", "sorsa_B0")


def _dtype_name(dt: torch.dtype) -> str:
    return str(dt).replace("torch.", "")


def _dtype(name: str) -> torch.dtype:
    dt = getattr(torch, name, None)
    if not isinstance(dt, torch.dtype):
        raise ValueError(f"unknown dtype {name!r} in {CONFIG_FILE}")
    return dt


# multiple of the unit roundoff times ‖W‖_F allowed between the saved and the model's statistics
_FP_TOL = 16.0


def _unit_roundoff(dtype: torch.dtype) -> float:
    # W_r is rounded to the weight dtype and B0·S0·A0 formed in float32 (float64 for float64
    # weights): the recovered base weight is exact to the coarser of the two
    u = torch.finfo(dtype).eps / 2 if dtype.is_floating_point else 0.0
    return max(u, (torch.finfo(torch.float64).eps if dtype == torch.float64 else torch.finfo(torch.float32).eps) / 2)


def _fingerprint_mismatch(saved: dict, got: dict, u: float) -> Optional[str]:
    """Why ``got`` is not the base ``saved`` describes, or None. Rounding errors of the recovered
    weight (|e_ij| ≤ ~u·|W_ij|, unbiased) move each signed sum by ~u·‖W‖_F (statistically) and the
    sum of squares by ≤ 2u·ΣW² (a bound); an unrelated base moves the signed sums by ~‖W‖_F."""
    if saved["numel"] != got["numel"]:
        return f"{got['numel']} elements, {saved['numel']} at save time"
    norm = math.sqrt(max(saved["sumsq"], got["sumsq"], 0.0))
    tol = _FP_TOL * u * norm + 1e-300
    if abs(saved["sumsq"] - got["sumsq"]) > 4 * u * max(saved["sumsq"], got["sumsq"]) + 1e-300:
        return f"sum of squares {got['sumsq']:.6g}, {saved['sumsq']:.6g} at save time"
    for what, a, b in [("sum", saved["sum"], got["sum"])] + [
            (f"signed sum {k}", a, b) for k, (a, b) in enumerate(zip(saved["proj"], got["proj"]))]:
        if abs(a - b) > tol:
            return f"{what} {b:.6g}, {a:.6g} at save time (tolerance {tol:.2g})"
    return None


def _base_weight(mod: nn.Module) -> torch.Tensor:
    """The base (original) out×in weight of a SORSA layer or of a plain Linear / Conv1D /
    bitsandbytes Linear4bit (dequantized)."""
    if isinstance(mod, SORSALinear):
        return mod.original_weight()
    if quant.is_linear4bit(mod):
        return quant.dequantize(mod.weight)
    return mod.weight.detach().T if is_conv1d(mod) else mod.weight.detach()


def _fingerprint(mod: nn.Module, stored_w: Optional[torch.Tensor] = None) -> Optional[dict]:
    """The base weight's fingerprint; a 4-bit SORSA layer's was taken at init (None: unknown).
    ``stored_w``: the SORSA layer's ``W_r`` as a state dict stores it, used instead of the layer's
    own (a ZeRO-3 layer's parameters are placeholders outside a gather)."""
    if isinstance(mod, SORSALinear4bit):
        return mod.base_fingerprint
    if stored_w is None:
        return base_fingerprint(_base_weight(mod))
    # SORSALinear.original_weight with W_r from the state dict (the layer is never merged here)
    d = mod._delta(*mod.initial_adapter())
    W_r = stored_w.T if mod.fan_in_fan_out else stored_w
    return base_fingerprint(W_r.to(d.device, d.dtype) + d)


def _weight_dtype(mod: nn.Module) -> torch.dtype:
    if isinstance(mod, SORSALinear):
        return mod.weight_dtype
    return quant.weight_dtype(mod.weight) if quant.is_linear4bit(mod) else mod.weight.dtype


def _uniform(values):
    values = list(values)
    return values[0] if values and all(v == values[0] for v in values) else None


def _layers_or_raise(model: nn.Module, what: str) -> List[Tuple[str, SORSALinear]]:
    layers = named_sorsa_layers(model)
    if not layers:
        raise ValueError(f"{what}: the model has no SORSA layer with r >= 1 (apply_sorsa first)")
    unknown = [n for n, m in layers if m.initial_adapter() is None]
    if unknown:
        raise ValueError(f"{what}: the initial adapter of {unknown} is unknown (weights were loaded "
                         f"from a state dict), so W_r could not be recomputed on load; load adapters with "
                         f"sk.load_adapter instead of load_state_dict")
    return layers


def _layer_spec(m: SORSALinear, stored_w: Optional[torch.Tensor] = None) -> dict:
    """One layer's entry of ``sorsa_config.json`` (``stored_w``: see :func:`_fingerprint`)."""
    spec = {
        "kind": "conv1d" if m.fan_in_fan_out else "linear",
        "in_features": m.in_features, "out_features": m.out_features,
        "r": m.r, "alpha": m.alpha, "dropout": m.dropout, "bias": m.bias is not None,
        "bias_trained": m.bias is not None and m.bias.requires_grad, "merge_weights": m.merge_weights,
        "weight_dtype": _dtype_name(m.weight_dtype), "adapter_dtype": _dtype_name(m.sorsa_A.dtype),
        "init": m.init_config,
        "base_fingerprint": _fingerprint(m, stored_w),
    }
    if isinstance(m, SORSALinear4bit):  # W_r = quant(W - scale·B0·diag(S0)·A0) with these settings
        spec["quant"] = m.quant_config()
        # of the packed bytes (integer sums: exact on any device): load_adapter checks its rebuild
        spec["packed_fingerprint"] = base_fingerprint(m.weight.data)
    return spec


def _collect(model: nn.Module, state_dict: Optional[Dict[str, torch.Tensor]] = None,
             with_tensors: bool = False) -> Tuple[dict, Dict[str, torch.Tensor]]:
    """``(config, tensors)`` of an adapter file (tensors only when ``with_tensors``). On a ZeRO-3
    model without ``state_dict``, each layer's own parameters are gathered in turn (a collective:
    every rank calls this; only rank 0 copies tensors); with ``state_dict`` (full weights, e.g. a
    consolidated one), base weights come from it and nothing is gathered."""
    what = "save_adapter"
    layers = _layers_or_raise(model, what)
    zero3 = _zero3.is_zero3_model(model)
    if zero3:
        checkpoints.check_zero3(model, what)
    gather = zero3 and state_dict is None
    copy = with_tensors and (not gather or _zero3.rank() == 0)
    per_layer: Dict[str, dict] = {}
    tensors: Dict[str, torch.Tensor] = {}
    for name, m in layers:
        stored_w = None
        if state_dict is not None:
            key = checkpoints.clean_name(name) + ".weight"
            if key not in state_dict:
                raise ValueError(f"{what}: state_dict has no {key!r} (the layer's full W_r is needed for its "
                                 f"base-weight fingerprint)")
            stored_w = state_dict[key]
        with _zero3.gathered(m.parameters(recurse=False) if gather else ()):
            per_layer[name] = spec = _layer_spec(m, stored_w)
            if not copy:
                continue
            for part, t in zip(_PARTS + _INIT_PARTS, (m.sorsa_A, m.sorsa_S, m.sorsa_B) + m.initial_adapter()):
                tensors[f"{name}.{part}"] = t.detach().to("cpu").contiguous().clone()
            if spec["bias_trained"]:
                tensors[f"{name}.bias"] = m.bias.detach().to("cpu").contiguous().clone()
    from ._version import __version__

    lv = list(per_layer.values())
    config = {
        "format": FORMAT,
        "library": "sorsa-kernels",
        "library_version": __version__,
        "target_modules": list(per_layer),
        "match": "peft",
        "r": _uniform(v["r"] for v in lv),
        "alpha": _uniform(v["alpha"] for v in lv),
        "dropout": _uniform(v["dropout"] for v in lv),
        "init": _uniform(v["init"] for v in lv),
        "weight_dtype": _uniform(v["weight_dtype"] for v in lv),
        "adapter_dtype": _uniform(v["adapter_dtype"] for v in lv),
        "layers": per_layer,
    }
    return config, tensors


def _unwrap(model: nn.Module) -> nn.Module:
    """The model inside a training wrapper (DeepSpeed's engine, DDP): its parameter names carry a
    ``module.`` prefix that a plain model's do not, so files written through the wrapper would not
    load into the model it wraps."""
    while type(model).__name__ in ("DeepSpeedEngine", "DistributedDataParallel") and isinstance(
            getattr(model, "module", None), nn.Module):
        model = model.module
    return model


def adapter_config(model: nn.Module, state_dict: Optional[Dict[str, torch.Tensor]] = None) -> dict:
    """The ``sorsa_config.json`` content for the SORSA layers of ``model`` (see the module docstring).

    Under DeepSpeed ZeRO-3 call it on every rank (each layer's parameters are gathered in turn),
    or pass ``state_dict`` with the model's full weights (as the Trainer consolidates them on its
    main process): base-weight fingerprints are then taken from it, with no collective."""
    return _collect(_unwrap(model), state_dict)[0]


def save_adapter(model: nn.Module, path: str) -> None:
    """Write the adapters of ``model`` to the directory ``path`` (created if needed): see the
    module docstring for the format. Raises ``ValueError`` when the model has no SORSA layer or a
    layer's initial adapter is unknown (needed to recompute ``W_r`` on load).

    A DeepSpeed ZeRO-3 model (``engine.module``): call on every rank. Each layer's parameters are
    gathered in turn (never the whole model), rank 0 writes the consolidated adapters, and every
    rank returns only once the files are written (or raises if rank 0 could not write them), so
    ``path`` can be read right after on any rank that sees rank 0's file system."""
    from safetensors.torch import save_file

    model = _unwrap(model)
    zero3 = _zero3.is_zero3_model(model)
    config, tensors = _collect(model, with_tensors=True)
    with _zero3.all_or_none(f"save_adapter({path!r}) on rank 0", collective=zero3):
        if not zero3 or _zero3.rank() == 0:
            os.makedirs(path, exist_ok=True)
            save_file(tensors, os.path.join(path, ADAPTER_FILE), metadata={"format": FORMAT})
            with open(os.path.join(path, CONFIG_FILE), "w") as f:
                json.dump(config, f, indent=2)


def read_adapter(path: str) -> Tuple[dict, Dict[str, torch.Tensor]]:
    """``(config, tensors)`` of an adapter directory written by :func:`save_adapter` (CPU tensors)."""
    from safetensors.torch import load_file

    cfg_path, ten_path = os.path.join(path, CONFIG_FILE), os.path.join(path, ADAPTER_FILE)
    if not os.path.isfile(ten_path) and os.path.isfile(os.path.join(path, HF_ADAPTER_FILE)):
        ten_path = os.path.join(path, HF_ADAPTER_FILE)  # a Trainer checkpoint saved with save="adapter"
    for p in (cfg_path, ten_path):
        if not os.path.isfile(p):
            raise FileNotFoundError(
                f"{p} not found: path must be a directory written by sk.save_adapter or a Trainer checkpoint "
                f"saved with SORSACallback(save='adapter'); a full checkpoint (save_pretrained's default) "
                f"loads with load_state_dict / resume_from_checkpoint into a model prepared with apply_sorsa")
    with open(cfg_path) as f:
        config = json.load(f)
    if config.get("format") != FORMAT:
        raise ValueError(f"{cfg_path}: format {config.get('format')!r} is not {FORMAT!r}")
    return config, load_file(ten_path)


def _check_layer(name: str, spec: dict, mod: Optional[nn.Module], tensors: Dict[str, torch.Tensor],
                 problems: List[str]) -> None:
    """Append every mismatch between the saved layer ``spec`` and the model's module ``mod``."""
    in_f, out_f, r = spec["in_features"], spec["out_features"], spec["r"]
    shapes = {"sorsa_A": (r, in_f), "sorsa_S": (r,), "sorsa_B": (out_f, r)}
    for part in _PARTS + _INIT_PARTS:
        t = tensors.get(f"{name}.{part}")
        want = shapes[part.rstrip("0")]
        if t is None:
            problems.append(f"{name}.{part}: missing from {ADAPTER_FILE}")
        elif tuple(t.shape) != want:
            problems.append(f"{name}.{part}: shape {tuple(t.shape)} in the file, config says {want}")
    if spec.get("bias_trained"):
        t = tensors.get(f"{name}.bias")
        if t is None or tuple(t.shape) != (out_f,):
            problems.append(f"{name}.bias: missing or not of shape ({out_f},)")
    if mod is None:
        problems.append(f"{name}: no such module in the model")
        return
    conv = spec["kind"] == "conv1d"
    if isinstance(mod, SORSALinear):
        if mod.fan_in_fan_out != conv:
            problems.append(f"{name}: a {type(mod).__name__} in the model, a {spec['kind']} layer in the adapter")
        got = (mod.in_features, mod.out_features, mod.r)
        if got != (in_f, out_f, r):
            problems.append(f"{name}: (in_features, out_features, r) = {got} in the model, {(in_f, out_f, r)} "
                            f"in the adapter")
        if mod.alpha != spec["alpha"]:
            problems.append(f"{name}: alpha = {mod.alpha} in the model, {spec['alpha']} in the adapter")
        if mod.initial_adapter() is None:
            problems.append(f"{name}: the model layer's initial adapter is unknown (weights loaded from a state "
                            f"dict), so its base weight cannot be recovered; load into the base model instead")
        if isinstance(mod, SORSALinear4bit) != bool(spec.get("quant")):
            problems.append(f"{name}: a {'4-bit' if spec.get('quant') else 'full-precision'} residual in the adapter, "
                            f"a {type(mod).__name__} in the model; load it onto the base model instead")
        elif isinstance(mod, SORSALinear4bit) and mod.quant_config() != spec["quant"]:
            problems.append(f"{name}: 4-bit settings {mod.quant_config()} in the model, {spec['quant']} in the adapter")
    elif isinstance(mod, nn.Linear) or is_conv1d(mod):
        if is_conv1d(mod) != conv:
            problems.append(f"{name}: a {type(mod).__name__} in the model, a {spec['kind']} layer in the adapter")
        shape = (in_f, out_f) if conv else (out_f, in_f)
        got = quant.weight_shape(mod.weight) if quant.is_linear4bit(mod) else _zero3.full_shape(mod.weight)
        if tuple(got) != shape:
            problems.append(f"{name}: weight shape {tuple(got)} in the model, {shape} in the adapter")
        elif mod.weight.is_meta:
            problems.append(f"{name}: weight is on the meta device; load the base weights first")
    else:
        problems.append(f"{name}: a {type(mod).__name__} in the model, not a Linear/Conv1D or SORSA layer")
    if spec["bias"] != (getattr(mod, "bias", None) is not None):
        problems.append(f"{name}: bias {'expected' if spec['bias'] else 'not expected'} by the adapter")


def _plan_layer(name: str, mod: nn.Module, spec: dict, tensors: Dict[str, torch.Tensor]) -> tuple:
    """The layer to install for ``name`` (``mod`` itself when it is a SORSA layer, else a new one),
    its new ``W_r`` (None: keep), initial and current adapters on its device and dtype; reads
    ``mod``'s weights (gathered under ZeRO-3), changes nothing of it."""
    A, S, B = (tensors[f"{name}.{p}"] for p in _PARTS)
    A0, S0, B0 = (tensors[f"{name}.{p}"] for p in _INIT_PARTS)
    qspec = spec.get("quant")
    if isinstance(mod, SORSALinear):
        layer, new = mod, False
        dev, adt = layer.sorsa_A.device, layer.sorsa_A.dtype
        cur0 = layer.initial_adapter()
        same_init = all(c.dtype == t.dtype and torch.equal(c.cpu(), t) for c, t in zip(cur0, (A0, S0, B0)))
        if not same_init and qspec:
            raise ValueError(f"load_adapter: {name} is a 4-bit layer initialised differently from the adapter: "
                             f"its quantized W_r cannot give back the base weight; load onto the base model")
        W = None if same_init else layer.original_weight()
    else:
        if quant.is_linear4bit(mod):  # a 4-bit base: its own settings unless the adapter has some
            qspec = qspec or {"type": mod.weight.quant_type, "blocksize": mod.weight.blocksize,
                              "double_quant": bool(mod.weight.compress_statistics), "iters": 0}
        base = dequantized_linear(mod) if quant.is_linear4bit(mod) else mod
        cls = SORSAConv1D if spec["kind"] == "conv1d" else SORSALinear
        layer = cls.from_linear(base, spec["r"], alpha=spec["alpha"], dropout=spec["dropout"], init=None,
                                merge_weights=spec.get("merge_weights", True) and not qspec)
        new, dev, adt = True, layer.weight.device, _dtype(spec["adapter_dtype"])
        W = layer.w.detach()
    A0, S0, B0 = (t.to(dev, adt) for t in (A0, S0, B0))
    W_r = None
    if W is not None:
        W_r, A0, S0, B0 = adapters_from_factors(W, B0, S0, A0, layer.scale, layer.weight_dtype, adt)
    if new and qspec:  # the quantized residual, bit for bit as at init: quant(W_r) of the same W_r
        layer._set_w(W_r)
        layer.sorsa_A.data, layer.sorsa_S.data, layer.sorsa_B.data = A0.clone(), S0.clone(), B0.clone()
        layer._record_initial(A0, S0, B0)
        layer.init_config = spec.get("init")
        layer = SORSALinear4bit.from_sorsa(layer, qspec["type"], qspec["blocksize"], qspec["double_quant"],
                                           fingerprint=base_fingerprint(W))
        layer.quant_iters = qspec.get("iters", 0)
        W_r = None
    return (name, mod, layer, new, W_r, (A0, S0, B0), tuple(t.to(dev, adt) for t in (A, S, B)), spec)


def _set_masters(layer: SORSALinear, cur: tuple, bias: Optional[torch.Tensor]) -> None:
    """Give a ZeRO optimizer's fp32 master copies of ``layer``'s adapters (and trained bias) the
    values just loaded (see :func:`_zero3.set_master`; a no-op without DeepSpeed)."""
    for p, t in zip((layer.sorsa_A, layer.sorsa_S, layer.sorsa_B, layer.bias), tuple(cur) + (bias,)):
        if t is not None:
            _zero3.set_master(p, t)


def _install_layer(model: nn.Module, item: tuple, tensors: Dict[str, torch.Tensor]) -> None:
    """Install one planned layer (see :func:`_plan_layer`) in ``model``; under ZeRO-1/2 its
    optimizer's fp32 master copies get the values too."""
    name, mod, layer, new, W_r, init, cur, spec = item
    was_merged = layer.merged
    layer._merge(False)
    if W_r is not None:
        layer._set_w(W_r)
    layer.sorsa_A.data, layer.sorsa_S.data, layer.sorsa_B.data = (t.clone() for t in cur)
    layer._record_initial(*init)
    bias = tensors[f"{name}.bias"] if spec.get("bias_trained") else None
    if bias is not None:
        layer.bias.data = bias.to(layer.bias.device, layer.bias.dtype)
    layer.init_config = spec.get("init")
    if was_merged:
        layer._merge(True)
    _set_masters(layer, cur, bias)
    if new:  # every registration of the base module gets the one SORSA layer
        sites = [full for full, m in model.named_modules(remove_duplicate=False) if m is mod and full]
        for full in sites:
            parent, _, attr = full.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, attr, layer)


def _install_layer_zero3(mod: SORSALinear, name: str, spec: dict, tensors: Dict[str, torch.Tensor]) -> None:
    """:func:`_plan_layer` + :func:`_install_layer` for a ZeRO-3 SORSA layer: its parameters are
    gathered, written in place on every rank and rank 0's values re-partitioned; then the
    optimizer's fp32 master copies get the same values (a collective: every rank calls it, and a
    failure on any rank raises on all before the next layer's gather)."""
    own = list(mod.parameters(recurse=False))
    with _zero3.gathered(own, modifier_rank=0):
        _, _, layer, _, W_r, init, cur, _ = _plan_layer(name, mod, spec, tensors)
        # in place: a gathered parameter's data must stay the buffer DeepSpeed partitions on exit
        if W_r is not None:
            layer.w.copy_(W_r)
        for p, t in zip((layer.sorsa_A, layer.sorsa_S, layer.sorsa_B), cur):
            p.data.copy_(t)
        layer._record_initial(*init)
        bias = tensors[f"{name}.bias"] if spec.get("bias_trained") else None
        if bias is not None:
            layer.bias.data.copy_(bias)
        layer.init_config = spec.get("init")
    with _zero3.all_or_none(f"load_adapter: {name}'s optimizer master copies"):
        _set_masters(layer, cur, bias)


def _load_param_zero3(p: torch.Tensor, value: torch.Tensor) -> None:
    """Give the (possibly partitioned) parameter ``p`` the full ``value`` (every rank calls it)."""
    with _zero3.gathered([p], modifier_rank=0):
        p.data.copy_(value.to(p.device, p.dtype))
    with _zero3.all_or_none("load_adapter: a trained parameter's optimizer master copy"):
        _zero3.set_master(p, value)


@torch.no_grad()
def load_adapter(model: nn.Module, path: str, check_base: bool = True) -> nn.Module:
    """Apply the adapter in ``path`` (written by :func:`save_adapter`) to ``model``.

    ``model`` is either the base model (targets still ``nn.Linear`` / ``Conv1D``: they are
    converted as the saved config says) or a model prepared with :func:`apply_sorsa` (same
    targets, r and alpha). Each layer gets ``W_r`` recomputed from its base weight and the saved
    initial adapter (exact; see the module docstring: for a prepared layer whose own initial
    adapter equals the saved one, its ``W_r`` is kept as is, else the base weight is
    ``W_r + scale·B0·diag(S0)·A0`` of that layer), the saved adapters, the trained biases and
    the init config. Merged layers stay merged.

    Every mismatch (missing module, shape, r, alpha, kind, SORSA layers the adapter lacks,
    unexpected tensors) is listed in one ``ValueError``, raised before anything is changed.
    With ``check_base`` (default), so is every layer whose base weight differs from the one the
    adapter was trained on (same shapes, other values: compared by the saved
    ``base_fingerprint``, to the rounding of the weight dtype); adapters saved without a
    fingerprint (older versions) load with a warning. ``check_base=False`` skips the check.

    A DeepSpeed ZeRO model (``engine.module``, prepared with :func:`apply_sorsa` before
    ``deepspeed.initialize``; a target still ``nn.Linear`` there raises ``ValueError``): call on
    every rank, each reading ``path``. The ZeRO optimizer's fp32 master copies of trainable
    parameters are set too (else its next step would restore the old values). ZeRO-3: layers are
    gathered one at a time and rank 0's values re-partitioned, so each rank ends with its
    partition; a failure on one rank raises on every rank. Mismatches are still found before
    anything changes, but ZeRO-3 layers are then written one at a time (a failure midway leaves
    earlier layers loaded).
    Returns ``model``.
    """
    if not isinstance(check_base, bool):
        raise TypeError(f"check_base must be a bool, got {type(check_base).__name__}")
    wrapper, model = model, _unwrap(model)
    zero3 = _zero3.is_zero3_model(model)
    zero12 = not zero3 and _zero3.is_zero12_model(model)
    # a rank that cannot read must not leave the others in the gathers below
    with _zero3.all_or_none(f"load_adapter: reading {path!r}", collective=zero3):
        config, tensors = read_adapter(path)
    if zero3:
        checkpoints.check_zero3(model, "load_adapter")
    specs: Dict[str, dict] = config["layers"]
    modules = dict(model.named_modules())
    problems: List[str] = []
    for name, spec in specs.items():
        _check_layer(name, spec, modules.get(name), tensors, problems)
        mod = modules.get(name)
        if (zero3 or zero12) and mod is not None and not isinstance(mod, SORSALinear):
            # ZeRO-1/2 would run, but its optimizer would never see (nor train) the new adapters
            problems.append(f"{name}: a {type(mod).__name__} in a DeepSpeed {'ZeRO-3' if zero3 else 'ZeRO-1/2'} "
                            f"model: its SORSA layer cannot be added after deepspeed.initialize; call "
                            f"sk.apply_sorsa (any init) before it, then load")
    extra = [n for n, _ in named_sorsa_layers(model) if n not in specs]
    if extra:
        problems.append(f"SORSA layers {extra} of the model are not in the adapter")
    trainable = config.get("trainable", [])  # other trained parameters (adapter-only Trainer checkpoints)
    params = dict(model.named_parameters())
    for k in trainable:
        if k not in tensors or k not in params or _zero3.full_shape(params[k]) != tuple(tensors[k].shape):
            problems.append(f"{k}: a trained parameter of the checkpoint, missing or of another shape in the "
                            f"{'model' if k in tensors else 'file'}")
    known = {f"{n}.{p}" for n in specs for p in _PARTS + _INIT_PARTS} | {
        f"{n}.bias" for n, s in specs.items() if s.get("bias_trained")} | set(trainable)
    unexpected = sorted(set(tensors) - known)
    if unexpected:
        problems.append(f"unexpected tensors in {ADAPTER_FILE}: {unexpected[:20]}")
    if check_base and not problems:  # shapes agree: compare each layer's base weight
        unprinted = [n for n, spec in specs.items() if "base_fingerprint" not in spec]
        if unprinted:
            warnings.warn(f"load_adapter: {path} has no base-weight fingerprint for {unprinted} (saved by an "
                          f"older sorsa-kernels): cannot check that the model is the base it was trained on",
                          stacklevel=2)
        for name, spec in specs.items():
            if "base_fingerprint" not in spec:
                continue
            mod = modules[name]
            with _zero3.gathered(mod.parameters(recurse=False)):  # one layer at a time under ZeRO-3
                got = _fingerprint(mod)
            if got is None:
                problems.append(f"{name}: this 4-bit layer's base weight is unknown (loaded from a state dict); "
                                f"load onto the base model, or pass check_base=False")
                continue
            u = max(_unit_roundoff(_dtype(spec["weight_dtype"])), _unit_roundoff(_weight_dtype(mod)))
            why = _fingerprint_mismatch(spec["base_fingerprint"], got, u)
            if why and quant.is_linear4bit(mod) and not spec.get("quant"):
                problems.append(f"{name}: the model's layer is a bitsandbytes 4-bit layer, the adapter was trained on "
                                f"a full-precision base ({why}): load the base in full precision (and pass "
                                f"quantize= to apply_sorsa for a 4-bit residual), or pass check_base=False")
            elif why:
                problems.append(f"{name}: base weight differs from the one the adapter was trained on ({why}); "
                                f"load onto the original base model, or pass check_base=False")
    if problems:
        raise ValueError(f"load_adapter: {len(problems)} mismatch(es) between {path} and the model:\n  - "
                         + "\n  - ".join(problems))

    if zero3:  # every target is a SORSA layer (checked above): write each in place, one at a time
        for k in trainable:
            _load_param_zero3(params[k], tensors[k])
        for name, spec in specs.items():
            _install_layer_zero3(modules[name], name, spec, tensors)
        checkpoints.install(model, adapter_config)
        return wrapper

    # build every new layer (and every W_r) first; install only when all succeeded
    plan = [_plan_layer(name, modules[name], spec, tensors) for name, spec in specs.items()]

    for k in trainable:
        params[k].data = tensors[k].to(params[k].device, params[k].dtype)
        _zero3.set_master(params[k], tensors[k])
    for item in plan:
        _install_layer(model, item, tensors)
    checkpoints.install(model, adapter_config)  # transformers' save_pretrained must not write W_r alone
    _check_rebuilt_residuals(model, specs, path)
    return wrapper


def _check_rebuilt_residuals(model: nn.Module, specs: Dict[str, dict], path: str) -> None:
    """Warn when a rebuilt 4-bit residual's bytes differ from the saved model's: bitsandbytes' CPU
    and CUDA quantize kernels can round a value at a code boundary differently, so a residual
    quantized on one device type may differ by one 4-bit step in a few weights on another."""
    differ = []
    for name, spec in specs.items():
        want = spec.get("packed_fingerprint")
        mod = model.get_submodule(name)
        if want is not None and isinstance(mod, SORSALinear4bit) and base_fingerprint(mod.weight.data) != want:
            differ.append(name)
    if differ:
        warnings.warn(f"load_adapter: the 4-bit residual rebuilt for {differ[:5]}{' ...' if len(differ) > 5 else ''} "
                      f"differs from the one saved with {path} in some bytes (quantized on another device type: "
                      f"bitsandbytes' CPU and CUDA kernels may round values at a 4-bit code boundary differently); "
                      f"outputs differ by those roundings", UserWarning, stacklevel=3)
