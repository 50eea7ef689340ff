"""Weighted mixtures of data sources (``data.sources``, or ``data.path="a.jsonl:5,b.jsonl:1"``).

Each source is read, checked, deduplicated, split (eval fraction, ``data.max_samples`` per source) and
tokenized on its own, with its own format, so plain ``text`` rows mix with chat or Alpaca rows: a text row is
trained on every token, a conversation on its assistant turns. The tokenized sources are then interleaved by
``datasets.interleave_datasets``: each example of the mixture comes from source k with probability
``weight_k / sum(weights)``, drawn with ``data.seed``. ``data.stopping_strategy`` says where one pass over
the mixture ends:

- ``all_exhausted`` (default): once every row of every source has been drawn at least once; a source that is
  small for its weight is repeated within the pass (as mistral-finetune, which draws from each source by
  weight for as long as training runs, cycling through every source);
- ``first_exhausted``: as soon as one source has given all its rows; no row repeats within a pass, and
  sources that are large for their weight are only partly used.

The trainer then treats the pass like any dataset: it shuffles it with ``train.data_seed`` and repeats it
(reshuffled) for ``train.num_train_epochs``, or for as many passes as ``train.max_steps`` needs. The order is
therefore a function of the data, the weights, ``data.seed`` and ``train.data_seed``: a resumed run (whose
checkpoint stores the data fingerprint, which covers which source each example came from) sees the same
sequence. Every example carries its source in a per-token column (``SOURCE_COLUMN``) that
``SourceCountingCollator`` turns into per-source counts of the examples and tokens trained; the trainer keeps
them (across resumes) and summary.json reports them per source.
"""

from __future__ import annotations

import logging
import random
from collections import Counter
from dataclasses import dataclass
from typing import Any

from mistral_tune.core.errors import UserError
from mistral_tune.data.report import DataReport, PreparedData
from mistral_tune.data.sources import SourceSpec, read_source

log = logging.getLogger(__name__)

SOURCE_COLUMN = "mixture_source"  # per token: the index of the source the example came from
COUNTS_KEY = "mixture_counts"  # in a collated batch: [[examples, tokens], ...] per source


def prepare_mixture(specs: list[SourceSpec], data_cfg: Any, trainer_cfg: Any, tokenizer: Any) -> PreparedData:
    """Tokenize every source and interleave them by weight; returns the mixture as ``PreparedData``.

    The holdout rows (samples.jsonl) come from the first source with chat data (the first source when all are
    text), whose format becomes the run's ``data_format``. ``data.eval_split`` as a fraction takes that share of
    every source; as a file, it is read as usual.
    """
    from datasets import Dataset, interleave_datasets

    from mistral_tune.data.preflight import source_format
    from mistral_tune.data.sft import FORMAT_FIELDS, detect_format, tokenize_rows
    from mistral_tune.data.splits import find_duplicates, load_eval_file, split_eval_and_train

    options = dict(
        max_length=trainer_cfg.max_length,
        truncation=trainer_cfg.truncation,
        system_prompt=data_cfg.system_prompt,
        completion_only_loss=trainer_cfg.completion_only_loss,
    )
    loaded = []
    for spec in specs:
        report = DataReport()
        rows = read_source(spec, data_cfg.split, data_cfg.on_error, report)
        report.read += len(rows)
        if not rows:
            raise UserError(f"{spec.key}={spec.name} holds no examples ({dict(report.dropped) or 'empty file'}).")
        loaded.append((spec, report, rows, detect_format(rows, source_format(spec, data_cfg))))
    primary = next((k for k, item in enumerate(loaded) if item[3] != "text"), 0)

    total = DataReport()
    datasets, eval_examples, holdout, per_source = [], [], [], []
    for k, (spec, report, rows, fmt) in enumerate(loaded):
        rows = find_duplicates(rows, data_cfg.dedup, report)
        fields = FORMAT_FIELDS[fmt]
        report.extra_fields = sum(1 for r in rows if set(r) & fields and set(r) - fields)
        order = list(range(len(rows)))
        random.Random(data_cfg.seed * 1_000_003 + k).shuffle(order)
        holdout_n = min(data_cfg.holdout, max(len(rows) - 1, 0)) if k == primary else 0
        kept, rest = [rows[i] for i in order[:holdout_n]], order[holdout_n:]
        kept = [r for r in kept if tokenize_rows([r], fmt, tokenizer, report=report, **options)]
        report.reset_length_counts()
        report.held_out = len(kept)
        holdout.extend(kept)
        eval_rows, train_rows = split_eval_and_train(data_cfg, rows, rest, report, f"rows of {spec.key}")
        if eval_rows:
            eval_report = DataReport()
            eval_examples += tokenize_rows(eval_rows, fmt, tokenizer, report=eval_report, **options)
            total.eval_read += len(eval_rows)
            total.eval_dropped.update(eval_report.dropped)
        examples = tokenize_rows(train_rows, fmt, tokenizer, report=report, **options)
        report.used = len(examples)
        if not examples:
            hint = ", or raise trainer.max_length" if report.dropped.get("too_long") else ""
            raise UserError(
                f"{spec.key}={spec.name}: no training examples left after filtering its {report.read} rows "
                f"(dropped: {report.describe_drops()}). Fix those fields{hint}, or remove the source."
            )
        for ex in examples:
            ex[SOURCE_COLUMN] = [k] * len(ex["input_ids"])
        datasets.append(Dataset.from_list(examples))
        _add_into(total, report, spec)
        per_source.append({
            "name": spec.name, "key": spec.key, "files": len(spec.files), "format": fmt, "weight": spec.weight,
            "read": report.read, "used": report.used, "held_out": report.held_out,
            "dropped": dict(report.dropped), "dropped_total": sum(report.dropped.values()),
            "truncated": report.truncated, "tokens": sum(len(ex["input_ids"]) for ex in examples),
        })  # fmt: skip

    weights = [spec.weight for spec in specs]
    probabilities = [w / sum(weights) for w in weights]
    mixed = interleave_datasets(
        datasets, probabilities=probabilities, seed=data_cfg.seed, stopping_strategy=data_cfg.stopping_strategy
    )
    drawn = Counter(ids[0] for ids in mixed[SOURCE_COLUMN])
    for k, source in enumerate(per_source):
        source["share"] = round(probabilities[k], 6)
        source["in_one_pass"] = drawn.get(k, 0)  # examples of this source in one pass over the mixture
        source["epochs_per_pass"] = round(drawn.get(k, 0) / source["used"], 4)
    total.sources = per_source
    total.mixture = {"sources": len(specs), "stopping_strategy": data_cfg.stopping_strategy,
                     "seed": data_cfg.seed, "examples_per_pass": len(mixed)}  # fmt: skip
    total.check_lengths("examples", trainer_cfg.max_length)
    total.log_losses("example(s)", trainer_cfg.max_length, data_cfg.dedup)
    for source in per_source:
        log.info(
            "data: source %s (%s, weight %g = %.1f%%): %d read, %d used, %d per pass over the mixture (%.2f epochs)",
            source["name"], source["format"], source["weight"], 100 * source["share"], source["read"],
            source["used"], source["in_one_pass"], source["epochs_per_pass"],
        )  # fmt: skip

    eval_ds = None
    eval_file_rows = load_eval_file(data_cfg, eval_report := DataReport())
    if eval_file_rows is not None:
        eval_fmt = detect_format(eval_file_rows, data_cfg.format)
        eval_examples = tokenize_rows(eval_file_rows, eval_fmt, tokenizer, report=eval_report, **options)
        total.eval_read = eval_report.read + len(eval_file_rows)
        total.eval_dropped = eval_report.dropped
    if total.eval_read:
        total.eval_used = len(eval_examples)
        for reason, n in sorted(total.eval_dropped.items()):
            log.warning("data: dropped %d evaluation example(s): %s", n, reason)
        if not eval_examples:
            raise UserError(f"No evaluation examples left after filtering the {total.eval_read} rows of data.eval_split.")
        eval_ds = Dataset.from_list(eval_examples)
    fmt = loaded[primary][3]
    log.info(
        "data: mixture of %d sources (%s), %d read, %d training examples, %d per pass (stopping_strategy=%s), "
        "%d held out%s",
        len(specs), "+".join(dict.fromkeys(item[3] for item in loaded)), total.read, total.used, len(mixed),
        data_cfg.stopping_strategy, total.held_out, f", {total.eval_used} for evaluation" if eval_ds else "",
    )  # fmt: skip
    return PreparedData(mixed, eval_ds, holdout, fmt, total)


def _add_into(total: DataReport, report: DataReport, spec: SourceSpec) -> None:
    """Sum one source's counts into the mixture's report (its drop examples and bad lines name the source)."""
    total.read += report.read
    total.used += report.used
    total.held_out += report.held_out
    total.truncated += report.truncated
    total.duplicates += report.duplicates
    total.extra_fields += report.extra_fields
    total.dropped.update(report.dropped)
    total.lengths.extend(report.lengths)
    for reason, example in report.drop_examples.items():
        total.drop_examples.setdefault(reason, f"{spec.name}: {example}")
    room = DataReport.MAX_BAD_LINES - len(total.bad_lines)
    total.bad_lines.extend(report.bad_lines[: max(room, 0)])


@dataclass
class SourceCountingCollator:
    """Wraps a collator: strips ``SOURCE_COLUMN`` from the rows and adds ``COUNTS_KEY`` to the batch, a
    ``(sources, 2)`` tensor of the examples and tokens of each source in it (packed rows: every example of the
    row, by ``seq_lengths``). The trainer pops it before the forward pass and sums it over training steps."""

    inner: Any
    num_sources: int

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        if not rows or SOURCE_COLUMN not in rows[0]:
            return self.inner(rows)  # the eval split carries no source column
        import torch

        counts = [[0, 0] for _ in range(self.num_sources)]
        stripped = []
        for row in rows:
            sources, start = row[SOURCE_COLUMN], 0
            for length in row.get("seq_lengths") or [len(row["input_ids"])]:
                counts[sources[start]][0] += 1
                counts[sources[start]][1] += length
                start += length
            stripped.append({key: value for key, value in row.items() if key != SOURCE_COLUMN})
        batch = self.inner(stripped)
        batch[COUNTS_KEY] = torch.tensor(counts, dtype=torch.long)
        return batch
