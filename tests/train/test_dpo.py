"""Preference recipes compose and validate; the DPO settings are checked against the installed TRL."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from mistral_tune.compat.trl import dpo_loss_types
from mistral_tune.config.compose import compose
from mistral_tune.pipeline.run import run
from tests.helpers import read_metrics as metrics


@pytest.fixture(scope="module")
def tiny_dpo_trainer(tmp_path_factory):
    """A real MistralDPOTrainer on mistral_tiny with 4 sample pairs (built once)."""
    import mistral_tune.adapters.build as adapters
    import mistral_tune.models.loading as models
    from mistral_tune.models.sources import resolve_source
    from mistral_tune.models.tokenizer import load_tokenizer
    from mistral_tune.train import dpo

    cfg = compose("dpo_lora", ["data.max_samples=2", "data.holdout=0", "train.per_device_train_batch_size=2"])
    source = resolve_source(cfg.model.name)
    tokenizer = load_tokenizer(source)
    model = adapters.apply_adapter(models.load_model(cfg.model, source), cfg.adapter)
    data = dpo.prepare_data(cfg, tokenizer)
    return dpo.build_trainer(cfg, model, tokenizer, data, tmp_path_factory.mktemp("dpo"), [])


LN2 = math.log(2)


def completion_logps(model, prompts: list[list[int]], answers: list[list[int]], batch_size: int = 32) -> list[float]:
    """Sum of log p(answer | prompt) per pair, computed here independently of TRL (right-padded batches)."""
    import torch

    out = []
    for i in range(0, len(prompts), batch_size):
        seqs = [p + a for p, a in zip(prompts[i : i + batch_size], answers[i : i + batch_size])]
        width = max(map(len, seqs))
        ids = torch.tensor([s + [0] * (width - len(s)) for s in seqs])
        mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs])
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits[:, :-1].float(), -1)
        token_logp = logp.gather(-1, ids[:, 1:, None])[..., 0]
        for row, p, a in zip(token_logp, prompts[i : i + batch_size], answers[i : i + batch_size]):
            out.append(row[len(p) - 1 : len(p) - 1 + len(a)].sum().item())  # the answer tokens only
    return out


# Shared by every run here: small, quiet, no samples unless a test asks for them.
QUICK = ["train.logging_steps=1", "export.num_samples=0", "data.holdout=0", "train.save_steps=1000"]


def metrics_first_logps(out: Path, common: list[str]) -> float:
    run(compose("dpo_lora", [*common, "train.max_steps=1", f"output_dir={out}"]))
    return metrics(out)[0]["logps/chosen"]


DPO_LOSS_TYPES = dpo_loss_types()  # the one list: validation and the trainer both read it


def test_loss_types_match_installed_trl():
    from mistral_tune.train.dpo import installed_loss_types

    assert set(DPO_LOSS_TYPES) == set(installed_loss_types())
    assert {"sigmoid", "ipo", "hinge", "robust"} <= set(DPO_LOSS_TYPES)


@pytest.mark.parametrize("loss", DPO_LOSS_TYPES)
def test_every_loss_type_runs_in_trl(loss, tiny_dpo_trainer):
    import math

    import torch

    trainer = tiny_dpo_trainer
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(2)])
    trainer.loss_types, trainer.loss_weights = [loss], [1.0]
    trainer.label_smoothing = 0.001 if loss == "exo_pair" else 0.0
    with torch.no_grad():
        value = trainer.compute_loss(trainer.model, batch).item()
    assert math.isfinite(value)
    if loss == "sigmoid":  # adapter at its start: policy == reference, so the DPO loss is exactly ln 2
        assert value == pytest.approx(math.log(2), abs=1e-5)


def test_unknown_loss_type_is_refused_by_trl(tiny_dpo_trainer):
    trainer = tiny_dpo_trainer
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(2)])
    trainer.loss_types, trainer.loss_weights = ["not_a_loss"], [1.0]
    with pytest.raises(ValueError, match="Unknown loss type"):
        trainer.compute_loss(trainer.model, batch)


def test_settings_reach_dpo_config(tmp_path):
    from mistral_tune.train.dpo import dpo_config

    cfg = compose(
        "dpo_lora",
        ["trainer.beta=0.3", "trainer.loss_type=sigmoid+sft", "trainer.loss_weights=[1.0,0.2]",
         "trainer.label_smoothing=0.1", "trainer.max_length=96", "trainer.precompute_ref_log_probs=true"],
    )  # fmt: skip
    args = dpo_config(cfg, tmp_path)
    assert (args.beta, args.loss_type, args.loss_weights, args.label_smoothing) == (
        0.3,
        ["sigmoid", "sft"],
        [1.0, 0.2],
        0.1,
    )
    assert (args.max_length, args.precompute_ref_log_probs) == (96, True)


@pytest.mark.slow
@pytest.mark.usefixtures("single_thread")
def test_dpo_lora_learns_the_preferences(tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    import mistral_tune.models.loading as models
    from mistral_tune.data.preference import prepare_preference_data
    from mistral_tune.models.sources import resolve_source
    from mistral_tune.models.tokenizer import load_tokenizer

    # 12 steps * 8 pairs: the tiny base is random, so a high lr and all-linear LoRA make the signal show fast.
    overrides = [
        "train.max_steps=12", "train.learning_rate=5e-3", "train.warmup_steps=2", "trainer.beta=0.3",
        "adapter.target_modules=[all-linear]", "train.logging_steps=4", "data.holdout=4", "export.num_samples=2",
        "data.eval_split=0.1", "train.eval_steps=12", f"output_dir={tmp_path / 'dpo'}",
    ]  # fmt: skip
    cfg = compose("dpo_lora", overrides)
    summary = run(cfg)
    run_dir = Path(cfg.output_dir)

    records = metrics(run_dir)
    train_records = [r for r in records if "loss" in r]
    assert len(train_records) == 3
    for key in ("step", "loss", "learning_rate", "tokens_seen", "tokens_per_second", "elapsed_seconds",
                "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                "logps/chosen", "logps/rejected"):  # fmt: skip
        assert all(key in r for r in train_records), key
    assert min(r["loss"] for r in train_records) < LN2
    assert summary["tokens_seen"] > 0 and (summary["data"]["used"], summary["data"]["eval_used"]) == (176, 20)
    evals = [r for r in records if "eval_loss" in r]  # data.eval_split, evaluated at step 12
    assert len(evals) == 1 and "eval_rewards/accuracies" in evals[0] and summary["final_eval_loss"] is not None
    assert "eval_num_tokens" not in evals[0]  # TRL's count of training tokens, not an eval quantity
    # Held-out preference accuracy next to the training one, and the random base's caveat.
    assert summary["final_eval_accuracy"] == evals[-1]["eval_rewards/accuracies"]
    assert summary["final_accuracy"] == train_records[-1]["rewards/accuracies"]
    assert any("memorisation" in note for note in summary["notes"])

    # Independent check on every training pair: DPO's implicit reward beta * log(pi / pi_ref), with the
    # reloaded merged export as pi and the same random-init base as pi_ref.
    policy = AutoModelForCausalLM.from_pretrained(run_dir / "merged", dtype=torch.float32).eval()
    source = resolve_source(cfg.model.name)
    reference = models.load_model(cfg.model, source, seed=cfg.train.seed).eval()
    tokenizer = load_tokenizer(source)
    train_ds = prepare_preference_data(cfg.data, cfg.trainer, tokenizer).train
    prompts, chosen, rejected = (list(train_ds[c]) for c in ("prompt_ids", "chosen_ids", "rejected_ids"))
    logps = {
        (name, side): completion_logps(model, prompts, answers)
        for name, model in (("policy", policy), ("reference", reference))
        for side, answers in (("chosen", chosen), ("rejected", rejected))
    }
    margins = [
        cfg.trainer.beta * ((pc - rc) - (pr - rr))
        for pc, rc, pr, rr in zip(
            logps["policy", "chosen"], logps["reference", "chosen"], logps["policy", "rejected"],
            logps["reference", "rejected"],
        )
    ]  # fmt: skip
    accuracy = sum(m > 0 for m in margins) / len(margins)
    loss = sum(-torch.nn.functional.logsigmoid(torch.tensor(m)).item() for m in margins) / len(margins)
    print(f"DPO on training pairs: accuracy {accuracy:.3f}, loss {loss:.4f} (ln 2 = {LN2:.4f})")
    assert accuracy >= 0.65
    assert loss < LN2 - 0.1

    # Only the trained adapter is saved (TRL's frozen "ref" copy is dropped), and the export was verified.
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()
    assert not (run_dir / "adapter" / "ref").exists()
    assert summary["merged"]["verified"] and summary["merged"]["max_abs_logit_diff"] < 1e-4
    samples = [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 2 and {"prompt", "chosen", "rejected", "generation"} <= set(samples[0])
    assert "reference" not in samples[0] and samples[0]["chosen"] != samples[0]["rejected"]


@pytest.mark.slow
@pytest.mark.usefixtures("single_thread")
def test_precomputed_reference_log_probs_are_cached(tmp_path):
    """dpo_full: precompute (cache miss), again (cache hit, same losses), and a frozen-copy reference."""
    common = [*QUICK, "train.max_steps=2", "data.max_samples=16", "export.merged=false",
              f"trainer.ref_cache_dir={tmp_path / 'cache'}"]  # fmt: skip
    first = run(compose("dpo_full", [*common, f"output_dir={tmp_path / 'a'}"]))
    second = run(compose("dpo_full", [*common, f"output_dir={tmp_path / 'b'}"]))
    copy_ref = run(
        compose("dpo_full", [*common, "trainer.precompute_ref_log_probs=false", f"output_dir={tmp_path / 'c'}"])
    )

    assert first["ref_logps_cache"]["train"]["hit"] is False
    assert second["ref_logps_cache"]["train"]["hit"] is True
    assert second["ref_logps_cache"]["train"]["path"] == first["ref_logps_cache"]["train"]["path"]
    assert len(list((tmp_path / "cache").glob("*.json"))) == 1
    assert "ref_logps_cache" not in copy_ref
    a, b, c = (metrics(tmp_path / d) for d in "abc")
    assert [r["loss"] for r in a] == [r["loss"] for r in b]  # the cached values are the computed ones
    # Before the first update the policy is its own reference: the loss is ln 2 whichever way it is obtained.
    for records in (a, c):
        assert records[0]["loss"] == pytest.approx(LN2, abs=1e-4)
    assert [r["loss"] for r in c] == pytest.approx([r["loss"] for r in a], abs=1e-4)
    assert not (tmp_path / "a" / "adapter").exists()  # full fine-tuning writes no adapter


@pytest.mark.slow
@pytest.mark.usefixtures("single_thread")
def test_sft_then_dpo_from_merged_model_or_sft_adapter(tmp_path):
    sft_args = [*QUICK, "train.max_steps=4", "train.warmup_steps=0", "data.max_samples=32"]
    sft = run(compose("sft_lora", [*sft_args, f"output_dir={tmp_path / 'sft'}"]))
    common = [*QUICK, "train.max_steps=2", "data.max_samples=16", "export.merged=false"]
    from_merged = run(
        compose("dpo_lora", [*common, f"model.path={sft['merged']['path']}", f"output_dir={tmp_path / 'm'}"])
    )
    from_adapter = run(
        compose("dpo_lora", [*common, f"adapter.resume_from={sft['adapter']}", f"output_dir={tmp_path / 'r'}"])
    )
    assert from_merged["steps"] == from_adapter["steps"] == 2
    m, r = metrics(tmp_path / "m"), metrics(tmp_path / "r")
    # The reference is the SFT model in both flows, so DPO starts at exactly ln 2 ...
    assert m[0]["loss"] == pytest.approx(LN2, abs=1e-4) and r[0]["loss"] == pytest.approx(LN2, abs=1e-4)
    # ... and both start from the same policy: base + SFT adapter equals the merged SFT model.
    assert r[0]["logps/chosen"] == pytest.approx(m[0]["logps/chosen"], rel=1e-4)
    # A fresh base scores the same pairs differently: the SFT weights were really used.
    base = metrics_first_logps(tmp_path / "base", common)
    assert abs(base - m[0]["logps/chosen"]) > 0.1


@pytest.mark.slow
@pytest.mark.usefixtures("single_thread")
def test_dpo_resume_continues_exactly(tmp_path):
    """A DPO run resumed from its step-2 checkpoint (policy and TRL's reference adapter) logs the same losses."""
    import shutil

    args = [*QUICK, "train.max_steps=4", "train.save_steps=2", "data.max_samples=16", "export.merged=false",
            "train.per_device_train_batch_size=4", "train.warmup_steps=0", f"output_dir={tmp_path}"]  # fmt: skip
    first = run(compose("dpo_lora", args))
    uninterrupted = [r["loss"] for r in metrics(tmp_path)]
    shutil.rmtree(tmp_path / "checkpoints" / "checkpoint-4")  # as if killed before the last save
    resumed = run(compose("dpo_lora", [*args, "resume=auto"]))
    assert resumed["resumed_from"].endswith("checkpoint-2")
    assert [r["loss"] for r in metrics(tmp_path)] == uninterrupted
    assert resumed["tokens_seen"] == first["tokens_seen"]
