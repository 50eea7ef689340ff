"""``mistral-tune validate-data``'s checks: every row of every source through the training data path.

Each source (``resolve_sources``: one path, a directory, a weighted mixture) is read with ``read_source_rows``
(bad lines skipped and reported, never failing the check; every row with its ``file:line``), its
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
from mistral_tune.data.sources import SourceSpec, read_source_rows, resolve_source_files, resolve_sources, source_format
from mistral_tune.data.splits import find_duplicates


@dataclass
class Source:
    """One data source as training reads it (``SourceSpec`` from ``resolve_sources``), or the eval file."""

    path: str  # as written: a file, a directory of .jsonl files or a hub dataset name
    key: str  # where it was configured: data.path, data.path[1], data.sources[0], data.eval_split
    format: str = "auto"  # as asked (source_format); auto detects it from the rows
    weight: float = 1.0
    spec: Optional[SourceSpec] = None  # None for the eval file until it is resolved
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
    """The training sources of ``data`` (``data.sources``, the ``data.path`` shorthand, or one path), resolved
    by ``resolve_sources`` exactly as a run resolves them; a bad entry is one ``UserError``."""
    return [
        Source(spec.name, spec.key, source_format(spec, data_cfg), spec.weight, spec)
        for spec in resolve_sources(data_cfg)
    ]


def eval_source(data_cfg: Any) -> Optional[Source]:
    """``data.eval_split`` when it names a file (a fraction is taken from the training rows)."""
    from mistral_tune.config.schema import eval_fraction

    if not data_cfg.eval_split or eval_fraction(data_cfg.eval_split) is not None:
        return None
    return Source(data_cfg.eval_split, "data.eval_split", data_cfg.format, 0.0, eval=True)


def check_source(
    source: Source, data_cfg: Any, trainer_cfg: Any, tokenizer: Any, *, corrected: bool = False
) -> SourceCheck:
    """Every row of ``source`` through the training path; ``corrected`` also keeps the usable rows, fixed."""
    result = SourceCheck(source)
    report = DataReport()
    report.MAX_BAD_LINES = sys.maxsize  # every unreadable line is reported, not the first 20
    try:
        spec = source.spec or SourceSpec(source.path, source.key, resolve_source_files(source.path, source.key))
        located = read_source_rows(spec, data_cfg.split, "skip", report)
    except UserError as exc:
        result.error = str(exc)
        return result
    positions = [where for where, _ in located]
    rows = [row for _, row in located]
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
            note = (
                f" (fixable: --write-corrected applies {', '.join(sorted(fixes))})"
                if fixes and not isinstance(fixed_kept, str)
                else ""
            )
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
        detail = (
            f"{report.lengths[0]} tokens, over trainer.max_length={options['max_length']} (trainer.truncation=drop)"
        )
    elif detail is None and reason == "no_loss_tokens":
        detail = (
            f"{report.lengths[0]} tokens; truncation at trainer.max_length={options['max_length']} "
            "cuts every trained token"
        )
    return f"{reason}: {detail or reason}"


def line_number(problem: str) -> tuple[str, int]:
    """(file, line or index) a ``file:line: ...`` / ``file[i]: ...`` / ``file#rowN: ...`` problem names, to sort
    problems into file order (a directory source's files stay in their order: names sort as they are read)."""
    found = re.match(r"(.*?)(?::(\d+)|\[(\d+)\]|#row(\d+)): ", problem)
    if not found:
        return "", 0
    return found.group(1), int(found.group(2) or found.group(3) or found.group(4))


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
    train_rows: dict  # source key -> rows training draws from (usable, less holdout, eval split, duplicates)
    shares: dict  # source key -> its share of the examples (weight / sum of weights)
    epochs: dict  # source key -> epochs over its training rows
    note: str = ""


def schedule(checks: list[SourceCheck], data_cfg: Any, trainer_cfg: Any, train_cfg: Any, processes: int) -> Schedule:
    """Epochs per source for ``train.max_steps`` (or ``num_train_epochs``) and the global batch.

    Each source's training rows are taken as training takes them (``prepare_sft_data``, ``prepare_mixture``):
    ``data.holdout`` from the first source with chat data, a fractional ``data.eval_split`` and
    ``data.max_samples`` per source, duplicates with ``data.dedup``. The mixture draws each source by its share
    of the weights (``interleave_datasets`` samples with those probabilities, so the counts hold on average).
    With ``trainer.packing`` a step is rows of ``max_length`` tokens, so epochs are counted in tokens.
    """
    from mistral_tune.config.schema import eval_fraction

    per_step = train_cfg.per_device_train_batch_size * train_cfg.gradient_accumulation_steps * processes
    fraction = eval_fraction(data_cfg.eval_split)
    primary = next((k for k, c in enumerate(checks) if c.format not in (None, "text")), 0)
    train_rows = {}
    for k, c in enumerate(checks):
        n = max(c.usable - (c.duplicates if data_cfg.dedup else 0), 0)
        rest = n - (min(data_cfg.holdout, max(n - 1, 0)) if k == primary else 0)
        rest -= max(1, round(fraction * rest)) if fraction is not None and rest else 0
        train_rows[c.source.key] = min(rest, data_cfg.max_samples) if data_cfg.max_samples is not None else rest
    weights = {c.source.key: c.source.weight for c in checks if train_rows[c.source.key] > 0}
    shares = {key: w / sum(weights.values()) for key, w in weights.items()}
    note = ""
    if train_cfg.max_steps > 0:
        steps = train_cfg.max_steps
    else:  # num_train_epochs over one pass of the (mixed) training set
        passes = {"all_exhausted": max, "first_exhausted": min}.get(getattr(data_cfg, "stopping_strategy", ""), max)
        one_pass = passes((train_rows[key] / share for key, share in shares.items()), default=0)
        one_pass = one_pass if len(shares) > 1 else sum(train_rows.values())
        steps = math.ceil(train_cfg.num_train_epochs * one_pass / per_step) if per_step else 0
        note = f"train.max_steps unset: {train_cfg.num_train_epochs:g} epoch(s) of about {round(one_pass):,} examples"
    epochs = {}
    for c in checks:
        key, share = c.source.key, shares.get(c.source.key, 0.0)
        if trainer_cfg.packing:  # its training tokens; a step is per_step rows of max_length tokens
            kept = c.tokens * train_rows[key] / c.usable if c.usable else 0
            epochs[key] = steps * per_step * trainer_cfg.max_length * share / kept if kept else 0.0
        else:
            epochs[key] = steps * per_step * share / train_rows[key] if train_rows[key] else 0.0
    return Schedule(steps, per_step, processes, train_rows, shares, epochs, note)


def write_corrected(checks: list[SourceCheck], out: Path) -> dict[str, int]:
    """The usable rows, fixed, written to ``out``: one file (``.jsonl``, or a ``.json`` list) for one source;
    for several, ``out`` is a directory with one ``<name>.jsonl`` per source. Rows written per file written
    (a source with no usable row, even after the fixes, gets none)."""
    targets = (
        {out: checks}
        if len(checks) == 1
        else {out / f"{Path(c.source.path.rstrip('/')).stem}.jsonl": [c] for c in checks}
    )
    if len(targets) < len(checks):
        raise UserError("--write-corrected: two sources share a file name; write them one at a time.")
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
