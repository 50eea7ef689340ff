"""NaN/inf guard for every trainer: ``on_nan=stop`` raises ``NonFiniteLoss`` before the optimizer step
touches the weights; ``on_nan=skip`` drops that optimizer step's gradients and counts it.
"""

from __future__ import annotations

import logging
import math
from typing import Any

from transformers import TrainerCallback

from mistral_tune.compat.transformers import GradNormHooks, trainer_output_dir
from mistral_tune.core.errors import UserError

log = logging.getLogger(__name__)


class NonFiniteLoss(UserError):
    """The loss (or gradient norm) became NaN or inf and ``on_nan=stop``."""


def _finite(value: Any) -> bool:
    if value is None:
        return True
    if hasattr(value, "detach"):
        import torch

        return bool(torch.isfinite(value.detach()).all())
    return math.isfinite(float(value))


class _SkipBadStep(TrainerCallback):
    """Drops the gradients of a step flagged bad, right before ``optimizer.step()``."""

    def __init__(self, trainer: Any):
        self.trainer = trainer

    def on_pre_optimizer_step(self, args, state, control, optimizer=None, model=None, **kwargs):
        if self.trainer._bad_step is None:
            return control
        # With every .grad None, torch optimizers leave weights and moments untouched.
        (optimizer or self.trainer.optimizer).zero_grad(set_to_none=True)
        (model or self.trainer.model).zero_grad(set_to_none=True)
        step = state.global_step + 1
        self.trainer.nan_skipped_steps.append(step)
        log.warning("step %d: %s; skipped this optimizer step (on_nan=skip)", step, self.trainer._bad_step)
        self.trainer._bad_step = None
        return control


class NonFiniteLossMixin(GradNormHooks):
    """Trainer mixin applying ``on_nan`` (``stop`` or ``skip``) to NaN/inf losses and gradient norms."""

    on_nan = "stop"

    def __init__(self, *args, on_nan: str = "stop", **kwargs):
        super().__init__(*args, **kwargs)
        self.on_nan = on_nan
        self.nan_skipped_steps: list[int] = []
        self._bad_step: str | None = None
        self.add_callback(_SkipBadStep(self))

    def _flag(self, what: str) -> None:
        step = self.state.global_step + 1
        if self.on_nan == "stop":
            from mistral_tune.train.checkpoints import latest_complete

            last = latest_complete(trainer_output_dir(self))
            raise NonFiniteLoss(
                f"Training stopped at step {step}: the {what}. The weights were not updated with it; the last good "
                f"checkpoint is {last or 'none (no checkpoint saved yet)'}. Lower train.learning_rate, raise "
                "train.warmup_steps, check the data, or set on_nan=skip to skip such steps and count them."
            )
        self._bad_step = self._bad_step or what

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        if not _finite(loss):
            self._flag(f"loss is {float(loss.detach().float().mean())}")
        return loss

    def grad_norm_hook(self, model, grad_norm=None):
        grad_norm = self.hf_grad_norm(model, grad_norm)
        if self._bad_step is None and not _finite(grad_norm):
            self._flag(f"gradient norm is {float(grad_norm)}")
        return grad_norm
