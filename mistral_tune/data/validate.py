"""``mistral-tune validate-data``'s checks: every row of every source through the training data path.

Each source is read with ``load_records`` (bad lines skipped and reported, never failing the check), its
format detected with ``detect_format``, and each row tokenized alone with ``tokenize_rows``, exactly as
training tokenizes it: the same drop reasons, the same truncation at ``trainer.max_length``. Nothing here
validates a row a second way; this module only keeps each row's ``file:line`` and adds up the results.
A tokenizer is needed; a model never is.
"""

from __future__ import annotations

import json
import math
import re
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from mistral_tune.core.errors import UserError
from mistral_tune.data.fixes import correct_row
from mistral_tune.data.preflight import STRICT_REASONS
from mistral_tune.data.report import DataReport
from mistral_tune.data.sft import detect_format, tokenize_options, tokenize_rows
from mistral_tune.data.sources import load_records
from mistral_tune.data.splits import find_duplicates


@dataclass
class Source:
    """One data source as training reads it: a path, a format (``auto`` detects it) and a mixture weight."""

    path: str
    format: str = "auto"
    weight: float = 1.0
    eval: bool = False  # data.eval_split naming a file: checked the same way, never trained on


@dataclass
class SourceCheck:
    """What one source holds: counts, token lengths and every problem as ``file:line: reason: detail``."""

    source: Source
    format: Optional[str] = None
    lines: int = 0  # rows and unreadable lines
    usable: int = 0  # rows training would keep (truncated ones included)
    problems: list = field(default_factory=list)  # "file:line: reason: detail", in file order
    unreadable: list = field(default_factory=list)  # "file:line: detail" of lines that hold no JSON object
    strict: list = field(default_factory=list)  # rows that stop a run with data.on_error=fail (preflight's rule)
    reasons: Counter = field(default_factory=Counter)  # unusable rows (and unreadable lines) by reason
    truncated: int = 0  # usable rows over trainer.max_length, cut to it
    lengths: list = field(default_factory=list)  # tokens of each usable row, whole (before truncation)
    tokens: int = 0  # tokens of the usable rows as trained (after truncation)
    trained_tokens: int = 0  # ... of which carry the loss
    fixable: Counter = field(default_factory=Counter)  # fixes --write-corrected would apply, by name
    fixable_rows: int = 0  # unusable rows those fixes make usable
    assistant_turns: int = 0  # of the usable chat rows
    skipped_turns: int = 0  # ... with "weight": 0 (not trained)
    tool_rows: int = 0  # usable rows with tools, tool calls or tool results
    tool_call_ids_fixed: int = 0  # ids training generates (data.fix_tool_call_ids=true)
    duplicates: int = 0  # exact duplicate rows (data.dedup=true drops all but the first)
    error: Optional[str] = None  # why the source is unusable (unreadable, undetectable, no usable row)
    corrected: list = field(default_factory=list)  # the usable rows, fixed (only when asked for)
    corrected_fixes: Counter = field(default_factory=Counter)  # fixes applied to those rows

    @property
    def unusable(self) -> int:
        return sum(self.reasons.values())


def sources_of(data_cfg: Any) -> list[Source]:
    """The sources of ``data``: ``data.sources`` (a weighted mixture, issue 16) when this tree has it,
    else ``data.path`` alone."""
    try:
        from mistral_tune.data.sources import resolve_sources  # type: ignore[attr-defined]
    except ImportError:
        return [Source(data_cfg.path, data_cfg.format, 1.0)]
    specs = resolve_sources(data_cfg)
    return [Source(str(s.path), getattr(s, "format", None) or data_cfg.format, float(s.weight)) for s in specs]


def eval_source(data_cfg: Any) -> Optional[Source]:
    """``data.eval_split`` when it names a file (a fraction is taken from the training rows)."""
    from mistral_tune.config.schema import eval_fraction

    if not data_cfg.eval_split or eval_fraction(data_cfg.eval_split) is not None:
        return None
    return Source(data_cfg.eval_split, data_cfg.format, 0.0, eval=True)


def check_source(
    source: Source, data_cfg: Any, trainer_cfg: Any, tokenizer: Any, *, corrected: bool = False
) -> SourceCheck:
    """Every row of ``source`` through the training path; ``corrected`` also keeps the usable rows, fixed."""
    result = SourceCheck(source)
    report = DataReport()
    report.MAX_BAD_LINES = sys.maxsize  # every unreadable line is reported, not the first 20
    positions: list[str] = []
    try:
        rows = load_records(source.path, data_cfg.split, "skip", report, positions)
    except UserError as exc:
        result.error = str(exc)
        return result
    result.lines = report.read + len(rows)
    result.reasons.update(report.dropped)
    result.unreadable = list(report.bad_lines)  # "file:line: detail" of each line load_records skipped
    result.problems.extend(result.unreadable)
    if not rows:
        result.error = f"{source.path} holds no rows" + (f" ({result.lines} unreadable lines)" if result.lines else "")
        return result
    try:
        result.format = fmt = detect_format(rows, source.format)
    except UserError as exc:
        result.error = f"{source.path}: {exc}"
        return result
    duplicates = DataReport()
    find_duplicates(rows, False, duplicates)  # counted as training counts them
    result.duplicates = duplicates.duplicates
    options = tokenize_options(data_cfg, trainer_cfg)
    for row, where in zip(rows, positions):
        fixed, fixes = correct_row(row, fmt)
        try:
            kept = _tokenize(row, fmt, tokenizer, options)
        except UserError as exc:  # the whole source cannot be trained this way (tool data on a v1 format)
            result.error = f"{where}: {exc}"
            return result
        if isinstance(kept, str):  # the drop reason and detail
            fixed_kept = _tokenize(fixed, fmt, tokenizer, options) if fixes else kept
            note = f" (fixable: --write-corrected applies {', '.join(sorted(fixes))})" if fixes and not isinstance(fixed_kept, str) else ""
            result.problems.append(f"{where}: {kept}{note}")
            reason = kept.split(":", 1)[0]
            result.reasons[reason] += 1
            if reason in STRICT_REASONS:
                result.strict.append(f"{where}: {kept}")
            if note:
                result.fixable.update(fixes)
                result.fixable_rows += 1
            if corrected and note:
                result.corrected.append(fixed)
                result.corrected_fixes.update(fixes)
            continue
        example, length, truncated, counts = kept
        result.usable += 1
        result.assistant_turns += counts.assistant_turns
        result.skipped_turns += counts.skipped_turns
        result.tool_rows += counts.tool_rows
        result.tool_call_ids_fixed += counts.tool_call_ids_fixed
        result.lengths.append(length)
        result.tokens += len(example["input_ids"])
        labels = example["labels"]  # the first token never carries the loss (labels shift inside the model)
        result.trained_tokens += len(labels) - labels.count(-100) - (labels[0] != -100)
        if truncated:
            result.truncated += 1
            result.problems.append(
                f"{where}: too_long: {length} tokens, over trainer.max_length={trainer_cfg.max_length}; "
                f"training truncates it to {trainer_cfg.max_length}"
            )
        if fixes:  # usable as it is, but still fixable (e.g. a trailing user turn on a ShareGPT row)
            result.fixable.update(fixes)
        if corrected:
            result.corrected.append(fixed)
            result.corrected_fixes.update(fixes)
    result.problems.sort(key=line_number)  # file order: unreadable lines among the rows
    if not result.usable:
        result.error = (
            f"{source.path}: none of its {result.lines} rows can be trained on as {fmt} data "
            f"({', '.join(f'{n} {r}' for r, n in sorted(result.reasons.items()))})"
        )
        if result.fixable_rows:
            result.error += f"; --write-corrected OUT makes {result.fixable_rows} of them usable"
    return result


def _tokenize(row: dict, fmt: str, tokenizer: Any, options: dict):
    """``(example, whole length, truncated, its DataReport)`` for a row training keeps, else ``"reason: detail"``."""
    report = DataReport()
    examples = tokenize_rows([row], fmt, tokenizer, report=report, **options)
    if examples:
        return examples[0], report.lengths[0], bool(report.truncated), report
    reason = next(iter(report.dropped))
    detail = report.drop_examples.get(reason)
    if detail is None and reason == "too_long":
        detail = f"{report.lengths[0]} tokens, over trainer.max_length={options['max_length']} (trainer.truncation=drop)"
    elif detail is None and reason == "no_loss_tokens":
        detail = (
            f"{report.lengths[0]} tokens; truncation at trainer.max_length={options['max_length']} "
            "cuts every trained token"
        )
    return f"{reason}: {detail or reason}"


def line_number(problem: str) -> int:
    """The line (or index) a ``file:line: ...`` / ``file[i]: ...`` problem names, for sorting."""
    found = re.match(r".*?(?::(\d+)|\[(\d+)\]): ", problem)
    return int(found.group(1) or found.group(2)) if found else 0


def percentiles(values: list[int]) -> dict[str, int]:
    """min, p50, p90, p99 and max of ``values`` (nearest rank)."""
    ordered = sorted(values)
    if not ordered:
        return {}

    def rank(q: float) -> int:
        return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]

    return {"min": ordered[0], "p50": rank(0.5), "p90": rank(0.9), "p99": rank(0.99), "max": ordered[-1]}


@dataclass
class Schedule:
    """How training would draw from the sources: steps, examples per step, and epochs per source."""

    steps: int
    examples_per_step: int  # per_device_train_batch_size x gradient_accumulation_steps x processes
    processes: int
    train_rows: dict  # source path -> rows training draws from (usable, less holdout and eval split)
    epochs: dict  # source path -> epochs over its training rows
    note: str = ""


def schedule(checks: list[SourceCheck], data_cfg: Any, trainer_cfg: Any, train_cfg: Any, processes: int) -> Schedule:
    """Epochs per source for ``train.max_steps`` (or ``num_train_epochs``) and the global batch.

    The holdout and a fractional eval split come out of the training rows as training takes them; with
    several sources they are taken in proportion to each source's usable rows. Mixture weights share each
    step's examples between the sources. With ``trainer.packing`` a step is rows of ``max_length`` tokens,
    so epochs are counted in tokens.
    """
    from mistral_tune.config.schema import eval_fraction

    per_step = train_cfg.per_device_train_batch_size * train_cfg.gradient_accumulation_steps * processes
    counts = {c.source.path: max(c.usable - (c.duplicates if data_cfg.dedup else 0), 0) for c in checks}
    usable = sum(counts.values())
    holdout = min(data_cfg.holdout, max(usable - 1, 0))
    rest = usable - holdout
    fraction = eval_fraction(data_cfg.eval_split)
    eval_n = max(1, round(fraction * rest)) if fraction is not None and rest else 0
    train_total = max(rest - eval_n, 0)
    if data_cfg.max_samples is not None:
        train_total = min(train_total, data_cfg.max_samples)
    train_rows = {path: (round(train_total * n / usable) if usable else 0) for path, n in counts.items()}
    weights = {c.source.path: c.source.weight for c in checks if c.usable}
    total_weight = sum(weights.values()) or 1.0
    note = ""
    if train_cfg.max_steps > 0:
        steps = train_cfg.max_steps
    else:  # num_train_epochs over the whole training set
        steps = math.ceil(train_cfg.num_train_epochs * train_total / per_step) if per_step else 0
        note = f"train.max_steps unset: {train_cfg.num_train_epochs:g} epoch(s) of {train_total} rows"
    epochs = {}
    for c in checks:
        share = weights.get(c.source.path, 0.0) / total_weight
        if trainer_cfg.packing:
            kept = c.tokens * train_rows[c.source.path] / c.usable if c.usable else 0  # its training tokens
            drawn = steps * per_step * trainer_cfg.max_length * share
            epochs[c.source.path] = drawn / kept if kept else 0.0
        else:
            drawn = steps * per_step * share
            epochs[c.source.path] = drawn / train_rows[c.source.path] if train_rows[c.source.path] else 0.0
    return Schedule(steps, per_step, processes, train_rows, epochs, note)


def write_corrected(checks: list[SourceCheck], out: Path) -> dict[str, int]:
    """The usable rows, fixed, written to ``out``: one file (``.jsonl``, or a ``.json`` list) for one source;
    for several, ``out`` is a directory with one ``<name>.jsonl`` per source. Rows written per file written
    (a source with no usable row, even after the fixes, gets none)."""
    targets = {out: checks} if len(checks) == 1 else {out / f"{Path(c.source.path).stem}.jsonl": [c] for c in checks}
    if len(targets) < len(checks):
        raise UserError(f"--write-corrected: two sources share a file name; write them one at a time.")
    written = {}
    for path, group in targets.items():
        if path.suffix not in (".jsonl", ".json"):
            raise UserError(f"--write-corrected {path}: name a .jsonl or .json file.")
        path.parent.mkdir(parents=True, exist_ok=True)
        rows = [row for c in group for row in c.corrected]
        if not rows:  # a source with nothing to keep gets no file (its error says why)
            continue
        tmp = path.with_name(path.name + ".partial")
        with tmp.open("w", encoding="utf-8") as f:
            if path.suffix == ".json":
                json.dump(rows, f, ensure_ascii=False, indent=1)
            else:
                f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
        tmp.replace(path)  # a reader never sees half a file
        written[str(path)] = len(rows)
    return written
