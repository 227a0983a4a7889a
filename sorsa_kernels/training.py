"""Training-loop hooks that apply the orthonormal regularizer the way sorsa 1.0.1 does:
after the task loss's backward (and any gradient clipping), before ``optimizer.step()``,
add the gradient of ``(gamma / lr) · reg`` to the adapters' grads.

The reference ships a 5,000-line forked ``transformers.Trainer`` for this; here it is a
plain-loop helper and a ``TrainerCallback``. By default both read the *current* learning
rate and skip a step whose learning rate is 0 (warm-up start), where ``gamma / lr`` is
undefined and the update is empty anyway. ``lr="initial"`` divides by the initial learning
rate instead, exactly as sorsa 1.0.1 does (its coefficient stays ``gamma / lr0`` for the whole
schedule).
"""
from __future__ import annotations

from typing import Callable, Optional, Union

import torch
import torch.nn as nn

from .regularizer import _adapters, _any_dtensor, _check_gamma, _check_lr, _grad_step, orthonormal_grad_

LrSource = Union[float, Callable[[], float], torch.optim.Optimizer, str]


def _initial_lr(optimizer: torch.optim.Optimizer) -> float:
    """The first param group's learning rate before any scheduler touched it (schedulers
    record it as ``initial_lr``)."""
    g = optimizer.param_groups[0]
    return float(g.get("initial_lr", g["lr"]))


def _lr_getter(lr: LrSource) -> Callable[[], float]:
    if isinstance(lr, torch.optim.Optimizer):
        return lambda: float(lr.param_groups[0]["lr"])
    if callable(lr):
        return lambda: float(lr())
    if isinstance(lr, (int, float)) and not isinstance(lr, bool):
        return lambda: float(lr)
    raise TypeError(f"lr must be a float, a callable returning the current lr, or an optimizer; got {type(lr).__name__}")


class SORSARegularizer:
    """Apply the orthonormal regularizer in a plain training loop::

        reg = sk.SORSARegularizer(model, gamma=4e-4, lr=optimizer)
        loss.backward(); clip_grad_norm_(...); reg.step(); optimizer.step()

    With mixed precision (``torch.amp.GradScaler``)::

        reg = sk.SORSARegularizer(model, gamma=4e-4, lr=optimizer, scaler=scaler)
        scaler.scale(loss).backward(); reg.step(); scaler.step(optimizer); scaler.update()

    ``step`` then unscales the optimizer's grads first (``scaler.unscale_``, unless already
    done this iteration), so the regularizer's gradient is not divided by the loss scale.

    Args:
        model: the model (its ``sorsa_A`` / ``sorsa_B`` parameters are collected once, here).
        gamma: regularizer weight (finite).
        lr: the learning rate: an optimizer (its first param group's current lr), a callable,
            a constant, or ``"initial"``: the optimizer's initial lr (``initial_lr`` as recorded
            by its scheduler, else its lr at construction), which reproduces sorsa 1.0.1's
            ``gamma / lr0`` exactly; needs ``optimizer=`` unless ``lr`` is one.
        squared, backend: as :func:`sorsa_kernels.orthonormal_grad_`.
        scaler: a ``GradScaler`` whose scaled grads must be unscaled before the step.
        optimizer: the optimizer owning the adapters (for ``lr="initial"`` and ``scaler``).
    """

    def __init__(self, model: nn.Module, gamma: float, lr: LrSource, *, squared: bool = False, backend: str = "auto",
                 scaler=None, optimizer: Optional[torch.optim.Optimizer] = None):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        self.params = [(n, p) for n, p in model.named_parameters() if "sorsa_A" in n or "sorsa_B" in n]
        if not self.params:
            raise ValueError("model has no sorsa_A / sorsa_B parameters: apply_sorsa first")
        # collected once: a step then does no per-parameter name matching or DTensor scan
        self._mats, self._is_b = _adapters(self.params)
        self._plain = not _any_dtensor(self._mats)
        self.gamma, self.squared, self.backend = _check_gamma(gamma), squared, backend
        if optimizer is None and isinstance(lr, torch.optim.Optimizer):
            optimizer = lr
        if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if scaler is not None:
            if not hasattr(scaler, "unscale_"):
                raise TypeError(f"scaler must be a torch.amp.GradScaler, got {type(scaler).__name__}")
            if optimizer is None:
                raise ValueError("scaler= needs the optimizer (pass lr=optimizer or optimizer=) to unscale its grads "
                                 "before the regularizer's gradient is added")
        self.scaler, self.optimizer = scaler, optimizer
        if isinstance(lr, str):
            if lr != "initial":
                raise ValueError(f"lr must be a float, a callable, an optimizer or 'initial', got {lr!r}")
            if optimizer is None:
                raise ValueError("lr='initial' needs the optimizer: pass optimizer=")
            lr0 = _initial_lr(optimizer)
            self._lr = lambda: lr0
        else:
            self._lr = _lr_getter(lr)
        self.last_value: Optional[torch.Tensor] = None

    def _unscale(self) -> None:
        from torch.amp.grad_scaler import OptState
        if not self.scaler.is_enabled():
            return
        state = self.scaler._per_optimizer_states[id(self.optimizer)]
        if state["stage"] is OptState.READY:
            self.scaler.unscale_(self.optimizer)
        elif state["stage"] is OptState.STEPPED:
            raise RuntimeError("SORSARegularizer.step() after scaler.step(optimizer): call it before the optimizer step")

    def step(self) -> Optional[torch.Tensor]:
        """Add the regularizer's gradient; returns its value as a 0-d tensor (no host sync),
        or None when the lr is 0 (skipped)."""
        lr = self._lr()
        if lr == 0.0:
            return None
        if self.scaler is not None:
            self._unscale()
        self.last_value = _grad_step(self._mats, self._is_b, self.gamma, _check_lr(lr), self.squared, self.backend,
                                     plain=self._plain)
        return self.last_value

    __call__ = step


def SORSACallback(gamma: float, *, squared: bool = False, backend: str = "auto", lr: str = "current"):
    """A ``transformers.TrainerCallback`` applying the regularizer at the Trainer's
    pre-optimizer-step event (after clipping). ``lr="current"`` (default): the scheduler's
    current learning rate; ``lr="initial"``: ``args.learning_rate``, as sorsa 1.0.1's
    Trainer does. Imports transformers only when called. The last value (a 0-d tensor) is
    on ``callback.last_value``."""
    from transformers import TrainerCallback

    gamma = _check_gamma(gamma)
    if lr not in ("current", "initial"):
        raise ValueError(f"lr must be 'current' or 'initial', got {lr!r}")

    class _SORSACallback(TrainerCallback):
        def __init__(self):
            self.gamma, self.squared, self.backend, self.lr_mode = gamma, squared, backend, lr
            self.last_value: Optional[torch.Tensor] = None

        def on_pre_optimizer_step(self, args, state, control, model=None, optimizer=None, lr_scheduler=None, **kw):
            if self.lr_mode == "initial":
                lr = float(args.learning_rate)
            elif lr_scheduler is not None:
                lr = float(lr_scheduler.get_last_lr()[0])
            elif optimizer is not None:
                lr = float(optimizer.param_groups[0]["lr"])
            else:
                lr = float(args.learning_rate)
            if model is None or lr == 0.0:
                return control
            v = orthonormal_grad_(model, self.gamma, lr, squared=self.squared, backend=self.backend)
            self.last_value = v
            return control

    return _SORSACallback()
