"""Training-loop hooks that apply the orthonormal regularizer the way sorsa 1.0.1 does:
after the task loss's backward (and any gradient clipping), before ``optimizer.step()``,
add the gradient of ``(gamma / lr) · reg`` to the adapters' grads.

The reference ships a 5,000-line forked ``transformers.Trainer`` for this; here it is a
plain-loop helper and a ``TrainerCallback``. Both read the *current* learning rate (the
reference divides by the initial ``args.learning_rate``), and skip a step whose learning
rate is 0 (warm-up start), where ``gamma / lr`` is undefined and the update is empty anyway.
"""
from __future__ import annotations

from typing import Callable, Optional, Union

import torch
import torch.nn as nn

from .regularizer import orthonormal_grad_

LrSource = Union[float, Callable[[], float], torch.optim.Optimizer]


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

    Args:
        model: the model (its ``sorsa_A`` / ``sorsa_B`` parameters are collected once, here).
        gamma: regularizer weight.
        lr: the current learning rate: an optimizer (its first param group is read), a
            callable, or a constant.
        squared, backend: as :func:`sorsa_kernels.orthonormal_grad_`.
    """

    def __init__(self, model: nn.Module, gamma: float, lr: LrSource, *, squared: bool = False, backend: str = "auto"):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        self.params = [(n, p) for n, p in model.named_parameters() if "sorsa_A" in n or "sorsa_B" in n]
        if not self.params:
            raise ValueError("model has no sorsa_A / sorsa_B parameters: apply_sorsa first")
        self.gamma, self.squared, self.backend = float(gamma), squared, backend
        self._lr = _lr_getter(lr)
        self.last_value: Optional[float] = None

    def step(self) -> Optional[float]:
        """Add the regularizer's gradient; returns its value (None when the lr is 0: skipped)."""
        lr = self._lr()
        if lr == 0.0:
            return None
        self.last_value = orthonormal_grad_(self.params, self.gamma, lr, squared=self.squared, backend=self.backend)
        return self.last_value

    __call__ = step


def SORSACallback(gamma: float, *, squared: bool = False, backend: str = "auto"):
    """A ``transformers.TrainerCallback`` applying the regularizer at the Trainer's
    pre-optimizer-step event (after clipping), with the scheduler's current learning rate.
    Imports transformers only when called. The last value is on ``callback.last_value``."""
    from transformers import TrainerCallback

    class _SORSACallback(TrainerCallback):
        def __init__(self):
            self.gamma, self.squared, self.backend = float(gamma), squared, backend
            self.last_value: Optional[float] = None

        def on_pre_optimizer_step(self, args, state, control, model=None, optimizer=None, lr_scheduler=None, **kw):
            if lr_scheduler is not None:
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
