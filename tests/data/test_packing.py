"""Packed batches train exactly like the same examples unpacked, sliding window included."""

from __future__ import annotations

import functools

import pytest
import torch
from datasets import Dataset
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

import mistral_tune.train.lm_head_loss as losses
from mistral_tune.benchmark import flops
from mistral_tune.data.packing import PackedRowsCollator, batch_token_count, pack_examples
from mistral_tune.models.attention import pick_attn_implementation
from tests.helpers import tiny_lora_model

# mistral_tiny has sliding_window=32: 70 and 100 tokens run past it, 5 and 20 do not.
LENGTHS = (70, 5, 100, 20, 33)


def _examples(lengths=LENGTHS, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        ids = torch.randint(3, 32000, (n,), generator=g).tolist()
        labels = [-100] * (n // 3) + ids[n // 3 :]  # a prompt without loss, like chat data
        out.append({"input_ids": ids, "labels": labels})
    return out


@functools.cache
def _model(attn: str, sliding_window=32):
    if attn == "sdpa_packed":
        pick_attn_implementation(attn)  # registers it with transformers
    return tiny_lora_model(attn, sliding_window=sliding_window)


def _loss_and_grads(model, batch, chunked=False):
    model.zero_grad()
    batch = {**batch, "use_cache": False}
    if chunked:
        labels = batch.pop("labels")
        with losses.capture_lm_head_input(model) as captured:
            model(**batch)
        loss = losses.causal_lm_loss(captured["hidden"], losses.output_head(model), labels, impl="chunked")
    else:
        loss = model(**batch).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def _packed_batch(examples, max_length=128, layout="rows"):
    """``rows``: mistral_tune's (rows, longest row) batch; ``flat``: TRL's one flattened row (flash-attn)."""
    packed, report = pack_examples(Dataset.from_list(examples), max_length)
    if layout == "flat":
        batch = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)(list(packed))
    else:
        batch = PackedRowsCollator(pad_token_id=0)(list(packed))
    return batch, report


def _padded_batch(examples):
    return DataCollatorForLanguageModeling(pad_token_id=0)(examples)


def test_example_lengths_of_padded_and_packed_batches():
    padded = {"input_ids": torch.zeros(2, 5), "attention_mask": torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])}
    packed = {"input_ids": torch.zeros(2, 6), "position_ids": torch.tensor([[0, 1, 2, 0, 1, 2], [0, 1, 0, 1, 0, 0]])}
    assert flops.example_lengths(padded) == [3, 5]
    assert flops.example_lengths(packed) == [3, 3, 2, 2]  # the second row ends in two padding tokens
    assert batch_token_count(packed) == 10 and batch_token_count(padded) == 8


@pytest.mark.parametrize(
    "attn, layout", [("sdpa_packed", "rows"), ("sdpa", "rows"), ("eager", "rows"), ("sdpa", "flat")]
)
def test_packed_equals_unpacked_loss_and_gradients(attn, layout):
    examples = _examples()
    model = _model(attn)
    packed, report = _packed_batch(examples, layout=layout)
    assert "attention_mask" not in packed
    assert packed["input_ids"].shape[0] == (1 if layout == "flat" else report.rows)
    assert 1 < report.rows < len(examples)  # several examples share a row, and rows are padded
    assert batch_token_count(packed) == sum(LENGTHS) == batch_token_count(_padded_batch(examples))

    ref_loss, ref_grads = _loss_and_grads(model, _padded_batch(examples))
    for chunked in (False, True):
        loss, grads = _loss_and_grads(model, packed, chunked=chunked)
        assert torch.allclose(loss, ref_loss, atol=1e-5), (attn, chunked, loss, ref_loss)
        for name, g in grads.items():
            assert torch.allclose(g, ref_grads[name], atol=1e-5, rtol=1e-4), (attn, chunked, name)


@pytest.mark.parametrize("attn", ["sdpa", "sdpa_packed"])
def test_the_check_can_fail_without_document_separation(attn):
    examples = _examples()
    model = _model(attn)
    packed, _ = _packed_batch(examples)
    ref_loss, _ = _loss_and_grads(model, _padded_batch(examples))
    leaky = {**packed, "position_ids": torch.arange(packed["input_ids"].shape[1])[None]}
    loss, _ = _loss_and_grads(model, leaky)
    assert not torch.allclose(loss, ref_loss, atol=1e-3)  # attending across examples changes the loss


@pytest.mark.parametrize("attn", ["sdpa", "sdpa_packed"])
def test_sliding_window_still_applies_inside_each_packed_example(attn):
    examples = _examples()
    packed, _ = _packed_batch(examples)
    windowed, _ = _loss_and_grads(_model(attn, sliding_window=32), packed)
    full, _ = _loss_and_grads(_model(attn, sliding_window=None), packed)
    per_example, _ = _loss_and_grads(_model("sdpa", sliding_window=32), _padded_batch(examples))
    assert torch.allclose(windowed, per_example, atol=1e-5)
    assert not torch.allclose(windowed, full, atol=1e-4)  # same weights; only the window differs


def test_pack_examples_keeps_every_token_and_reports_fill():
    examples = _examples((10, 20, 30, 40, 50, 60))
    packed, report = pack_examples(Dataset.from_list(examples), max_length=64)
    info = report.as_dict()
    assert info["examples"] == 6 and info["tokens"] == 210
    assert info["rows"] == len(packed) == 4  # 210 tokens need at least ceil(210 / 64) = 4 rows
    assert all(sum(lengths) <= 64 for lengths in packed["seq_lengths"])
    assert info["fill"] == round(210 / (4 * 64), 4)
    with pytest.raises(ValueError, match="more than the packing length"):
        pack_examples(Dataset.from_list(examples), max_length=32)


def test_sft_trainer_with_packing_and_chunked_loss_matches_plain_padded(compose, tmp_path):
    """Config to trainer to collator to loss: trainer.packing + trainer.loss=chunked give the plain loss."""
    import mistral_tune.adapters.build as adapters
    import mistral_tune.data.sft as data
    import mistral_tune.models.loading as models
    from mistral_tune.models.sources import resolve_source
    from mistral_tune.models.tokenizer import load_tokenizer
    from mistral_tune.train.sft import build_sft_trainer

    common = ["adapter.lora_dropout=0.0", "train.per_device_train_batch_size=12", "data.max_samples=12"]
    packed_cfg = compose("sft_lora", [*common, "trainer.packing=true", "trainer.loss=chunked"])
    plain_cfg = compose("sft_lora", [*common, "trainer.loss=plain"])
    source = resolve_source("mistral_tiny")
    tokenizer = load_tokenizer(source)
    model = adapters.apply_adapter(models.load_model(plain_cfg.model, source, seed=0), plain_cfg.adapter)
    dataset = data.prepare_sft_data(plain_cfg.data, plain_cfg.trainer, tokenizer).train
    assert len(dataset) == 12 and max(len(x) for x in dataset["input_ids"]) > 32  # past the sliding window

    losses_seen = {}
    for name, cfg in (("packed", packed_cfg), ("plain", plain_cfg)):
        trainer = build_sft_trainer(cfg, model, tokenizer.to_hf(), dataset, tmp_path / name, [])
        (batch,) = list(trainer.get_train_dataloader())  # all 12 examples in one batch
        if name == "packed":
            assert "attention_mask" not in batch
            assert batch["position_ids"].shape[0] == trainer.packing_report.rows < 12  # one row per packed row
        model.train()
        losses_seen[name] = trainer.compute_loss(model, trainer._prepare_inputs(batch)).item()
        assert trainer.tokens_seen == sum(len(x) for x in dataset["input_ids"])
    assert losses_seen["packed"] == pytest.approx(losses_seen["plain"], abs=1e-5)
