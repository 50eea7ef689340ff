"""Eval splits (a fraction of the rows, or a file), the holdout rows for samples, and duplicate
counting, shared by SFT and preference data.
"""

from __future__ import annotations

import json
from typing import Any, Optional

from mistral_tune.core.errors import UserError
from mistral_tune.data.report import DataReport
from mistral_tune.data.sources import load_records


def split_eval_and_train(data_cfg: Any, items: list, rest: list[int], report: DataReport, noun: str):
    """(eval items, training items) from ``rest``, the shuffled indices of ``items`` left after the holdout.

    ``data.eval_split`` as a fraction takes the first of them for eval; the training items keep file
    order and are capped at ``data.max_samples`` (the excess is counted as ``over_max_samples``).
    """
    from mistral_tune.config.schema import eval_fraction

    fraction = eval_fraction(data_cfg.eval_split)
    eval_items = []
    if fraction is not None:
        eval_n = max(1, round(fraction * len(rest)))
        if eval_n >= len(rest):
            raise UserError(
                f"data.eval_split={data_cfg.eval_split} of {len(rest)} {noun} leaves nothing to train on; "
                "use a smaller fraction."
            )
        eval_items, rest = [items[i] for i in rest[:eval_n]], rest[eval_n:]
    train = [items[i] for i in sorted(rest)]
    if data_cfg.max_samples is not None and len(train) > data_cfg.max_samples:
        report.dropped["over_max_samples"] += len(train) - data_cfg.max_samples
        train = train[: data_cfg.max_samples]
    return eval_items, train


def load_eval_file(data_cfg: Any, eval_report: DataReport) -> Optional[list[dict]]:
    """The rows of ``data.eval_split`` when it names a file (None for a fraction or no eval split)."""
    from mistral_tune.config.schema import eval_fraction

    if not data_cfg.eval_split or eval_fraction(data_cfg.eval_split) is not None:
        return None
    rows = load_records(data_cfg.eval_split, data_cfg.split, data_cfg.on_error, eval_report)
    if not rows:
        raise UserError(f"data.eval_split={data_cfg.eval_split} holds no examples.")
    return rows


def find_duplicates(rows: list[dict[str, Any]], dedup: bool, report: DataReport) -> list[dict[str, Any]]:
    """Count exact duplicate rows (same keys and values); drop all but the first when ``dedup``."""
    seen: set[str] = set()
    kept = []
    for row in rows:
        key = json.dumps(row, sort_keys=True, ensure_ascii=False, default=str)
        if key in seen:
            report.duplicates += 1
            if dedup:
                report.dropped["duplicate"] += 1
                continue
        seen.add(key)
        kept.append(row)
    return kept
