"""Reward model on mistral_tiny: it learns the preferences, its merged export loads, `mistral-tune score` reads it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mistral_tune.cli import main
from mistral_tune.config.compose import compose
from mistral_tune.pipeline.run import run

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("single_thread")]


@pytest.fixture(scope="module")
def reward_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("reward") / "run"
    overrides = ["train.max_steps=60", "train.learning_rate=3e-3", "train.logging_steps=10", "data.holdout=4",
                 "export.num_samples=4", "train.save_steps=1000", "data.eval_split=0.1", "train.eval_steps=60",
                 f"output_dir={out}"]  # fmt: skip
    cfg = compose("reward_lora", overrides)
    return cfg, run(cfg)


def pair_accuracy(model, tokenizer, cfg) -> float:
    from mistral_tune.data.preference import prepare_preference_data
    from mistral_tune.inference.reward_scoring import score_ids

    train = prepare_preference_data(cfg.data, cfg.trainer, tokenizer).train
    chosen = score_ids(model, [r["prompt_ids"] + r["chosen_ids"] for r in train], tokenizer.pad_id)
    rejected = score_ids(model, [r["prompt_ids"] + r["rejected_ids"] for r in train], tokenizer.pad_id)
    return sum(c > r for c, r in zip(chosen, rejected)) / len(chosen)


def test_reward_model_learns_and_exports(reward_run):
    import torch
    from transformers import AutoModelForSequenceClassification

    import mistral_tune.models.loading as models
    from mistral_tune.models.sources import resolve_source
    from mistral_tune.models.tokenizer import load_tokenizer

    cfg, summary = reward_run
    run_dir = Path(summary["run_dir"])
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    for key in ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "tokens_seen"):
        assert all(key in r for r in records if "loss" in r), key
    assert summary["merged"]["verified"] and summary["merged"]["max_abs_logit_diff"] < 1e-4
    evals = [r for r in records if "eval_loss" in r]  # the eval split, scored once at the end
    assert len(evals) == 1 and "eval_num_tokens" not in evals[0]  # TRL's training-token count is not an eval number
    assert summary["final_eval_accuracy"] == evals[0]["eval_rewards/accuracies"]
    assert summary["final_accuracy"] == [r for r in records if "loss" in r][-1]["rewards/accuracies"]

    exported = AutoModelForSequenceClassification.from_pretrained(run_dir / "merged", dtype=torch.float32)
    assert exported.config.num_labels == 1 and exported.config.architectures == ["MistralForSequenceClassification"]
    assert not (run_dir / "merged" / "generation_config.json").exists()

    # Accuracy on the training pairs, scored independently of TRL: the untrained model (same seed, same random
    # score head) against the reloaded export.
    source = resolve_source(cfg.model.name)
    tokenizer = load_tokenizer(source)
    untrained = models.load_model(cfg.model, source, seed=cfg.train.seed, task="SEQ_CLS")
    untrained.config.pad_token_id = tokenizer.pad_id
    before, after = pair_accuracy(untrained, tokenizer, cfg), pair_accuracy(exported, tokenizer, cfg)
    print(f"reward accuracy on training pairs: {before:.3f} untrained -> {after:.3f} trained")
    assert after >= 0.75 and after - before >= 0.2

    samples = [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 4 and {"chosen_reward", "rejected_reward"} <= set(samples[0])


def test_score_command_prints_the_export_rewards(reward_run, capsys):
    import torch
    from transformers import AutoModelForSequenceClassification

    from mistral_tune.inference.reward_scoring import score_chats
    from mistral_tune.models.tokenizer import MistralTokenizer

    merged = Path(reward_run[1]["merged"]["path"])
    assert main(["score", f"preset={merged}", "prompt=What colour is milk?", "response=Milk is white."]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    model = AutoModelForSequenceClassification.from_pretrained(merged, dtype=torch.float32)
    chat = [{"role": "user", "content": "What colour is milk?"}, {"role": "assistant", "content": "Milk is white."}]
    expected = score_chats(model, MistralTokenizer.from_pretrained(merged), [chat])[0]
    assert printed["reward"] == pytest.approx(expected, abs=1e-5)

    assert main(["score", f"preset={merged}", "text=Milk is white."]) == 0
    assert "reward" in json.loads(capsys.readouterr().out.strip().splitlines()[-1])

    assert main(["score", f"preset={merged}", "file=data/preference_sample.jsonl"]) == 0
    out, err = capsys.readouterr()
    lines = [json.loads(line) for line in out.strip().splitlines()]
    assert len(lines) == 200 and {"chosen_reward", "rejected_reward"} <= set(lines[0])
    accuracy = sum(r["chosen_reward"] > r["rejected_reward"] for r in lines) / 200
    assert f"accuracy: {accuracy:.4f} ({round(accuracy * 200)} of 200 pairs; 0 unusable)" in err
