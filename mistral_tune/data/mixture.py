"""Weighted mixtures of data sources (``data.sources``, or ``data.path="a.jsonl:5,b.jsonl:1"``).

``mistral_tune.data.sft.prepare_mixture`` reads, checks, deduplicated, split (eval fraction, ``data.max_samples`` per source) and
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

from dataclasses import dataclass
from typing import Any

from mistral_tune.data.report import DataReport
from mistral_tune.data.sources import SourceSpec

SOURCE_COLUMN = "mixture_source"  # per token: the index of the source the example came from
COUNTS_KEY = "mixture_counts"  # in a collated batch: [[examples, tokens], ...] per source


def add_into(total: DataReport, report: DataReport, spec: SourceSpec) -> None:
    """Sum one source's counts into the mixture's report (its drop examples and bad lines name the source)."""
    total.read += report.read
    total.used += report.used
    total.held_out += report.held_out
    total.truncated += report.truncated
    total.duplicates += report.duplicates
    total.extra_fields += report.extra_fields
    total.assistant_turns += report.assistant_turns
    total.skipped_turns += report.skipped_turns
    total.tool_rows += report.tool_rows
    total.tool_call_ids_fixed += report.tool_call_ids_fixed
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
