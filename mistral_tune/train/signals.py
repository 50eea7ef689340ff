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
import signal
from typing import Any

from transformers import TrainerCallback

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


def train_guarded(trainer: Any, stop: GracefulStop, resume_from: Any = None):
    """``trainer.train()`` with the signal handlers installed; raises ``TrainingInterrupted`` after a signal."""
    from pathlib import Path

    from mistral_tune.train.checkpoints import latest_complete

    stop.install()
    try:
        result = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    finally:
        stop.uninstall()
    if stop.signum is not None and trainer.state.global_step < trainer.state.max_steps:
        root = Path(trainer.args.output_dir)
        raise TrainingInterrupted(stop.signum, trainer.state.global_step, str(latest_complete(root)), str(root.parent))
    return result
