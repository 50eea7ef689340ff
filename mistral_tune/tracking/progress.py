"""Training progress for people: a bar on a terminal, one clean log line per logging step elsewhere.

Replaces transformers' own progress output (a bar that prints raw dicts, or bare dict prints when
tqdm is off), reading loss and throughput from the ``MetricsJsonl`` record of the same step.

On a terminal::

    train:  67%|██████████████████████           | 4/6 [00:21<00:11,  5.51s/step, loss 11.57, lr 0.003, tok/s 56]

Not on a terminal (CI, ``nohup``, a pipe)::

    step 100/300  loss 5.553  lr 0.00385  tok/s 66  eta 0:13:31
"""

from __future__ import annotations

import logging
import sys
import time
from datetime import timedelta
from typing import Any, Optional, TextIO

from transformers import PrinterCallback, ProgressCallback, TrainerCallback

log = logging.getLogger("mistral_tune.tracking.progress")


def format_eta(seconds: float) -> str:
    return str(timedelta(seconds=max(0, round(seconds))))


class ProgressReporter(TrainerCallback):
    """Progress bar (``tty=True``) or log lines; reads values from ``metrics.records``."""

    def __init__(self, metrics: Any, stream: Optional[TextIO] = None, tty: Optional[bool] = None):
        self.metrics = metrics
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty() if tty is None else tty
        self.bar = None
        self._start = time.perf_counter()
        self._first_step = 0
        self._shown = 0  # records already reported

    def on_train_begin(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        self._start, self._first_step = time.perf_counter(), state.global_step
        if self.tty:
            from tqdm.auto import tqdm

            self.bar = tqdm(
                total=state.max_steps,
                initial=state.global_step,
                desc="train",
                unit="step",
                file=self.stream,
                dynamic_ncols=True,
            )

    def on_step_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.update(state.global_step - self.bar.n)

    def eta_seconds(self, state) -> float:
        done = state.global_step - self._first_step
        if done <= 0:
            return 0.0
        return (time.perf_counter() - self._start) / done * (state.max_steps - state.global_step)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or len(self.metrics.records) <= self._shown:
            return  # this log call wrote no record (e.g. the end-of-training totals)
        self._shown = len(self.metrics.records)
        record = self.metrics.records[-1]
        line = self.describe(record)
        if line is None:
            return
        if self.bar is not None:
            if "eval_loss" in record:
                self.bar.write(f"step {state.global_step}/{state.max_steps}  {line}", file=self.stream)
            else:
                self.bar.set_postfix_str(line.replace("  ", ", "), refresh=True)
        else:
            eta = "" if "eval_loss" in record else f"  eta {format_eta(self.eta_seconds(state))}"
            log.info("step %d/%d  %s%s", state.global_step, state.max_steps, line, eta)

    @staticmethod
    def describe(record: dict[str, Any]) -> Optional[str]:
        parts = []
        if isinstance(record.get("eval_loss"), (int, float)):
            parts.append(f"eval_loss {record['eval_loss']:.4g}")
            if isinstance(record.get("eval_perplexity"), (int, float)):
                parts.append(f"eval_ppl {record['eval_perplexity']:.4g}")
            return "  ".join(parts)
        if isinstance(record.get("loss"), (int, float)):
            parts.append(f"loss {record['loss']:.4g}")
        elif "loss" in record:
            parts.append(f"loss {record['loss']}")  # "nan" / "inf" kept visible
        if isinstance(record.get("learning_rate"), (int, float)):
            parts.append(f"lr {record['learning_rate']:.3g}")
        if isinstance(record.get("tokens_per_second"), (int, float)):
            parts.append(f"tok/s {record['tokens_per_second']:,.0f}")
        return "  ".join(parts) or None

    def on_train_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def use_progress_reporter(trainer: Any, reporter: ProgressReporter) -> None:
    """Swap transformers' progress output for ``reporter`` on any Trainer."""
    trainer.remove_callback(ProgressCallback)
    trainer.remove_callback(PrinterCallback)
    trainer.add_callback(reporter)
