"""transformers checkpoints of models holding SORSA layers: ``save_pretrained``,
``Trainer.save_model`` and the Trainer's periodic checkpoints.

A SORSA layer's own state dict is sorsa 1.0.1's (``weight`` = ``W_r``), so a transformers
checkpoint written from it reloads *silently wrong* with the stock ``from_pretrained`` (``W_r``
alone). :func:`install` (called by :func:`sorsa_kernels.apply_sorsa`, :func:`sorsa_kernels.load_adapter`
and the Trainer callbacks) gives a ``transformers.PreTrainedModel`` a ``save_pretrained`` that
writes one of three forms — everything transformers writes goes through it:

* ``"full"`` (default): ``weight`` = the merged ``W_r + scale·B·diag(S)·A`` in the weight dtype,
  so any ``from_pretrained`` (transformers, vLLM, ...) gets the fine-tuned model (it lists the
  extra ``sorsa_*`` keys as unused); plus the adapters, the initial adapter and a
  ``sorsa_merged`` marker, so ``Trainer(resume_from_checkpoint=…)`` restores the SORSA model:
  bit-exactly when the model was built the same way (same base, ``apply_sorsa`` settings).
  A model with 4-bit residuals (QSORSA) keeps its packed ``W_r`` instead (a merged weight would be
  the full-precision model) and a poisoned ``config.json`` (:func:`poisoned_config`): such a
  checkpoint resumes a Trainer or loads with ``load_state_dict`` into a model built the same way,
  and a stock ``from_pretrained`` stops with a message instead of loading ``W_r`` as the weights.
* ``"merged"``: the merged weights only — a plain model for deployment (dequantized for 4-bit).
* ``"adapter"``: the adapters (current and initial), trainable biases and every other trainable
  parameter, like PEFT's adapter checkpoints: ``model.safetensors`` (the name the Trainer's
  resume loads), ``sorsa_config.json`` (:func:`sorsa_kernels.load_adapter` reads both) and a
  ``config.json`` made so that the stock ``from_pretrained`` stops with a message saying what
  the directory is (see :func:`poisoned_config`). The Trainer resumes from it onto a model built
  from the base with ``apply_sorsa``.

Choose per call (``model.save_pretrained(path, sorsa_format="merged")``) or for a whole run
(``SORSACallback(gamma, save="adapter")``).

Under DeepSpeed ZeRO-3 (partitioned parameters), ``model.save_pretrained(path)`` is called on
every rank: parameters are gathered one module at a time to CPU copies on rank 0, which writes.
``Trainer.save_model`` passes the engine's consolidated state dict on the main process only
(``stage3_gather_16bit_weights_on_model_save: true``); nothing is gathered then. Without that
setting it passes ``{}``: the adapter form then writes nothing and warns.
"""
from __future__ import annotations

import json
import os
import sys
import warnings
from typing import Callable, Dict, Optional

import torch
import torch.nn as nn

from . import _zero3, quant
from .layer import _INIT_NAMES, MERGED_KEY, named_sorsa_layers

#: the tensors' file of an adapter-only checkpoint: the name the Trainer loads on resume
HF_ADAPTER_FILE = "model.safetensors"
#: written beside it: :func:`sorsa_kernels.adapters.adapter_config` (``sk.load_adapter`` reads both)
CONFIG_FILE = "sorsa_config.json"
#: ``config_fn(model, state_dict)``: the adapter config; base weights from ``state_dict`` when given
ConfigFn = Callable[[nn.Module, Optional[Dict[str, torch.Tensor]]], dict]

FORMATS = ("full", "merged", "adapter")
_ATTR = "_sorsa_save_format"


def check_format(fmt: str) -> str:
    if fmt not in FORMATS:
        raise ValueError(f"sorsa_format must be one of {FORMATS}, got {fmt!r}")
    return fmt


def is_pretrained_model(model: nn.Module) -> bool:
    """Whether ``model`` is a ``transformers.PreTrainedModel`` (never imports transformers)."""
    tf = sys.modules.get("transformers")
    return tf is not None and isinstance(model, getattr(tf, "PreTrainedModel", ()))


#: name segments wrappers insert in module names but not in the state dicts the Trainer passes
_WRAPPER_SEGMENTS = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")


def clean_name(name: str) -> str:
    """``name`` without the segments wrappers insert (the key a gathered state dict uses)."""
    for seg in _WRAPPER_SEGMENTS:
        name = name.replace(seg, "")
    return name


@torch.no_grad()
def checkpoint_state_dict(model: nn.Module, state_dict: Optional[Dict[str, torch.Tensor]] = None,
                          fmt: str = "full") -> Dict[str, torch.Tensor]:
    """The state dict a checkpoint of form ``fmt`` stores (see the module docstring), built from
    ``state_dict`` (default: ``model.state_dict()``; a gathered one under FSDP / DeepSpeed) and the
    model's SORSA layers (scale, initial adapter). Each layer's keys are contiguous, ``weight``
    first (so a sharded save keeps them together unless a shard fills up right there; the loader
    copes either way); merged weights are made one layer at a time on the CPU (no extra device
    memory at a mid-run checkpoint)."""
    check_format(fmt)
    src = model.state_dict() if state_dict is None else state_dict
    layers = {}
    for name, m in named_sorsa_layers(model):
        name = clean_name(name)
        if name + ".sorsa_A" in src:
            layers[name] = m
    if src and named_sorsa_layers(model) and not layers:
        raise ValueError("save_pretrained: the state dict holds none of the model's SORSA layers under their "
                         "names (a wrapper renamed them?); refusing to write W_r as if it were the weight")
    sd: Dict[str, torch.Tensor] = {}
    own = {f"{n}.{k}" for n in layers for k in ("weight", "sorsa_A", "sorsa_S", "sorsa_B")}
    # a 4-bit W_r's quantization statistics (weight.absmax, ...): not part of a merged weight
    qstats = {k for n, m in layers.items() if quant.is_params4bit(m.weight) for k in src if k.startswith(n + ".weight.")}
    for key, t in src.items():
        if key not in own:
            if not (fmt == "merged" and key in qstats):
                sd[key] = t
            continue
        name, _, part = key.rpartition(".")
        if part != "weight":
            continue  # written with its layer's weight
        m, p = layers[name], name + "."
        A, S, B, W_r = (src[p + k] for k in ("sorsa_A", "sorsa_S", "sorsa_B", "weight"))
        if any(x.is_meta for x in (A, S, B, W_r)):
            raise ValueError(f"save_pretrained: {name} has tensors on the meta device (an offloaded layer?): "
                             f"its merged weight cannot be computed; save with the model loaded")
        if fmt == "adapter":
            pass
        elif quant.is_params4bit(m.weight):
            # 4-bit W_r: "full" keeps the packed residual and its statistics (a resume is bit-exact; no
            # merged weight: it would be the full-precision model); "merged" dequantizes
            if fmt == "merged":
                sd[p + "weight"] = m.effective_weight().to("cpu", m.weight_dtype)
            else:
                sd[p + "weight"] = W_r
        elif m.merged and state_dict is None:  # merged already: as is, not rounded twice
            sd[p + "weight"] = m.weight.detach().to("cpu")
        else:
            work = torch.float64 if W_r.dtype == torch.float64 else torch.float32
            d = m.scale * (B.to("cpu", work) * S.to("cpu", work)) @ A.to("cpu", work)
            d = d.T if m.fan_in_fan_out else d
            sd[p + "weight"] = (W_r.to("cpu", work) + d).to(W_r.dtype)
        if fmt == "full" and not quant.is_params4bit(m.weight):
            sd[p + MERGED_KEY] = torch.ones((), dtype=torch.uint8)
        if fmt != "merged":
            sd.update({p + k: src[p + k] for k in ("sorsa_A", "sorsa_S", "sorsa_B")})
            init = m.initial_adapter()
            if init is not None:
                sd.update({p + n: t.detach() for n, t in zip(_INIT_NAMES, init)})
    if fmt == "adapter":
        train = {clean_name(n) for n, prm in model.named_parameters() if prm.requires_grad and "sorsa_" not in n}
        sd = {k: v for k, v in sd.items() if "sorsa_" in k.rpartition(".")[2] or k in train}
    return sd


def check_zero3(model: nn.Module, what: str) -> None:
    """Refuse, on a DeepSpeed ZeRO-3 model, what it cannot hold: a merged SORSA layer (merging
    replaces a partitioned weight's data) and a 4-bit residual (bitsandbytes' packed weight and its
    statistics are not partitioned parameters DeepSpeed can gather)."""
    layers = named_sorsa_layers(model)
    q = [n for n, m in layers if quant.is_params4bit(m.weight)]
    if q:
        raise ValueError(f"{what}: 4-bit residual layers {q[:5]} under DeepSpeed ZeRO-3 are not supported; use "
                         f"ZeRO-2, or a full-precision residual (apply_sorsa without quantize=)")
    merged = [n for n, m in layers if m.merged]
    if merged:
        raise ValueError(f"{what}: layers {merged[:5]} are merged under DeepSpeed ZeRO-3 (not supported: merging "
                         f"replaces a partitioned weight); call sk.unmerge_sorsa(model) before deepspeed.initialize")


def save_pretrained_sorsa(model: nn.Module, save_directory: str, *args, sorsa_format: Optional[str] = None,
                          config_fn: ConfigFn, **kwargs) -> None:
    """``PreTrainedModel.save_pretrained`` writing the ``sorsa_format`` form (default: the model's,
    set by ``SORSACallback(save=…)``, else ``"full"``); other arguments are transformers'.
    ``config_fn`` builds the adapter config (passed in: the adapter format's home imports this one)."""
    fmt = check_format(sorsa_format or getattr(model, _ATTR, "full"))
    src = kwargs.pop("state_dict", None)
    zero3 = _zero3.is_zero3_model(model)
    if zero3:
        check_zero3(model, "save_pretrained")
    if zero3 and src is None:
        # called on every rank (its parameters are partitioned): gather one module at a time to rank
        # 0, which writes; every rank returns once the files are written
        if args or kwargs.get("push_to_hub"):
            raise ValueError("save_pretrained of a DeepSpeed ZeRO-3 model takes only save_directory, sorsa_format "
                             "and transformers' keyword arguments other than push_to_hub (save, then push from one "
                             "process)")
        src = _zero3.gathered_state_dict(model)
        writer = _zero3.rank() == 0 and kwargs.pop("is_main_process", True)
        try:
            if writer:
                save_pretrained_sorsa(model, save_directory, sorsa_format=fmt, config_fn=config_fn,
                                      state_dict=src, **kwargs)
        except Exception:
            _zero3.agree(False, f"save_pretrained({save_directory!r})")
            raise
        _zero3.agree(True, f"save_pretrained({save_directory!r}) on rank 0")
        return
    if zero3 and not src:
        # the Trainer under ZeRO-3 with stage3_gather_16bit_weights_on_model_save false passes {} on its
        # main process only (no collective possible here) and writes DeepSpeed's own checkpoint instead
        warnings.warn(f"save_pretrained: no weights to write to {save_directory} (a DeepSpeed ZeRO-3 model saved "
                      f"without gathered weights: set stage3_gather_16bit_weights_on_model_save to true, or call "
                      f"model.save_pretrained(path) / sk.save_adapter(model, path) on every rank)",
                      UserWarning, stacklevel=3)
        if fmt == "adapter":
            return
    sd = checkpoint_state_dict(model, src, fmt)
    if fmt != "adapter":
        type(model).save_pretrained(model, save_directory, *args, state_dict=sd, **kwargs)
        if fmt == "full" and has_4bit(model) and kwargs.get("is_main_process", True):
            # its weights are 4-bit W_r: a stock from_pretrained would load them as the model's weights
            # (silently, when the config carries the base's bitsandbytes quantization_config)
            with open(os.path.join(save_directory, "config.json"), "w") as f:
                json.dump(poisoned_config(model, NOT_A_MODEL_4BIT, "full-4bit"), f, indent=2)
        return
    if args or kwargs.get("push_to_hub"):
        raise ValueError("save_pretrained(sorsa_format='adapter') takes only save_directory and is_main_process "
                         "(no push_to_hub)")
    if not kwargs.get("is_main_process", True):
        return
    from safetensors.torch import save_file

    os.makedirs(save_directory, exist_ok=True)
    cfg = config_fn(model, src if zero3 else None)
    own = {f"{n}.{part}" for n, _ in named_sorsa_layers(model)
           for part in ("sorsa_A", "sorsa_S", "sorsa_B", "bias") + _INIT_NAMES}
    cfg["trainable"] = sorted(k for k in sd if k not in own)  # e.g. an unfrozen lm_head
    save_file({k: v.detach().to("cpu").contiguous().clone() for k, v in sd.items()},  # clone: tied weights
              os.path.join(save_directory, HF_ADAPTER_FILE), metadata={"format": "pt"})
    with open(os.path.join(save_directory, CONFIG_FILE), "w") as f:
        json.dump(cfg, f, indent=2)
    with open(os.path.join(save_directory, "config.json"), "w") as f:
        json.dump(poisoned_config(model), f, indent=2)


NOT_A_MODEL = ("NOT A MODEL: a sorsa-kernels adapter-only checkpoint; load it with "
               "sk.load_adapter(base_model, path) or resume a Trainer from it")
NOT_A_MODEL_4BIT = ("NOT A MODEL: a sorsa-kernels 4-bit (QSORSA) training checkpoint, its weights are the 4-bit "
                    "residuals W_r; resume a Trainer from it, or build the model with sk.apply_sorsa(..., "
                    "quantize=...) and load_state_dict; for a model that loads anywhere save with "
                    "sorsa_format='merged'")


def has_4bit(model: nn.Module) -> bool:
    """Whether ``model`` holds a SORSA layer with a 4-bit residual."""
    return any(quant.is_params4bit(m.weight) for _, m in named_sorsa_layers(model))


def poisoned_config(model: nn.Module, message: str = NOT_A_MODEL, kind: str = "adapter") -> dict:
    """The model's config with its layer count and weight tying replaced by ``message``
    (:data:`NOT_A_MODEL` for adapter-only checkpoints, :data:`NOT_A_MODEL_4BIT` for "full" ones of
    4-bit models) and ``sorsa_kernels_checkpoint = kind``.

    Without a config.json, ``LlamaForCausalLM.from_pretrained(path)`` builds the class's default
    config (a 7B model) and fills it with random weights; with the true one, a model with random
    base weights. Both are silently wrong, so these fields are poisoned: transformers' config
    validation (or, before 5.0, model construction) stops with the message above, while the
    Trainer's resume (which reads only the version) still works."""
    cfg = model.config.to_dict() if hasattr(model, "config") else {}
    for key in ("num_hidden_layers", "n_layer", "num_layers", "tie_word_embeddings"):
        if key in cfg:
            cfg[key] = message
    cfg["sorsa_kernels_checkpoint"] = kind
    return cfg


def install(model: nn.Module, config_fn: ConfigFn, fmt: Optional[str] = None) -> bool:
    """Give a ``transformers.PreTrainedModel`` holding SORSA layers the ``save_pretrained`` above
    (idempotent; an instance attribute, so the class is untouched); ``fmt`` sets its default form.
    Returns whether ``model`` is such a model."""
    if not is_pretrained_model(model) or getattr(model, "_sorsa_keeps_save_pretrained", False):
        return False  # (a class with its own checkpoint format opts out, e.g. compat.SORSAModel)
    if fmt is not None:
        setattr(model, _ATTR, check_format(fmt))
    if "save_pretrained" not in model.__dict__:
        model.save_pretrained = _BoundSave(model, config_fn)
    return True


class _BoundSave:
    """``model.save_pretrained`` bound to its model; picklable and deep-copyable by reference to
    the model (a bound method of a function would also do, but keeps no docstring for ``help``)."""

    __doc__ = save_pretrained_sorsa.__doc__

    def __init__(self, model: nn.Module, config_fn: ConfigFn):
        self.model, self.config_fn = model, config_fn

    def __call__(self, save_directory: str, *args, **kwargs) -> None:
        save_pretrained_sorsa(self.model, save_directory, *args, config_fn=self.config_fn, **kwargs)
