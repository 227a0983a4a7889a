"""Training-loop hooks that apply the orthonormal regularizer the way sorsa 1.0.1 does:
after the task loss's backward (and any gradient clipping), before ``optimizer.step()``,
add the gradient of ``(gamma / lr) · reg`` to the adapters' grads.

The reference ships a 5,000-line forked ``transformers.Trainer`` for this; here it is a
``TrainerCallback`` (the plain-loop helper is :class:`sorsa_kernels.regularizer.SORSARegularizer`). By default both read the *current* learning
rate and skip a step whose learning rate is 0 (warm-up start), where ``gamma / lr`` is
undefined and the update is empty anyway. ``lr="initial"`` divides by the initial learning
rate instead, exactly as sorsa 1.0.1 does (its coefficient stays ``gamma / lr0`` for the whole
schedule).

Under DeepSpeed (any ZeRO stage) accelerate runs the engine's backward and step together inside
``accelerator.backward``, so the Trainer's pre-optimizer-step event comes after the update: the
callback instead runs when the engine calls its optimizer's ``step`` (see
:mod:`sorsa_kernels.integrations.deepspeed`). With ZeRO-1/2/3 that is before DeepSpeed's own
gradient clipping (which happens inside that step), so with ``max_grad_norm > 0`` the clipped norm
includes the regularizer's gradient; with ``max_grad_norm=0`` the update equals a plain Trainer's.
The logged ``grad_norm`` (DeepSpeed's) includes the regularizer's gradient too. One callback per
engine: a second one wrapping the same optimizer step (two callbacks, two Trainers) raises.
"""
from __future__ import annotations

import math
import warnings
from typing import List, Optional

import torch
import torch.nn as nn

from . import checkpoints
from ._zero3 import full_shape, is_partitioned
from .adapters import adapter_config
from .layer import named_sorsa_layers
from .regularizer import (adapter_group, any_zero_managed, check_gamma, collect_adapters, orthonormal_grad_,
                          unscale_once)


def trainable_non_adapters(model: nn.Module) -> List[str]:
    """Names of trainable parameters that are not SORSA adapters (e.g. embeddings, norms, lm_head
    left trainable after ``apply_sorsa``; trained biases of SORSA layers count too)."""
    return [n for n, p in model.named_parameters() if p.requires_grad and "sorsa_" not in n]


def warn_trainable_non_adapters(model: nn.Module, who: str) -> None:
    """Warn (once per call site) when ``model`` has SORSA layers and other trainable parameters."""
    names = trainable_non_adapters(model)
    if not names or not named_sorsa_layers(model):
        return
    params = dict(model.named_parameters())
    n_other = sum(math.prod(full_shape(params[n])) for n in names)
    total = sum(math.prod(full_shape(p)) for p in model.parameters())
    warnings.warn(f"{who}: {len(names)} parameter tensors besides the SORSA adapters are trainable "
                  f"({n_other:,d} values, {100 * n_other / max(total, 1):.1f}% of the model: "
                  f"{', '.join(names[:4])}{', ...' if len(names) > 4 else ''}) and will be trained; call "
                  f"sk.mark_only_sorsa_trainable(model) before training if that is not intended",
                  UserWarning, stacklevel=3)


def _adapters(model: Optional[nn.Module]) -> List[torch.Tensor]:
    return [] if model is None else collect_adapters(model)[0]


def SORSACallback(gamma: float, *, squared: bool = False, backend: str = "auto", lr: str = "current",
                  save: Optional[str] = None, warn_trainable: bool = True):
    """A ``transformers.TrainerCallback`` applying the regularizer at the Trainer's
    pre-optimizer-step event (after clipping; under DeepSpeed when the engine steps its optimizer,
    see the module docstring). ``lr="current"`` (default): the current learning rate
    of the optimizer's param group that holds the adapters (the first such group);
    ``lr="initial"``: ``args.learning_rate``, as sorsa 1.0.1's Trainer does. Imports transformers only when called. The last value (a 0-d tensor) is
    on ``callback.last_value``.

    ``save``: the form of every checkpoint the Trainer writes (``save_model`` and periodic
    ones; see :mod:`sorsa_kernels.checkpoints`): ``"full"`` (the default of SORSA models:
    merged weights that any ``from_pretrained`` loads, plus what a resume needs; for a 4-bit
    model the packed residuals instead, loadable only by a resume or ``load_state_dict``) or
    ``"adapter"`` (adapter-only, like PEFT); None keeps the model's setting. (``"merged"`` is
    refused here: such checkpoints cannot be resumed.) ``warn_trainable``: warn at the start of training when parameters
    other than the adapters are trainable (embeddings, norms, ``lm_head`` after ``apply_sorsa``
    without :func:`sorsa_kernels.mark_only_sorsa_trainable`)."""
    from transformers import TrainerCallback

    gamma = check_gamma(gamma)
    if lr not in ("current", "initial"):
        raise ValueError(f"lr must be 'current' or 'initial', got {lr!r}")
    if save is not None:
        try:
            checkpoints.check_format(save)
        except ValueError:
            raise ValueError(f"save must be one of {checkpoints.FORMATS} or None, got {save!r}") from None
        if save == "merged":  # a resume would load merged weights as W_r and add the adapters again
            raise ValueError("save='merged' would make checkpoints a Trainer cannot resume from; the default "
                             "'full' checkpoints of full-precision models load with any from_pretrained too. For a deployment copy call "
                             "model.save_pretrained(path, sorsa_format='merged') after training")

    class _SORSACallback(TrainerCallback):
        def __init__(self):
            self.gamma, self.squared, self.backend, self.lr_mode = gamma, squared, backend, lr
            self.last_value: Optional[torch.Tensor] = None
            self._undo_deepspeed = None  # set while the DeepSpeed engine's optimizer step runs the regularizer

        def on_init_end(self, args, state, control, model=None, **kw):
            if not hasattr(TrainerCallback, "on_pre_optimizer_step"):  # added in transformers 4.45
                import transformers
                raise RuntimeError(f"SORSACallback needs transformers >= 4.45 (the Trainer's pre-optimizer-step "
                                   f"event), this is {transformers.__version__}: upgrade it, or use "
                                   f"sorsa_kernels.compat.SORSATrainer, which also runs on older versions")
            if model is not None:
                checkpoints.install(model, adapter_config, save)
            return control

        def on_train_begin(self, args, state, control, model=None, optimizer=None, **kw):
            if self._undo_deepspeed is not None:  # a previous train() that ended in an exception
                self._undo_deepspeed()
                self._undo_deepspeed = None
            if model is not None:
                from .integrations.deepspeed import engine_optimizer, link_optimizer, run_before_step
                ds_opt = engine_optimizer(optimizer)
                if ds_opt is not None:  # every rank: the step it wraps is collective under ZeRO-3
                    link_optimizer(ds_opt, _adapters(model))  # the Trainer hands callbacks the module
                    # raises when another callback / Trainer already runs the regularizer there
                    self._undo_deepspeed = run_before_step(ds_opt, lambda: self._deepspeed_step(args, model, ds_opt))
                elif any_zero_managed(model.parameters()):  # the pre-optimizer-step event would come too late
                    raise RuntimeError(f"SORSACallback: the model's parameters are managed by DeepSpeed ZeRO but the "
                                       f"Trainer's optimizer is a {type(optimizer).__name__}, not accelerate's "
                                       f"DeepSpeedOptimizerWrapper, so the regularizer cannot reach the engine's step; "
                                       f"call sk.orthonormal_grad_ between engine.backward and engine.step instead")
            if model is None or not state.is_world_process_zero:
                return control
            if warn_trainable:
                warn_trainable_non_adapters(model, "SORSACallback")
            # a ZeRO-3 partitioned S is not checked: reading it is a collective, and this runs on rank 0 only
            zero = [n for n, m in named_sorsa_layers(model)
                    if not is_partitioned(m.sorsa_S) and not m.sorsa_S.detach().any()]
            if zero:  # apply_sorsa(init=None) / sorsa 1.0.1 without sorsa_init(): nothing would train
                warnings.warn(f"SORSACallback: {len(zero)} SORSA layers have all-zero adapters ({zero[0]}, ...): "
                              f"their A and B get no gradient, so training changes nothing there; initialise them "
                              f"first (apply_sorsa's init=, model.sorsa_init(), or sk.load_adapter)",
                              UserWarning, stacklevel=2)
            return control

        def on_train_end(self, args, state, control, **kw):
            if self._undo_deepspeed is not None:
                self._undo_deepspeed()
                self._undo_deepspeed = None
            return control

        def _deepspeed_step(self, args, model, ds_opt) -> None:
            from .integrations.deepspeed import adapter_lr
            lr = float(args.learning_rate) if self.lr_mode == "initial" else adapter_lr(ds_opt, _adapters(model))
            if lr != 0.0:  # the lr this step uses: DeepSpeed steps its scheduler after the optimizer
                self.last_value = orthonormal_grad_(model, self.gamma, lr, squared=self.squared, backend=self.backend)

        def on_pre_optimizer_step(self, args, state, control, model=None, optimizer=None, lr_scheduler=None, **kw):
            if self._undo_deepspeed is not None:  # the engine's step already ran the regularizer
                return control
            if self.lr_mode == "initial":
                lr = float(args.learning_rate)
            elif optimizer is not None:  # the adapters' group: another one may have its own lr
                lr = float(optimizer.param_groups[adapter_group(optimizer.param_groups, _adapters(model))]["lr"])
            elif lr_scheduler is not None:
                lr = float(lr_scheduler.get_last_lr()[0])
            else:
                lr = float(args.learning_rate)
            if model is None or lr == 0.0:
                return control
            scaler = getattr(optimizer, "scaler", None)  # accelerate's AcceleratedOptimizer under fp16
            if scaler is not None:  # clipping unscales; without it (max_grad_norm=0) the grads are still scaled
                unscale_once(scaler, optimizer.optimizer)
            v = orthonormal_grad_(model, self.gamma, lr, squared=self.squared, backend=self.backend)
            self.last_value = v
            return control

    return _SORSACallback()
