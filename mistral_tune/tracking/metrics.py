"""``metrics.jsonl``: one JSON record per logging step (loss, learning rate, tokens/s, eval loss), always
written by rank 0 whatever tracker is chosen.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

# Fields of each metrics.jsonl record. Users' scripts read these: keep them stable.
METRIC_FIELDS = ("step", "loss", "learning_rate", "tokens_seen", "tokens_per_second", "elapsed_seconds")


class MetricsJsonl(TrainerCallback):
    """Appends one JSON object per logging step to ``metrics.jsonl`` (rank 0 only).

    Each record has step, loss, learning_rate, tokens_seen (non-padding tokens so far),
    tokens_per_second (over the interval since the previous record), elapsed_seconds, and
    whatever else the trainer logged (grad_norm, epoch, ...). Evaluation records carry
    eval_loss, eval_perplexity, ... and ``tokens_per_second: null``; their runtime is left out of
    the next training interval, so evaluation does not depress the training throughput.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        self.records: list[dict[str, Any]] = []
        self._start = time.perf_counter()
        self._last = (self._start, 0)

    def on_train_begin(self, args, state, control, **kwargs):
        self._start = time.perf_counter()
        # A resumed run starts from the checkpoint's token count, not 0.
        self._last = (self._start, int(getattr(state, "num_input_tokens_seen", 0) or 0))

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        now = time.perf_counter()
        tokens = int(logs.pop("tokens_seen", self._last[1]))
        if "loss" not in logs and "eval_loss" not in logs:
            return  # the end-of-training summary (train_runtime, ...) goes to summary.json instead
        record = {"step": state.global_step}
        record.update({k: _clean(v) for k, v in logs.items()})
        record["tokens_seen"] = tokens
        if "loss" in logs:
            interval = now - self._last[0]
            record["tokens_per_second"] = round((tokens - self._last[1]) / interval, 2) if interval > 0 else None
            self._last = (now, tokens)
        else:
            record["tokens_per_second"] = None
            self._last = (self._last[0] + float(logs.get("eval_runtime", 0.0)), self._last[1])
        record["elapsed_seconds"] = round(now - self._start, 3)
        self.records.append(record)
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/inf; keep them visible as strings
    return value
