"""Padding-free packing: several tokenized examples per row, kept apart by their ``position_ids``.

``trainer.packing=true`` bins the tokenized examples into rows of at most ``trainer.max_length``
tokens with TRL's best-fit-decreasing packer (whole examples only: none is split or cut), and TRL's
padding-free collator then concatenates a batch into one sequence whose ``position_ids`` restart
at 0 for every example (and whose first label of each example is ignored, so no token is trained
to predict across a boundary).

No attention crosses an example boundary, and Mistral's sliding window still applies inside
each example, with every backend mistral-tune offers:

- ``sdpa`` and ``eager``: transformers derives a block-diagonal causal mask from the restarting
  ``position_ids`` (``masking_utils.find_packed_sequence_indices``) and applies the window to the
  positions inside each example. This needs ``use_cache=False``, which the trainer sets: with a
  cache the packed layout is not detected. Checked against the unpacked batch in tests/test_packing.py.
- ``flash_attention_2``: the collator's ``cu_seq_lens_q/k`` select flash-attn's varlen kernel.
- ``flex_attention``: the same mask as a block-sparse document mask (GPU only: PyTorch has no
  flex-attention backward on CPU).

Example:
    >>> packed, report = pack_examples(dataset, max_length=512)
    >>> report.as_dict()["fill"]   # share of the row capacity holding real tokens
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)


@dataclass
class PackingReport:
    """What packing did: examples in, rows out, and how full the rows are."""

    examples: int
    rows: int
    tokens: int
    max_length: int

    def as_dict(self) -> dict[str, Any]:
        return {
            "examples": self.examples,
            "rows": self.rows,
            "tokens": self.tokens,
            "max_length": self.max_length,
            "fill": round(self.tokens / max(self.rows * self.max_length, 1), 4),
        }


def pack_examples(dataset: Any, max_length: int):
    """Pack a Dataset of ``input_ids``/``labels`` rows; returns (packed Dataset, PackingReport).

    Every example is at most ``max_length`` tokens already (mistral_tune.data truncates or drops
    longer ones and counts them), so best-fit-decreasing never cuts one: the token count going in
    equals the count coming out, which is checked here rather than assumed.
    """
    from trl.data_utils import pack_dataset

    lengths = [len(ids) for ids in dataset["input_ids"]]
    longest = max(lengths, default=0)
    if longest > max_length:
        raise ValueError(f"an example has {longest} tokens, more than the packing length {max_length}")
    packed = pack_dataset(dataset, seq_length=max_length, strategy="bfd")
    tokens_out = sum(sum(seq) for seq in packed["seq_lengths"])
    if tokens_out != sum(lengths):
        raise RuntimeError(f"packing lost tokens: {sum(lengths)} in, {tokens_out} out")
    report = PackingReport(examples=len(lengths), rows=len(packed), tokens=tokens_out, max_length=max_length)
    info = report.as_dict()
    log.info(
        "packing: %d examples into %d rows of <= %d tokens (%.1f%% full)",
        info["examples"],
        info["rows"],
        max_length,
        100 * info["fill"],
    )
    return packed, report


def batch_token_count(batch: dict[str, Any]) -> int:
    """Real (non-padding) tokens in a collated batch, padded or padding-free."""
    mask = batch.get("attention_mask")
    if mask is not None:
        return int(mask.sum())
    return int(batch["input_ids"].numel())  # padding-free rows are not padded (no pad_to_multiple_of)
