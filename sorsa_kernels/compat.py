"""sorsa 1.0.1's Hugging Face API on this package: change ``from sorsa import ...`` to
``from sorsa_kernels.compat import ...`` and a script written for sorsa 1.0.1 runs unchanged.

``SORSAConfig``, ``SORSAModel``, ``SORSATrainingArguments``, ``SORSATrainer``, ``Linear`` (also
``SORSALinear``) and ``calc_ortho`` take sorsa 1.0.1's arguments and keep its behaviour:

* ``SORSAModel(config)`` loads ``config.base_model_name_or_path`` with ``AutoModelForCausalLM``
  (``trust_remote_code=True``, in torch's default dtype, as sorsa does under transformers 4.x;
  transformers 5 would otherwise pick the checkpoint's dtype) into ``.model`` and replaces every
  ``nn.Linear`` whose qualified name (``model.model.layers.0.self_attn.q_proj``) contains a target
  by a :class:`~sorsa_kernels.SORSALinear` with zero adapters; ``sorsa_init()`` initialises them
  from the exact SVD. Other parameters keep ``requires_grad`` (``set_trainable()`` freezes them).
* ``save_pretrained`` (transformers' own) writes sorsa 1.0.1's directory: ``config.json`` (the
  ``SORSAConfig``) and ``model.safetensors`` (sharded with an index, or ``pytorch_model.bin``),
  keys ``model.<name>.weight`` = ``W_r``, ``.sorsa_A``, ``.sorsa_S``, ``.sorsa_B`` and every other
  parameter of the wrapped model. ``SORSAModel.from_pretrained`` reads all four file layouts.
* ``SORSATrainer`` is the stock ``transformers.Trainer`` with :func:`sorsa_kernels.SORSACallback`
  (``lr="initial"``): after the task loss's backward and gradient clipping, before the optimizer
  step, the adapters' grads get the gradient of ``(gamma / args.learning_rate) · calc_ortho``,
  and each training log gets ``orthonormality`` (the last ``calc_ortho`` value), as sorsa's
  forked Trainer does.

Importing this module needs transformers (4.42 or later, 5 included); ``import sorsa_kernels``
does not import it.
"""
from __future__ import annotations

import inspect
import json
import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Set, Union

import torch
import torch.nn as nn

try:
    import transformers
    from transformers import AutoModelForCausalLM, PretrainedConfig, PreTrainedModel, Trainer, TrainerCallback
    from transformers import TrainingArguments
except ImportError as e:  # pragma: no cover - transformers is a test dependency
    raise ImportError("sorsa_kernels.compat needs transformers >= 4.42: pip install 'sorsa-kernels[hf]'") from e

from ._validate import check_dropout_p
from .init import init_layers
from .layer import SORSALinear, _check_init_args, check_alpha
from .model import apply_sorsa, mark_only_sorsa_trainable, merge_sorsa, sorsa_layers, sorsa_parameters
from .model import target_matcher, unmerge_sorsa
from .regularizer import calc_ortho, check_gamma
from .training import SORSACallback

__all__ = ["SORSAConfig", "SORSAModel", "SORSATrainingArguments", "SORSATrainer", "Linear", "SORSALinear",
           "calc_ortho"]

#: sorsa 1.0.1's ``sorsa.layer.Linear`` (same arguments, parameters and state dict)
Linear = SORSALinear

# transformers 5 renamed from_pretrained's torch_dtype to dtype (torch_dtype warns there)
_DTYPE_KW = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
# the file layouts PreTrainedModel.save_pretrained writes, in transformers' order of preference
_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                 "pytorch_model.bin.index.json")
_HUB_KWARGS = ("revision", "token", "cache_dir", "local_files_only", "force_download")
# transformers 5 names checkpointing "activation checkpointing" (and hooks the embeddings itself)
_ACTIVATION_CKPT = hasattr(PreTrainedModel, "activation_checkpointing_enable")


class SORSAConfig(PretrainedConfig):
    """sorsa 1.0.1's configuration of a :class:`SORSAModel`.

    Args:
        base_model_name_or_path: hub id or local directory of the causal LM to wrap.
        rank: adapter rank (>= 1).
        alpha: ``scale = alpha / rank``; None gives scale 1.
        dropout: dropout probability on the adapter branch's input, in [0, 1).
        target_modules: names (a list, or a dict whose values are names): every ``nn.Linear`` whose
            qualified name in the ``SORSAModel`` contains one is replaced (sorsa's substring rule).
        kwargs: ``PretrainedConfig``'s.
    """

    model_type = "sorsa"

    def __init__(
        self,
        base_model_name_or_path: Optional[str] = None,
        rank: int = 4,
        alpha: Optional[float] = None,
        dropout: float = 0.0,
        target_modules: Union[List[str], Dict[str, str]] = ["query", "key", "value"],  # noqa: B006 (sorsa's default)
        **kwargs,
    ):
        super().__init__(**kwargs)
        if isinstance(rank, bool) or not isinstance(rank, int):
            raise TypeError(f"rank must be an int >= 1, got {rank!r}")
        if rank < 1:
            raise ValueError(f"rank must be >= 1, got {rank}")
        if base_model_name_or_path is not None and not isinstance(base_model_name_or_path, (str, os.PathLike)):
            raise TypeError(f"base_model_name_or_path must be a str (hub id or directory), got "
                            f"{base_model_name_or_path!r}")
        target_matcher(target_modules)  # raises naming target_modules when it is not names
        self.base_model_name_or_path = None if base_model_name_or_path is None else os.fspath(base_model_name_or_path)
        self.rank = rank
        self.alpha = check_alpha(alpha)
        self.dropout = check_dropout_p(dropout, "dropout")
        # a copy: the default list must not be shared between configs
        self.target_modules = dict(target_modules) if isinstance(target_modules, dict) else (
            [target_modules] if isinstance(target_modules, str) else list(target_modules))


class SORSAModel(PreTrainedModel):
    """sorsa 1.0.1's wrapper of a Hugging Face causal LM (``.model``) with SORSA layers.

    ``forward`` and ``generate`` are the wrapped model's. See the module docstring for what
    construction and ``save_pretrained`` do.
    """

    config_class = SORSAConfig
    # sorsa_kernels.checkpoints leaves this class's save_pretrained alone: it writes sorsa 1.0.1's W_r
    # form (which sorsa loads), not the merged weights other models get for the stock from_pretrained
    _sorsa_keeps_save_pretrained = True

    def __init__(self, config: SORSAConfig):
        if not isinstance(config, SORSAConfig):
            raise TypeError(f"config must be a SORSAConfig, got {type(config).__name__}")
        if config.base_model_name_or_path is None:
            raise ValueError("config.base_model_name_or_path must name the model to wrap (a hub id or a "
                             "directory), got None")
        # no post_init(): under transformers 5 it initialises weights, which would overwrite the loaded ones
        super().__init__(config)
        self.config = config
        self.model = AutoModelForCausalLM.from_pretrained(
            config.base_model_name_or_path, trust_remote_code=True, **{_DTYPE_KW: torch.get_default_dtype()})
        # on the wrapper, so names carry the "model." prefix sorsa 1.0.1 matches its targets against
        apply_sorsa(self, config.target_modules, r=config.rank, alpha=config.alpha, dropout=config.dropout,
                    init=None)

    def forward(self, input_ids=None, attention_mask=None, labels=None, **kwargs):
        """The wrapped model's forward. Named arguments (not ``*args``) so that the Trainer finds
        ``labels`` (eval loss, ``label_names``) and keeps the dataset's columns."""
        return self.model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, **kwargs)

    # the Trainer counts a batch's loss tokens by loss_type (shifted labels for causal LMs): the
    # wrapper's class name would give none, and a loss off by a factor (n-1)/n per sequence
    @property
    def loss_type(self):
        inner = self.__dict__.get("_modules", {}).get("model")
        return getattr(inner, "loss_type", None) if inner is not None else self.__dict__.get("_loss_type")

    @loss_type.setter
    def loss_type(self, value) -> None:  # PreTrainedModel.__init__ sets it from the class name
        self.__dict__["_loss_type"] = value

    def generate(self, *args, **kwargs):
        """The wrapped model's ``generate`` (sorsa 1.0.1's wrapper has none of its own)."""
        return self.model.generate(*args, **kwargs)

    def get_input_embeddings(self) -> nn.Module:
        return self.model.get_input_embeddings()

    def get_output_embeddings(self) -> Optional[nn.Module]:
        return self.model.get_output_embeddings()

    # the Trainer enables checkpointing on the model it is given: pass it on to the wrapped model
    def gradient_checkpointing_enable(self, *args, **kwargs) -> None:
        """The wrapped model's (``TrainingArguments(gradient_checkpointing=True)`` calls it)."""
        self.model.gradient_checkpointing_enable(*args, **kwargs)
        if not _ACTIVATION_CKPT:
            # transformers 4 checkpoints reentrantly: no gradient flows through a block whose input
            # does not require grad, as with frozen embeddings after set_trainable()
            self.model.enable_input_require_grads()

    def gradient_checkpointing_disable(self) -> None:
        self.model.gradient_checkpointing_disable()
        if not _ACTIVATION_CKPT:
            self.model.disable_input_require_grads()

    if _ACTIVATION_CKPT:
        def activation_checkpointing_enable(self, *args, **kwargs) -> None:
            """The wrapped model's (the Trainer calls it for ``gradient_checkpointing=True``)."""
            self.model.activation_checkpointing_enable(*args, **kwargs)

        def activation_checkpointing_disable(self) -> None:
            self.model.activation_checkpointing_disable()

    def sorsa_init(self, weight_dtype: Optional[torch.dtype] = None, adapter_dtype: Optional[torch.dtype] = None,
                   method: str = "svd", **svd_kwargs) -> None:
        """Initialise every SORSA layer from the SVD of its weight (``method="svd"``: exact, as
        sorsa 1.0.1; ``"rsvd"`` with :func:`sorsa_kernels.rsvd`'s keywords: randomized, batched).

        Args:
            weight_dtype: dtype of ``weight`` (``W_r``) afterwards; default: unchanged.
            adapter_dtype: dtype of A, S, B; default: ``weight_dtype``.
        """
        _check_init_args(method, svd_kwargs)
        layers = list(sorsa_layers(self))
        if method != "svd":
            svd_kwargs.setdefault("seed", 0)
        init_layers(layers, method, weight_dtype, adapter_dtype, **svd_kwargs)
        for layer in layers:
            layer.init_config = {"method": method, **svd_kwargs}

    def merge(self, mode: bool = True) -> None:
        """Fold every adapter into its weight (``mode=True``) or take it out again (False)."""
        if mode not in (True, False):  # sorsa tests truthiness; a str here is a mistake, not a mode
            raise TypeError(f"mode must be a bool (True: merge, False: unmerge), got {mode!r}")
        (merge_sorsa if mode else unmerge_sorsa)(self)

    def get_parameters(self) -> List[nn.Parameter]:
        """Every parameter whose name contains ``sorsa_``."""
        return sorsa_parameters(self)

    def set_trainable(self, mode: bool = True) -> None:
        """``requires_grad = mode`` for the ``sorsa_`` parameters, False for every other one."""
        if mode not in (True, False):
            raise TypeError(f"mode must be a bool, got {mode!r}")
        mark_only_sorsa_trainable(self)
        if not mode:
            for p in sorsa_parameters(self):
                p.requires_grad = False

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: Union[str, os.PathLike], *model_args,
                        config: Optional[SORSAConfig] = None, **kwargs) -> "SORSAModel":
        """Load a directory (or hub repository) written by ``save_pretrained`` here or by sorsa
        1.0.1: the base model is loaded as in ``SORSAModel(config)``, then every tensor of the
        checkpoint is copied in, shard by shard. Returns the model in eval mode.

        Args:
            pretrained_model_name_or_path: the directory, or a hub repository id.
            config: a :class:`SORSAConfig` to use instead of the directory's ``config.json``.
            torch_dtype / dtype: cast the loaded model to this dtype.
            revision, token, cache_dir, local_files_only, force_download: for a hub repository.
        """
        if model_args:
            raise TypeError(f"SORSAModel.from_pretrained takes one positional argument (the path), got "
                            f"{1 + len(model_args)}")
        dtype = kwargs.pop("torch_dtype", None)
        dtype = kwargs.pop("dtype", None) if dtype is None else dtype
        if dtype is not None and not isinstance(dtype, torch.dtype):
            raise TypeError(f"torch_dtype must be a torch.dtype, got {dtype!r}")
        hub = {k: kwargs.pop(k) for k in _HUB_KWARGS if k in kwargs}
        if kwargs:
            raise TypeError(f"SORSAModel.from_pretrained does not take {sorted(kwargs)}; it takes config=, "
                            f"torch_dtype= (or dtype=) and, for a hub repository, {list(_HUB_KWARGS)}")
        path = os.fspath(pretrained_model_name_or_path)
        if not os.path.isdir(path):
            from huggingface_hub import snapshot_download
            path = snapshot_download(path, allow_patterns=["*.json", "*.safetensors", "*.bin"], **hub)
        if config is None:
            config = SORSAConfig.from_pretrained(path)
        elif not isinstance(config, SORSAConfig):
            raise TypeError(f"config must be a SORSAConfig, got {type(config).__name__}")
        files = _checkpoint_files(path)  # before loading the base: a wrong directory fails fast
        model = cls(config)
        _load_files(model, files)
        if dtype is not None:
            model.to(dtype)
        model.eval()
        return model


def _checkpoint_files(path: str) -> List[str]:
    """The weight files of a ``save_pretrained`` directory (one file, or the shards of an index)."""
    for name in _WEIGHT_FILES:
        f = os.path.join(path, name)
        if not os.path.isfile(f):
            continue
        if not name.endswith(".index.json"):
            return [f]
        with open(f) as fh:
            weight_map = json.load(fh).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"{f} has no weight_map (a transformers shard index maps tensor names to files)")
        return [os.path.join(path, s) for s in sorted(set(weight_map.values()))]
    raise FileNotFoundError(f"{path} holds none of {list(_WEIGHT_FILES)} (what SORSAModel.save_pretrained "
                            f"writes); it has {sorted(os.listdir(path))}")


def _read(f: str) -> Dict[str, torch.Tensor]:
    if f.endswith(".safetensors"):
        from safetensors.torch import load_file
        return load_file(f)
    return torch.load(f, map_location="cpu", weights_only=True)


@torch.no_grad()
def _load_files(model: nn.Module, files: List[str]) -> None:
    """Copy every tensor of ``files`` into ``model`` (one file in memory at a time). Raises naming
    the keys when a tensor has no place in the model or a model tensor is in no file (a weight tied
    to a loaded one, like ``lm_head.weight`` to the embedding, needs no copy of its own)."""
    loaded: Set[str] = set()
    unexpected: List[str] = []
    for f in files:
        sd = _read(f)
        unexpected += model.load_state_dict(sd, strict=False).unexpected_keys
        loaded.update(sd)
        del sd
    tied: Dict[int, Set[str]] = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        tied.setdefault(id(p), set()).add(n)
    missing = [k for k in model.state_dict() if k not in loaded and not any(
        n in loaded for n in tied.get(id(_tensor(model, k)), ()))]
    if unexpected or missing:
        raise ValueError(f"the checkpoint does not fit the model built from its config: "
                         f"{len(missing)} model tensors not in the checkpoint {missing[:10]}, "
                         f"{len(unexpected)} checkpoint tensors not in the model {unexpected[:10]}")


def _tensor(model: nn.Module, key: str):
    mod_name, _, attr = key.rpartition(".")
    return getattr(model.get_submodule(mod_name) if mod_name else model, attr)


@dataclass
class SORSATrainingArguments(TrainingArguments):
    """``TrainingArguments`` plus sorsa 1.0.1's ``gamma`` (the regularizer's weight, >= 0; the
    trainer scales it by ``1 / learning_rate``). ``remove_unused_columns`` is always False, as in
    sorsa: ``SORSAModel.forward`` takes ``**kwargs``, so the Trainer could not tell which columns
    it uses."""

    gamma: float = field(default=0.0, metadata={"help": "SORSA's gamma hyperparameter"})

    def __post_init__(self):
        self.gamma = check_gamma(self.gamma)
        super().__post_init__()
        self.remove_unused_columns = False


def _has_pre_optimizer_event() -> bool:
    """Whether the Trainer fires ``on_pre_optimizer_step`` (after clipping, before the step):
    transformers 4.45 and later. Before that the regularizer runs from an optimizer step pre-hook."""
    return hasattr(TrainerCallback, "on_pre_optimizer_step")


_TRAINER_PARAMS = frozenset(inspect.signature(Trainer.__init__).parameters)


class SORSATrainer(Trainer):
    """sorsa 1.0.1's ``SORSATrainer``: the stock ``transformers.Trainer`` whose every optimizer
    step first adds the gradient of ``(args.gamma / args.learning_rate) · calc_ortho(model)`` to
    the adapters' grads (after clipping), and whose training logs carry ``orthonormality``.

    Takes ``Trainer``'s arguments; ``args`` must be a :class:`SORSATrainingArguments`. sorsa's
    ``tokenizer=`` is passed on as ``processing_class=`` where the Trainer no longer takes it. The
    :func:`sorsa_kernels.SORSACallback` doing the work is ``trainer.sorsa_callback``.
    """

    def __init__(self, *args, **kwargs):
        if "tokenizer" in kwargs and "tokenizer" not in _TRAINER_PARAMS:
            kwargs["processing_class"] = kwargs.pop("tokenizer")
        super().__init__(*args, **kwargs)
        if not hasattr(self.args, "gamma"):
            raise TypeError(f"args must be a SORSATrainingArguments (it carries gamma), got "
                            f"{type(self.args).__name__}")
        self.sorsa_callback = SORSACallback(self.args.gamma, lr="initial")
        self._sorsa_hook = None
        if _has_pre_optimizer_event():
            self.add_callback(self.sorsa_callback)

    def create_optimizer(self, *args, **kwargs):
        optimizer = super().create_optimizer(*args, **kwargs)
        if not _has_pre_optimizer_event():
            # the pre-hook runs inside optimizer.step(): after clipping, once per update
            if self._sorsa_hook is not None:
                self._sorsa_hook.remove()
            self._sorsa_hook = optimizer.register_step_pre_hook(self._sorsa_pre_step)
        return optimizer

    def _sorsa_pre_step(self, optimizer, args, kwargs) -> None:
        self.sorsa_callback.on_pre_optimizer_step(self.args, self.state, self.control, model=self.model,
                                                  optimizer=self.optimizer, lr_scheduler=self.lr_scheduler)

    def log(self, logs: Dict[str, float], *args, **kwargs) -> None:
        if "loss" in logs:  # a training log (sorsa logs 0 before any regularizer step)
            v = self.sorsa_callback.last_value
            logs["orthonormality"] = float(v) if v is not None else 0.0
        return super().log(logs, *args, **kwargs)
