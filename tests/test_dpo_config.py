"""Preference recipes compose and validate; the DPO settings are checked against the installed TRL."""

from __future__ import annotations

import pytest

from mistral_tune.cli import main
from mistral_tune.compat.trl import dpo_loss_types
from mistral_tune.config.compose import compose
from mistral_tune.core.errors import UserError

DPO_LOSS_TYPES = dpo_loss_types()  # the one list: validation and the trainer both read it

RECIPES = ("dpo_lora", "dpo_qlora", "dpo_full", "reward_lora")


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipes_compose(recipe):
    cfg = compose(recipe, [])
    assert cfg.trainer.name == ("reward" if recipe.startswith("reward") else "dpo")
    assert cfg.data.path == "data/preference_sample.jsonl"
    assert cfg.adapter.name == {"dpo_lora": "lora", "dpo_qlora": "qlora", "dpo_full": "none"}.get(recipe, "lora")


def test_loss_types_match_installed_trl():
    from mistral_tune.train.dpo import installed_loss_types

    assert set(DPO_LOSS_TYPES) == set(installed_loss_types())
    assert {"sigmoid", "ipo", "hinge", "robust"} <= set(DPO_LOSS_TYPES)


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


@pytest.mark.parametrize(
    "override,message",
    [
        ("trainer.loss_type=sigmoidd", "unknown ['sigmoidd']"),
        ("trainer.label_smoothing=0.5", "label_smoothing=0.5 must be in [0, 0.5)"),
        ("trainer.loss_type=exo_pair", "exo_pair needs trainer.label_smoothing > 0"),
        ("trainer.truncation_mode=middle", "truncation_mode='middle' is not one of keep_start, keep_end"),
        ("trainer.beta=0", "trainer.beta=0.0 must be > 0"),
        ("trainer.max_prompt_length=64", "max_prompt_length=64 must be > 1 and below trainer.max_length=64"),
        ("trainer.loss_weights=[1.0,2.0]", "one weight per loss type"),
        ("data.format=alpaca", "data.format='alpaca' is not one of auto, preference, preference_messages, hh"),
        ("trainer.name=ppo", "trainer.name='ppo' is not one of sft, dpo, reward"),
        (
            "trainer.packing=true",
            "'trainer.packing' (from command-line override 'trainer.packing=true') is a key of trainer=sft",
        ),
        (
            "trainer.loss=liger",
            "'trainer.loss' (from command-line override 'trainer.loss=liger') is a key of trainer=sft",
        ),
    ],
)
def test_bad_values_fail_at_composition(override, message):
    with pytest.raises(UserError) as err:
        compose("dpo_lora", [override])
    assert message in str(err.value)


def test_sft_keeps_its_formats():
    with pytest.raises(UserError, match="data.format='hh' is not one of auto, messages, alpaca, text"):
        compose("sft_lora", ["data.format=hh"])


def test_score_command_usage_errors(capsys):
    assert main(["score", "text=hi"]) == 2
    assert "preset=MODEL is required" in capsys.readouterr().err
    assert main(["score", "preset=x", "text=a", "file=b"]) == 2
    assert "exactly one of" in capsys.readouterr().err
    assert main(["score", "preset=x", "text=a", "batch_size=abc"]) == 2
    assert "batch_size='abc' must be an integer" in capsys.readouterr().err
    assert main(["score", "preset=x", "text=a", "batch_size=0"]) == 2
    assert "batch_size=0 must be at least 1" in capsys.readouterr().err
    assert main(["score", "preset=x", "text=a", "colour=red"]) == 2
    assert "Unknown argument 'colour'" in capsys.readouterr().err
    assert main(["score", "--help"]) == 0
    assert "usage: mistral-tune score" in capsys.readouterr().out


def test_reward_model_is_not_exported_as_a_causal_lm_preset():
    with pytest.raises(UserError, match="a reward model exports as merged/ only"):
        compose("reward_lora", ["export.preset=true"])
