"""MistralCausalLMPreprocessor: keras-hub's packing for training and generation, on torch tensors."""

from __future__ import annotations

import pytest
import torch

from mistral_tune import MistralCausalLMPreprocessor
from mistral_tune.core.errors import UserError


def test_training_packing_shifts_by_one(plain_tokenizer):
    tok = plain_tokenizer
    pre = MistralCausalLMPreprocessor(tok, sequence_length=8)
    x, y, w = pre(["The quick brown fox", "a"])
    ids = [tok.bos_id, *tok.tokenize("The quick brown fox"), tok.eos_id]
    full = ids + [tok.pad_id] * (9 - len(ids))
    assert x["token_ids"][0].tolist() == full[:8] and y[0].tolist() == full[1:9]
    assert x["padding_mask"][0].tolist() == [i < len(ids) for i in range(8)]
    assert w[0].tolist() == [i < len(ids) for i in range(1, 9)]
    short = [tok.bos_id, *tok.tokenize("a"), tok.eos_id]
    assert int(x["padding_mask"][1].sum()) == len(short) and int(w[1].sum()) == len(short) - 1
    long_x, _, _ = pre("word " * 50)  # truncated to sequence_length
    assert long_x["token_ids"].shape == (8,) and bool(long_x["padding_mask"].all())
    with pytest.raises(UserError, match="derived"):
        pre("text", y="label")


def test_generate_preprocess_and_postprocess(plain_tokenizer):
    tok = plain_tokenizer
    pre = MistralCausalLMPreprocessor(tok, sequence_length=12)
    x = pre.generate_preprocess(["Hello there", "Bye"])
    assert x["token_ids"].shape == (2, 12) and x["padding_mask"].dtype == torch.bool
    assert x["token_ids"][0, : int(x["padding_mask"][0].sum())].tolist() == tok.encode("Hello there")  # BOS, no EOS
    assert pre.generate_preprocess("Bye", sequence_length=5)["token_ids"].shape == (5,)
    ids = x["token_ids"].clone()
    ids[0, int(x["padding_mask"][0].sum())] = tok.eos_id
    mask = x["padding_mask"].clone()
    mask[0, int(x["padding_mask"][0].sum())] = True
    assert pre.generate_postprocess({"token_ids": ids, "padding_mask": mask}) == ["Hello there", "Bye"]
    assert pre.get_config()["sequence_length"] == 12
