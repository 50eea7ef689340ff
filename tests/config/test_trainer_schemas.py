"""One schema per trainer (TRL's SFTConfig / DPOConfig / RewardConfig names), each validating its own
conf/trainer/<name>.yaml: another trainer's key is an unknown key, named with where it came from."""

import dataclasses
from pathlib import Path

import pytest
from omegaconf import OmegaConf

import mistral_tune.config.compose as config_compose
from mistral_tune.config import registry
from mistral_tune.config.schema import TRAINER_SCHEMAS
from mistral_tune.core.errors import UserError

ROOT = Path(__file__).resolve().parents[2]

# Keys of ours that no TRL config has: the trainer's name, what to do with long examples, SFT's loss
# implementation, DPO's reference cache, and the prompt cut TRL 1.16 dropped (we still apply it).
OWN_KEYS = {
    "sft": {"name", "truncation", "loss"},
    "dpo": {"name", "truncation", "max_prompt_length", "ref_cache_dir"},
    "reward": {"name", "truncation", "max_prompt_length", "truncation_mode"},
}


def test_every_registered_trainer_has_a_schema():
    assert list(TRAINER_SCHEMAS) == list(registry.TRAINERS)


@pytest.mark.parametrize("name", sorted(TRAINER_SCHEMAS))
def test_schema_keys_are_trl_field_names(name):
    import trl

    trl_config = {"sft": trl.SFTConfig, "dpo": trl.DPOConfig, "reward": trl.RewardConfig}[name]
    ours = {f.name for f in dataclasses.fields(TRAINER_SCHEMAS[name])}
    theirs = {f.name for f in dataclasses.fields(trl_config)}
    assert ours - theirs == OWN_KEYS[name]


@pytest.mark.parametrize("recipe,name", [("sft_lora", "sft"), ("dpo_lora", "dpo"), ("reward_lora", "reward")])
def test_each_trainer_file_composes_onto_its_own_schema(compose, recipe, name):
    cfg = compose(recipe, [])
    assert OmegaConf.get_type(cfg.trainer) is TRAINER_SCHEMAS[name]
    assert set(cfg.trainer) == {f.name for f in dataclasses.fields(TRAINER_SCHEMAS[name])}


@pytest.mark.parametrize(
    "recipe,override,owner,trainer",
    [
        ("sft_lora", "trainer.beta=0.2", "dpo", "sft"),
        ("sft_lora", "+trainer.loss_type=ipo", "dpo", "sft"),
        ("dpo_lora", "trainer.packing=true", "sft", "dpo"),
        ("dpo_lora", "trainer.center_rewards_coefficient=0.01", "reward", "dpo"),
        ("reward_lora", "trainer.precompute_ref_log_probs=true", "dpo", "reward"),
    ],
)
def test_another_trainers_key_on_the_command_line_is_unknown(compose, recipe, override, owner, trainer):
    key = override.lstrip("+").split("=")[0]
    with pytest.raises(UserError) as err:
        compose(recipe, [override])
    assert str(err.value).startswith(
        f"Config key '{key}' (from command-line override '{override}') is a key of trainer={owner}; "
        f"trainer={trainer} has no such key."
    )


def test_another_trainers_key_in_a_recipe_file_names_the_file(compose, tmp_path, monkeypatch):
    recipes = tmp_path / "recipes"
    recipes.mkdir()
    text = (ROOT / "recipes" / "sft_lora.yaml").read_text().replace("trainer:\n", "trainer:\n  beta: 0.3\n", 1)
    (recipes / "mine.yaml").write_text(text)
    real = config_compose.config_dir
    monkeypatch.setattr(config_compose, "config_dir", lambda name: recipes if name == "recipes" else real(name))
    with pytest.raises(UserError) as err:
        compose("mine", [])
    assert str(err.value).startswith(
        "Config key 'trainer.beta' (from the config file recipes/mine.yaml) is a key of trainer=dpo; trainer=sft"
    )


def test_a_typo_still_gets_a_suggestion_from_its_own_trainer(compose):
    with pytest.raises(UserError, match=r"Unknown config key 'trainer.pakcing'.*Did you mean 'trainer.packing'"):
        compose("sft_lora", ["trainer.pakcing=true"])


def test_renaming_the_trainer_without_its_group_is_refused(compose):
    with pytest.raises(UserError, match="trainer.name=dpo changes the name only; the trainer group is trainer=sft"):
        compose("sft_lora", ["trainer.name=dpo"])


def test_switching_the_trainer_group_switches_the_schema(compose):
    cfg = compose("sft_lora", ["trainer=dpo", "data=preference_sample"])
    assert OmegaConf.get_type(cfg.trainer) is TRAINER_SCHEMAS["dpo"] and cfg.trainer.max_length == 128
    assert "packing" not in cfg.trainer and cfg.trainer.beta == 0.1
