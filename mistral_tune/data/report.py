"""What happened to every row: ``DataReport`` counts rows read, used, held out and dropped (by reason),
and ``PreparedData`` carries the datasets a trainer gets.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)


@dataclass
class DataReport:
    """What happened to every input example."""

    read: int = 0  # rows and unparseable lines seen: read = used + held_out + dropped_total
    used: int = 0
    held_out: int = 0
    truncated: int = 0
    duplicates: int = 0  # exact duplicate rows found (dropped only with data.dedup=true)
    extra_fields: int = 0  # rows with fields the format does not use (ignored, kept)
    dropped: Counter = field(default_factory=Counter)
    bad_lines: list = field(default_factory=list)  # "file:line: reason" of the first skipped lines
    eval_read: int = 0  # rows of the eval split (data.eval_split); a fraction of data.path counts in read too
    eval_used: int = 0
    eval_dropped: Counter = field(default_factory=Counter)

    MAX_BAD_LINES = 20

    def skip_line(self, where: str, reason: str, detail: str) -> None:
        self.read += 1
        self.dropped[reason] += 1
        if len(self.bad_lines) < self.MAX_BAD_LINES:
            self.bad_lines.append(f"{where}: {detail}")

    def log_losses(self, unit: str, max_length: int, dedup: bool) -> None:
        """Warn about every training example (``unit``: examples, pairs) dropped, skipped, kept twice or cut."""
        for reason, n in sorted(self.dropped.items()):
            log.warning("data: dropped %d %s: %s", n, unit, reason)
        for where in self.bad_lines:
            log.warning("data: skipped %s", where)
        if self.duplicates and not dedup:
            log.warning("data: %d exact duplicate row(s) kept; set data.dedup=true to drop them", self.duplicates)
        if self.truncated:
            log.warning("data: truncated %d %s to trainer.max_length=%d", self.truncated, unit, max_length)

    def as_dict(self) -> dict[str, Any]:
        return {
            "read": self.read,
            "used": self.used,
            "held_out": self.held_out,
            "truncated": self.truncated,
            "duplicates": self.duplicates,
            "extra_fields": self.extra_fields,
            "dropped": dict(self.dropped),
            "dropped_total": sum(self.dropped.values()),
            "bad_lines": list(self.bad_lines),
            "eval_read": self.eval_read,
            "eval_used": self.eval_used,
            "eval_dropped": dict(self.eval_dropped),
        }


@dataclass
class PreparedData:
    """Everything ``prepare_sft_data`` hands to the run."""

    train: Any  # datasets.Dataset of input_ids + labels
    eval: Any  # the same for data.eval_split, or None
    holdout: list  # raw rows whose prompts feed samples.jsonl
    format: str
    report: DataReport
