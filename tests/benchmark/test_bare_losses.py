"""The bench's bare loops compute the same loss as the trainers they are paired with (DPO, reward)."""

from __future__ import annotations

import copy

import pytest
import torch

from mistral_tune.benchmark.worker import _token_stats, bare_dpo_loss, bare_reward_loss


def _setup(recipe: str, task: str):
    import mistral_tune.adapters.build as adapters
    import mistral_tune.models.loading as models
    from mistral_tune.config.compose import compose
    from mistral_tune.models.sources import resolve_source
    from mistral_tune.models.tokenizer import load_tokenizer
    from mistral_tune.train.base import get_trainer

    cfg = compose(recipe, ["data.max_samples=8", "data.holdout=0", "train.per_device_train_batch_size=4"])
    method = get_trainer(cfg.trainer.name)
    source = resolve_source(cfg.model.name)
    tokenizer = load_tokenizer(source)
    model = models.load_model(cfg.model, source, seed=0, task=method.TASK_TYPE)
    model = adapters.apply_adapter(model, cfg.adapter, task_type=method.TASK_TYPE)
    return cfg, method, tokenizer, model, method.prepare_data(cfg, tokenizer)


def _perturb_lora(model, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B.default" in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)


def test_bare_dpo_loss_equals_the_trainer_loss(tmp_path):
    cfg, method, tokenizer, model, data = _setup("dpo_lora", "CAUSAL_LM")
    trainer = method.build_trainer(cfg, model, tokenizer, data, tmp_path, [])
    _perturb_lora(trainer.model, seed=3)  # after TRL copied the starting adapter as "ref": policy != reference
    batch = trainer.data_collator([data.train[i] for i in range(4)])
    with torch.no_grad():
        expected = trainer.compute_loss(trainer.model, dict(batch))
        got = bare_dpo_loss(trainer.model, batch, cfg.trainer.beta)
    assert abs(float(expected) - 0.6931) > 1e-4  # not the trivial ln 2 of policy == reference
    assert float(got) == pytest.approx(float(expected), rel=1e-5, abs=1e-6)
    stats = _token_stats(batch)
    assert stats["label_tokens"] == int(batch["completion_mask"][:, 1:].sum()) < stats["tokens"]


def test_bare_reward_loss_equals_the_trainer_loss(tmp_path):
    cfg, method, tokenizer, model, data = _setup("reward_lora", "SEQ_CLS")
    trainer = method.build_trainer(cfg, model, tokenizer, data, tmp_path, [])
    _perturb_lora(trainer.model, seed=4)
    batch = trainer.data_collator([data.train[i] for i in range(4)])
    with torch.no_grad():
        expected = trainer.compute_loss(trainer.model, copy.copy(batch))
        got = bare_reward_loss(trainer.model, batch)
    assert float(got) == pytest.approx(float(expected), rel=1e-5, abs=1e-6)
    assert _token_stats(batch)["label_tokens"] == 8  # one score per sequence: 4 chosen + 4 rejected
