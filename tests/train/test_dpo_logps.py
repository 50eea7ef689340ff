"""DPO log-probs on completion tokens only (lm_head_loss.token_logprobs) equal stock TRL's fused head.

The kernel against TRL's ChunkedLogProbFunction (values and gradients, frozen and trained head), then whole
trainers: a stock TRL ``DPOTrainer`` and our ``MistralDPOTrainer`` on the same model and the same batch must give
the same loss, rewards, log-probs, logits, entropy and token accuracy (1e-5) and the same gradients.
"""

from __future__ import annotations

import copy

import pytest
import torch

import mistral_tune.train.lm_head_loss as heads
from mistral_tune.compat.trl import has_trl_fused_lm_head, is_routed, trainer_metrics

ALL = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1")


@pytest.mark.parametrize("train_head", [False, True])
@pytest.mark.parametrize("chunk_size", [1, 7, 4096])
def test_token_logprobs_equal_trl_kernel(train_head, chunk_size):
    from trl.kernels import ChunkedLogProbFunction

    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(37, 16, generator=g, requires_grad=True)
    weight = (torch.randn(50, 16, generator=g) * 2).requires_grad_(train_head)
    targets = torch.randint(0, 50, (37,), generator=g)
    upstream = torch.randn(37, generator=g)  # a per-row gradient, as the DPO loss gives

    ref = ChunkedLogProbFunction.apply(hidden, weight, None, targets, 1.0, 32768, None, 1.0, ALL)
    (ref[0] * upstream).sum().backward()
    ref_grads = (hidden.grad.clone(), weight.grad.clone() if train_head else None)
    hidden.grad, weight.grad = None, None

    got = heads.token_logprobs(hidden, weight, targets, ALL[1:], chunk_size=chunk_size)
    (got[0] * upstream).sum().backward()
    for name, a, b in zip(ALL, ref, got):
        if name == "is_top1":
            assert torch.equal(a, b), name
        else:
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5, msg=name)
    torch.testing.assert_close(hidden.grad, ref_grads[0], rtol=1e-5, atol=1e-5)
    if train_head:
        torch.testing.assert_close(weight.grad, ref_grads[1], rtol=1e-5, atol=1e-5)
    else:
        assert weight.grad is None


def test_token_logprobs_leave_out_unrequested_outputs_and_take_no_rows():
    hidden = torch.randn(0, 8, requires_grad=True)
    out = heads.token_logprobs(hidden, torch.randn(20, 8), torch.zeros(0, dtype=torch.long), ())
    assert out[0].shape == (0,) and all(x is None for x in out[1:])
    out[0].sum().backward()  # an empty batch still backpropagates
    assert hidden.grad.shape == (0, 8)


def test_chunks_stay_small_for_any_vocabulary():
    assert heads.logprob_chunk_rows(32000) * 32000 * 4 <= 16 * 2**20
    assert heads.logprob_chunk_rows(131072) >= 1 and heads.logprob_chunk_rows(10**9) == 1


def _perturb(module: torch.nn.Module, names: tuple[str, ...], seed: int, scale: float) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in module.named_parameters():
            if any(k in n for k in names):
                p.add_(torch.randn(p.shape, generator=g) * scale)


def _raw_pairs():
    from datasets import Dataset

    return Dataset.from_dict({"prompt": ["one two"], "chosen": [" three"], "rejected": [" four"]})


def _step(trainer, batch) -> tuple[float, dict[str, float], dict[str, torch.Tensor]]:
    trainer.model.train()
    trainer.model.zero_grad()
    loss = trainer.compute_loss(trainer.model, dict(batch))
    loss.backward()
    loss = loss.detach()
    metrics = {k: v[-1] for k, v in trainer_metrics(trainer, "train").items()}
    grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
    return float(loss), metrics, grads


def _assert_same(ours, stock):
    loss, metrics, grads = ours
    ref_loss, ref_metrics, ref_grads = stock
    assert loss == pytest.approx(ref_loss, rel=1e-5, abs=1e-5)
    assert set(metrics) == set(ref_metrics)
    for key in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen"):
        assert key in metrics
    for key, value in ref_metrics.items():
        assert metrics[key] == pytest.approx(value, rel=1e-5, abs=1e-5), key
    assert set(grads) == set(ref_grads) and grads
    for name, grad in ref_grads.items():  # fp32 sums in another order: equal to 1e-5 of each gradient's size
        error = float((grads[name] - grad).norm() / grad.norm().clamp_min(1e-30))
        assert error < 1e-5, f"{name}: relative gradient difference {error:.2e}"


@pytest.fixture(scope="module")
def lora_setup():
    import mistral_tune.adapters.build as adapters
    import mistral_tune.models.loading as models
    from mistral_tune.config.compose import compose
    from mistral_tune.models.sources import resolve_source
    from mistral_tune.models.tokenizer import load_tokenizer
    from mistral_tune.train import dpo

    cfg = compose(
        "dpo_lora",
        ["data.max_samples=8", "data.holdout=0", "train.per_device_train_batch_size=4", "trainer.max_length=48"],
    )
    source = resolve_source(cfg.model.name)
    tokenizer = load_tokenizer(source)
    model = adapters.apply_adapter(models.load_model(cfg.model, source, seed=0), cfg.adapter)
    data = dpo.prepare_data(cfg, tokenizer)
    return cfg, tokenizer, model, data


@pytest.mark.parametrize("loss_type", ["sigmoid", "sigmoid+sft", "ipo"])
def test_lora_dpo_step_equals_stock_trl(lora_setup, tmp_path, loss_type):
    from trl import DPOTrainer

    from mistral_tune.train import dpo

    cfg, tokenizer, model, data = lora_setup
    cfg = copy.deepcopy(cfg)
    cfg.trainer.loss_type = loss_type
    cfg.trainer.loss_weights = [1.0, 0.5] if "+" in loss_type else None
    ours = dpo.build_trainer(cfg, copy.deepcopy(model), tokenizer, data, tmp_path / "ours", [])
    stock = DPOTrainer(
        model=copy.deepcopy(model),
        args=dpo.dpo_config(cfg, tmp_path / "stock"),
        train_dataset=_raw_pairs(),
        processing_class=tokenizer.to_hf(),
    )
    assert ours.routed_heads == ("policy",)
    assert is_routed(ours.model.get_base_model())
    assert has_trl_fused_lm_head(stock.model.get_base_model())  # stock is really TRL's own head
    for trainer in (ours, stock):  # TRL keeps the starting adapter as the reference: move the policy off it
        _perturb(trainer.model, ("lora_B.default",), seed=1, scale=0.05)
    batch = ours.data_collator([data.train[i] for i in range(4)])
    assert (batch["completion_mask"].sum() < batch["attention_mask"].sum()).item()  # prompts are left out
    base, calls = ours.model.get_base_model(), []
    routed = base.forward

    def spy(*args, **kwargs):  # TRL's loss must call the head we routed, fused, with labels (canary)
        calls.append((kwargs.get("fused_lm_head"), kwargs.get("labels") is not None))
        return routed(*args, **kwargs)

    base.forward = spy
    result = _step(ours, batch)
    base.forward = routed
    assert calls == [(True, True), (True, True)]  # the policy, then the reference (adapter "ref")
    _assert_same(result, _step(stock, batch))
    assert result[1]["rewards/margins"] != 0.0


def test_full_finetuning_with_a_reference_copy_equals_stock_trl(lora_setup, tmp_path):
    """No adapter: the head trains (the backward recomputes its chunks) and the reference is a frozen copy."""
    from trl import DPOTrainer

    import mistral_tune.models.loading as models
    from mistral_tune.config.compose import compose
    from mistral_tune.models.sources import resolve_source
    from mistral_tune.train import dpo

    _, tokenizer, _, data = lora_setup
    cfg = compose(
        "dpo_full",
        ["train.per_device_train_batch_size=4", "trainer.max_length=48", "trainer.precompute_ref_log_probs=false"],
    )
    base = models.load_model(cfg.model, resolve_source(cfg.model.name), seed=0)
    policy = copy.deepcopy(base)
    _perturb(policy, ("layers.1.mlp", "lm_head"), seed=2, scale=0.01)

    def build(cls, **kwargs):
        return cls(
            model=copy.deepcopy(policy),
            ref_model=copy.deepcopy(base).eval().requires_grad_(False),
            args=dpo.dpo_config(cfg, tmp_path / cls.__name__),
            processing_class=tokenizer.to_hf(),
            **kwargs,
        )

    ours = build(dpo.MistralDPOTrainer, train_dataset=data.train)
    stock = build(DPOTrainer, train_dataset=_raw_pairs())
    assert ours.routed_heads == ("policy", "reference")
    batch = ours.data_collator([data.train[i] for i in range(4)])
    result = _step(ours, batch)
    _assert_same(result, _step(stock, batch))
    assert "lm_head.weight" in result[2]


def test_precomputed_reference_logps_equal_stock_trl(lora_setup, tmp_path):
    from trl import DPOTrainer

    from mistral_tune.train import dpo

    cfg, tokenizer, model, data = lora_setup
    cfg = copy.deepcopy(cfg)
    cfg.trainer.precompute_ref_log_probs = True
    args = dpo.dpo_config(cfg, tmp_path)
    train = data.train.select(range(4))
    ours = dpo.MistralDPOTrainer(
        model=copy.deepcopy(model), args=args, train_dataset=train, processing_class=tokenizer.to_hf()
    )
    assert ours.routed_heads == ("policy",)  # routed before TRL's precompute, inside its __init__
    stock = DPOTrainer(
        model=copy.deepcopy(model), args=args, train_dataset=_raw_pairs(), processing_class=tokenizer.to_hf()
    )
    batch = stock.data_collator([train[i] for i in range(4)])
    with torch.no_grad():
        ref_chosen, ref_rejected = stock.compute_ref_log_probs(stock.model, batch)
    torch.testing.assert_close(torch.tensor(ours.train_dataset["ref_chosen_logps"]), ref_chosen, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(
        torch.tensor(ours.train_dataset["ref_rejected_logps"]), ref_rejected, rtol=1e-5, atol=1e-4
    )


def test_routing_can_be_switched_off(lora_setup, tmp_path):
    from mistral_tune.train import dpo

    cfg, tokenizer, model, data = lora_setup
    trainer = dpo.MistralDPOTrainer(
        model=copy.deepcopy(model),
        args=dpo.dpo_config(cfg, tmp_path),
        train_dataset=data.train,
        processing_class=tokenizer.to_hf(),
        completion_logps=False,
    )
    assert trainer.routed_heads == () and has_trl_fused_lm_head(trainer.model.get_base_model())
