"""Stop training safely: on SIGTERM/SIGINT (save a checkpoint, exit), and on a NaN/inf loss (stop or skip).

Cluster schedulers preempt a job with SIGTERM and a grace period before SIGKILL. ``GracefulStop``
turns the first SIGTERM or SIGINT into "finish this optimizer step, save a checkpoint, stop";
a second one of the same kind falls back to the default action (kill or KeyboardInterrupt).

``NonFiniteLossMixin`` checks every micro-batch loss and the gradient norm. ``on_nan=stop`` raises
``NonFiniteLoss`` naming the step before the optimizer touches the weights, so the last checkpoint
stays the last good one. ``on_nan=skip`` drops the gradients of that optimizer step instead (the
weights and optimizer moments stay as they were) and counts it.
"""

from __future__ import annotations

import logging
import math
import signal
from typing import Any

from transformers import TrainerCallback

from .errors import UserError

log = logging.getLogger(__name__)

HANDLED_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class TrainingInterrupted(Exception):
    """Training stopped on a signal after saving a checkpoint; ``exit_code`` is 128 + the signal number."""

    def __init__(self, signum: int, step: int, checkpoint: str | None, run_dir: str):
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        self.exit_code = 128 + signum
        name = signal.Signals(signum).name
        super().__init__(
            f"Stopped by {name} at step {step}; checkpoint saved to {checkpoint}. Continue with the same command "
            f"plus resume=auto output_dir={run_dir}."
        )


class NonFiniteLoss(UserError):
    """The loss (or gradient norm) became NaN or inf and ``on_nan=stop``."""


class GracefulStop(TrainerCallback):
    """Installs SIGTERM/SIGINT handlers; at the next optimizer-step boundary saves and stops."""

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def install(self) -> GracefulStop:
        for sig in HANDLED_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum, frame):
        if self.signum == signum:  # asked twice: stop waiting for the step to finish
            signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))
            signal.raise_signal(signum)
            return
        self.signum = signum
        log.warning("%s received: saving a checkpoint after this step, then stopping", signal.Signals(signum).name)

    def on_step_end(self, args, state, control, **kwargs):
        if self._requested(args):
            control.should_save = True
            control.should_training_stop = True
        return control

    def _requested(self, args) -> bool:
        if args.world_size <= 1:
            return self.signum is not None
        # Every rank must stop at the same step, or the next collective would hang.
        import torch
        import torch.distributed as dist

        flag = torch.tensor([1 if self.signum is not None else 0], device=args.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item() and self.signum is None:
            self.signum = signal.SIGTERM
        return bool(flag.item())


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


class NonFiniteLossMixin:
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
            from .checkpoints import latest_complete

            last = latest_complete(self._get_output_dir(None))
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

    def _get_grad_norm(self, model, grad_norm=None):
        grad_norm = super()._get_grad_norm(model, grad_norm=grad_norm)
        if self._bad_step is None and not _finite(grad_norm):
            self._flag(f"gradient norm is {float(grad_norm)}")
        return grad_norm


def train_guarded(trainer: Any, stop: GracefulStop, resume_from: Any = None):
    """``trainer.train()`` with the signal handlers installed; raises ``TrainingInterrupted`` after a signal."""
    from pathlib import Path

    from .checkpoints import latest_complete

    stop.install()
    try:
        result = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    finally:
        stop.uninstall()
    if stop.signum is not None and trainer.state.global_step < trainer.state.max_steps:
        root = Path(trainer.args.output_dir)
        raise TrainingInterrupted(stop.signum, trainer.state.global_step, str(latest_complete(root)), str(root.parent))
    return result


def stopped_summary(cfg: Any, trainer: Any, exc: Exception, data: dict, resume_from: Any, seconds: float) -> dict:
    """summary.json for a run that stopped early: why, where, and what to resume from."""
    from pathlib import Path

    from .checkpoints import latest_complete

    last = latest_complete(Path(trainer.args.output_dir))
    return {
        "recipe": cfg.recipe,
        "run_dir": cfg.output_dir,
        "status": "interrupted" if isinstance(exc, TrainingInterrupted) else "nonfinite_loss",
        "message": str(exc),
        "steps": trainer.state.global_step,
        "last_checkpoint": str(last) if last else None,
        "resumed_from": str(resume_from) if resume_from else None,
        "tokens_seen": trainer.tokens_seen,
        "wall_seconds": round(seconds, 2),
        "data": data,
        "nan_skips": len(trainer.nan_skipped_steps),
        "nan_skipped_steps": trainer.nan_skipped_steps,
    }
