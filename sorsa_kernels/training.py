"""Training-loop hooks that apply the orthonormal regularizer the way sorsa 1.0.1 does:
after the task loss's backward (and any gradient clipping), before ``optimizer.step()``,
add the gradient of ``(gamma / lr) · reg`` to the adapters' grads.

The reference ships a 5,000-line forked ``transformers.Trainer`` for this; here it is a
``TrainerCallback`` (the plain-loop helper is :class:`sorsa_kernels.regularizer.SORSARegularizer`). By default both read the *current* learning
rate and skip a step whose learning rate is 0 (warm-up start), where ``gamma / lr`` is
undefined and the update is empty anyway. ``lr="initial"`` divides by the initial learning
rate instead, exactly as sorsa 1.0.1 does (its coefficient stays ``gamma / lr0`` for the whole
schedule).
"""
from __future__ import annotations

from typing import Optional

import torch

from .regularizer import check_gamma, orthonormal_grad_


def SORSACallback(gamma: float, *, squared: bool = False, backend: str = "auto", lr: str = "current"):
    """A ``transformers.TrainerCallback`` applying the regularizer at the Trainer's
    pre-optimizer-step event (after clipping). ``lr="current"`` (default): the scheduler's
    current learning rate; ``lr="initial"``: ``args.learning_rate``, as sorsa 1.0.1's
    Trainer does. Imports transformers only when called. The last value (a 0-d tensor) is
    on ``callback.last_value``."""
    from transformers import TrainerCallback

    gamma = check_gamma(gamma)
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
