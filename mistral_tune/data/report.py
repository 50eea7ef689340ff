"""What happened to every row: ``DataReport`` counts rows read, used, held out and dropped (by reason),
and ``PreparedData`` carries the datasets a trainer gets.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Optional

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
    truncated_parts: Counter = field(default_factory=Counter)  # preference pairs: "prompt" and/or "answers" cut
    drop_examples: dict = field(default_factory=dict)  # reason -> the first such row, naming the field that failed
    lengths: list = field(default_factory=list)  # tokens each example needs whole (for the length notice)
    prompt_lengths: list = field(default_factory=list)  # preference pairs: tokens of each prompt
    length_notice: Optional[dict] = None  # set by check_lengths when many examples did not fit
    # A weighted mixture (data.sources): one record per source (read/used/dropped, tokens, seen during training)
    # and how the sources were interleaved; both None/empty for a single source and left out of as_dict then.
    sources: list = field(default_factory=list)
    mixture: Optional[dict] = None
    assistant_turns: int = 0  # assistant turns of the training examples (chat data)
    skipped_turns: int = 0  # of those, turns with "weight": 0 (not trained)
    tool_rows: int = 0  # training examples with function calling (tools or tool results)
    tool_call_ids_fixed: int = 0  # tool-call id fields generated (data.fix_tool_call_ids=true)

    MAX_BAD_LINES = 20
    NOTICE_SHARE = 0.05  # more than this share of examples cut or dropped for length gets the one-line notice

    def skip_line(self, where: str, reason: str, detail: str) -> None:
        self.read += 1
        self.dropped[reason] += 1
        if len(self.bad_lines) < self.MAX_BAD_LINES:
            self.bad_lines.append(f"{where}: {detail}")

    def drop(self, reason: str, detail: str = "") -> None:
        """Count one unusable row; the first of each reason is kept as an example (``detail`` names the field)."""
        self.dropped[reason] += 1
        if detail and reason not in self.drop_examples:
            self.drop_examples[reason] = detail

    def describe_drops(self) -> str:
        """``2 empty_field (first: row 3: 'chosen' is empty), 1 too_long``: for the no-examples-left error."""
        parts = []
        for reason, n in sorted(self.dropped.items()):
            example = f" (first: {self.drop_examples[reason]})" if reason in self.drop_examples else ""
            parts.append(f"{n} {reason}{example}")
        return ", ".join(parts) or "none"

    def reset_length_counts(self) -> None:
        """Forget truncations, lengths and turn counts so far (those of held-out rows): they describe training data."""
        self.truncated = 0
        self.assistant_turns = self.skipped_turns = self.tool_rows = self.tool_call_ids_fixed = 0
        self.truncated_parts.clear()
        self.lengths.clear()
        self.prompt_lengths.clear()

    def check_lengths(self, unit: str, max_length: int, max_prompt_length: Optional[int] = None) -> Optional[dict]:
        """When more than ``NOTICE_SHARE`` of the training examples were cut or dropped for their length, one
        warning naming the key to raise (and a value that keeps 95% whole); the record goes to summary.json."""
        too_long = self.dropped.get("too_long", 0)
        affected, total = self.truncated + too_long, len(self.lengths)
        if not total or affected <= self.NOTICE_SHARE * total:
            return None
        need = _round_up(_percentile(self.lengths, 0.95))
        keys = {"trainer.max_length": max(need, max_length)}
        if max_prompt_length and self.prompt_lengths:
            keys["trainer.max_prompt_length"] = max(
                _round_up(_percentile(self.prompt_lengths, 0.95)), max_prompt_length
            )
            keys["trainer.max_length"] = max(keys["trainer.max_length"], keys["trainer.max_prompt_length"] + 64)
        what = "dropped" if too_long and not self.truncated else "truncated" if not too_long else "truncated or dropped"
        parts = (
            f" ({', '.join(f'{p}: {n}' for p, n in sorted(self.truncated_parts.items()))})"
            if self.truncated_parts
            else ""
        )
        limits = f"trainer.max_length={max_length}" + (
            f" / trainer.max_prompt_length={max_prompt_length}" if max_prompt_length else ""
        )
        setting = " ".join(f"{k}={v}" for k, v in keys.items())
        message = (
            f"{affected} of {total} training {unit} ({affected / total:.0%}) were over {limits} and were "
            f"{what}{parts}; to keep 95% of them whole set {setting}"
        )
        self.length_notice = {"affected": affected, "of": total, "share": round(affected / total, 4),
                              "suggested": keys, "message": message}  # fmt: skip
        log.warning("data: %s", message)
        return self.length_notice

    def log_losses(self, unit: str, max_length: int, dedup: bool) -> None:
        """Warn about every training example (``unit``: examples, pairs) dropped, skipped, kept twice or cut."""
        for reason, n in sorted(self.dropped.items()):
            example = f" (first: {self.drop_examples[reason]})" if reason in self.drop_examples else ""
            log.warning("data: dropped %d %s: %s%s", n, unit, reason, example)
        for where in self.bad_lines:
            log.warning("data: skipped %s", where)
        if self.duplicates and not dedup:
            log.warning("data: %d exact duplicate row(s) kept; set data.dedup=true to drop them", self.duplicates)
        if self.skipped_turns:
            log.info("data: %d of %d assistant turns have weight 0 and are not trained", self.skipped_turns,
                     self.assistant_turns)  # fmt: skip
        if self.tool_call_ids_fixed:
            log.info("data: generated %d tool-call id(s) (data.fix_tool_call_ids=true)", self.tool_call_ids_fixed)
        if self.truncated and not self.length_notice:  # the notice already says it, with the key to change
            log.warning("data: truncated %d %s to trainer.max_length=%d", self.truncated, unit, max_length)

    def record_seen(self, seen: list) -> None:
        """Per source, what training consumed: ``seen[k] = [examples, tokens]`` of source k (repeats included);
        ``epochs_seen`` is examples seen over the source's usable examples."""
        for source, (examples, tokens) in zip(self.sources, seen):
            source["examples_seen"] = int(examples)
            source["tokens_seen"] = int(tokens)
            source["epochs_seen"] = round(examples / source["used"], 4) if source["used"] else 0.0

    def as_dict(self) -> dict[str, Any]:
        extra = {"sources": [dict(s) for s in self.sources], "mixture": self.mixture} if self.mixture else {}
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
            "truncated_parts": dict(self.truncated_parts),
            "drop_examples": dict(self.drop_examples),
            "length_notice": self.length_notice,
            "assistant_turns": self.assistant_turns,
            "assistant_turns_skipped": self.skipped_turns,
            "tool_rows": self.tool_rows,
            "tool_call_ids_fixed": self.tool_call_ids_fixed,
            **extra,
        }


def _percentile(values: list, q: float) -> int:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _round_up(n: int, step: int = 64) -> int:
    return -(-n // step) * step


@dataclass
class PreparedData:
    """Everything ``prepare_sft_data`` hands to the run."""

    train: Any  # datasets.Dataset of input_ids + labels
    eval: Any  # the same for data.eval_split, or None
    holdout: list  # raw rows whose prompts feed samples.jsonl
    format: str
    report: DataReport
