"""Padding-free packing: several tokenized examples per row, kept apart by their ``position_ids``.

``trainer.packing=true`` bins the tokenized examples into rows of at most ``trainer.max_length``
tokens with TRL's best-fit-decreasing packer (whole examples only: none is split or cut). In a
collated batch the ``position_ids`` restart at 0 for every example and the first label of each
example is ignored, so no token is trained to predict across a boundary. There is no
``attention_mask``: the boundaries live in the positions.

No attention crosses an example boundary, and Mistral's sliding window still applies inside
each example, with every backend mistral-tune offers:

- ``sdpa``, ``eager`` and ``flex_attention``: transformers derives a block-diagonal causal mask
  from the restarting ``position_ids`` (``masking_utils.find_packed_sequence_indices``, per batch
  row) and applies the window to the positions inside each example. This needs
  ``use_cache=False``, which the trainer sets: with a cache the packed layout is not detected.
  The batch keeps one row per packed row (``PackedRowsCollator``), so attention costs
  rows x length^2, not (rows x length)^2 as one flattened sequence with a dense mask would.
  (flex_attention trains on GPUs only: PyTorch has no flex-attention backward on CPU.)
- ``sdpa_packed`` (the default without flash-attn): the same rows, but each example gets its own
  causal SDPA call (mistral_tune.models.packed_attention), so attention costs the sum of the
  examples' squared lengths instead of rows x length^2, and no mask is built for the kernel.
- ``flash_attention_2``: its varlen kernel only reads packed sequences from a batch of one row,
  so TRL's padding-free collator flattens the batch and passes ``cu_seq_lens_q/k``.

Checked against the same examples unpacked, loss and gradients, in tests/data/test_packing.py.

Example:
    >>> packed, collator, flat, report = prepare_packing(dataset, 512, "sdpa", pad_token_id=0)
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

    Every example is at most ``max_length`` tokens already (mistral_tune.data.sft truncates or drops
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


@dataclass
class PackedRowsCollator:
    """Collate packed rows into ``input_ids``/``labels``/``position_ids`` of shape (rows, longest row).

    Rows without ``seq_lengths`` (unpacked examples, as in the eval split) count as one example each.

    Rows shorter than the longest are right-padded: pad tokens get position 0 (each one its own
    one-token "example", attending only to itself) and label -100, so they change nothing.
    """

    pad_token_id: int

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        import torch

        width = max(len(r["input_ids"]) for r in rows)
        input_ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(rows), width), -100, dtype=torch.long)
        position_ids = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            n = len(row["input_ids"])
            # An unpacked row (the eval split is not packed) is one example.
            positions = torch.cat([torch.arange(length) for length in row.get("seq_lengths", [n])])
            row_labels = torch.tensor(row["labels"], dtype=torch.long)
            row_labels[positions == 0] = -100  # an example's first token is nobody's next token
            input_ids[i, :n] = torch.tensor(row["input_ids"], dtype=torch.long)
            labels[i, :n] = row_labels
            position_ids[i, :n] = positions
        return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids}


def prepare_packing(dataset: Any, max_length: int, attn_implementation: str, pad_token_id: int):
    """Pack ``dataset`` and pick the batch layout for the attention backend.

    Returns (packed dataset, data collator or None for TRL's flattening padding-free one,
    flat: bool, PackingReport).
    """
    packed, report = pack_examples(dataset, max_length)
    flat = attn_implementation == "flash_attention_2"
    return packed, (None if flat else PackedRowsCollator(pad_token_id)), flat, report


def batch_token_count(batch: dict[str, Any]) -> int:
    """Real (non-padding) tokens in a collated batch, padded or packed.

    Packed batches carry no mask; their padding sits at the end of a row with position 0. Every
    example has at least two tokens (one-token examples have no loss token and are dropped by
    mistral_tune.data.sft), so a row's real tokens end at its last non-zero position.
    """
    mask = batch.get("attention_mask")
    if mask is not None:
        return int(mask.sum())
    positions = batch.get("position_ids")
    if positions is None:
        return int(batch["input_ids"].numel())
    nonzero = positions != 0
    width = positions.shape[-1]
    # index of the last non-zero position + 1, per row (0 for a row without any)
    last = width - nonzero.flip(-1).int().argmax(-1)
    return int((last * nonzero.any(-1)).sum())
