"""sdpa_packed: each packed example attends on its own; everything else is transformers' sdpa, unchanged.

Packed against unpacked (loss and gradients, sliding window, padded rows) is checked for every backend
in tests/data/test_packing.py; here: how rows are split, that the non-packed paths are sdpa's own,
and that the packed path really runs per example.
"""

from __future__ import annotations

import pytest
import torch

import mistral_tune.models.packed_attention as packed_attention
from mistral_tune.models.attention import pick_attn_implementation
from mistral_tune.models.packed_attention import packed_segments, window_mask
from tests.helpers import tiny_lora_model


def test_packed_segments_split_rows_where_positions_restart():
    positions = torch.tensor([[0, 1, 2, 0, 1, 0, 0, 0], [0, 1, 2, 3, 4, 5, 0, 1]])
    assert packed_segments(positions, 8, 8) == [[0, 3, 5, 6, 7, 8], [0, 6, 8]]
    # Nothing to split: no restart, no positions, a decoding step (query shorter than the keys).
    assert packed_segments(torch.arange(8)[None], 8, 8) is None
    assert packed_segments(torch.arange(5, 13)[None], 8, 8) is None  # a continuation, not a restart
    assert packed_segments(None, 8, 8) is None
    assert packed_segments(torch.tensor([[7]]), 1, 8) is None


def test_window_mask_sees_the_last_window_keys_only():
    mask = window_mask(5, 2, torch.device("cpu"))
    assert mask.tolist() == [
        [True, False, False, False, False],
        [True, True, False, False, False],
        [False, True, True, False, False],
        [False, False, True, True, False],
        [False, False, False, True, True],
    ]


@pytest.fixture(scope="module")
def models():
    assert pick_attn_implementation("sdpa_packed") == "sdpa_packed"
    return {attn: tiny_lora_model(attn).eval() for attn in ("sdpa", "sdpa_packed")}


def test_padded_batches_and_generation_are_exactly_sdpa(models):
    """No packing in sight: the same mask, the same kernel, bit-identical logits and tokens."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 32000, (2, 40), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :15] = 0  # left padding, as generation batches it
    with torch.no_grad():
        logits = {a: m(input_ids=ids, attention_mask=mask).logits for a, m in models.items()}
        tokens = {
            a: m.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
            for a, m in models.items()
        }
    assert torch.equal(logits["sdpa"], logits["sdpa_packed"])
    assert torch.equal(tokens["sdpa"], tokens["sdpa_packed"])


def test_packed_rows_run_one_attention_per_example(models, monkeypatch):
    """The decoder hands position_ids to the attention (transformers' behaviour this backend relies on); a
    packed row of 3 examples and 2 pad tokens is 3 SDPA calls a layer, the pads copied, none attended."""
    calls = []
    real = packed_attention._segment_attention

    def counting(q, k, v, **kwargs):
        calls.append(q.shape[1])
        return real(q, k, v, **kwargs)

    monkeypatch.setattr(packed_attention, "_segment_attention", counting)
    lengths = [10, 40, 6]  # 40 > the tiny preset's 32-token window
    positions = torch.cat([torch.arange(n) for n in lengths] + [torch.zeros(2, dtype=torch.long)])[None]
    ids = torch.randint(3, 32000, positions.shape, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        out = models["sdpa_packed"](input_ids=ids, position_ids=positions, use_cache=False).logits
        ref = models["sdpa"](input_ids=ids, position_ids=positions, use_cache=False).logits
    layers = models["sdpa"].get_base_model().config.num_hidden_layers
    assert calls == lengths * layers
    assert (out - ref).abs().max() < 1e-4


def test_one_row_of_positions_for_a_batch_splits_every_row(models):
    """Positions of shape (1, length) with a batch of 2 rows: both rows are split the same way."""
    positions = torch.cat([torch.arange(12), torch.arange(20)])[None]
    ids = torch.randint(3, 32000, (2, 32), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        out = models["sdpa_packed"](input_ids=ids, position_ids=positions, use_cache=False).logits
        ref = models["sdpa"](input_ids=ids, position_ids=positions.expand(2, -1), use_cache=False).logits
    assert out.shape == ref.shape and (out - ref).abs().max() < 1e-4
