"""Recipes compose and validate; config mistakes fail early with one clear message."""

from __future__ import annotations

from pathlib import Path

import pytest

import mistral_tune.config.compose as config_compose
from mistral_tune import cli
from mistral_tune.config.compose import compose, config_dir, key_origin, recipes
from mistral_tune.config.schema import check_values
from mistral_tune.core.errors import UserError

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("recipe", recipes())
def test_every_recipe_composes_and_validates(recipe, compose):
    cfg = compose(recipe, [])
    assert cfg.recipe == recipe
    assert check_values(cfg) == []
    text = (ROOT / "recipes" / f"{recipe}.yaml").read_text()
    assert text.startswith("#") and "Command:" in text and f"recipe={recipe}" in text, "header comment"


def test_hydra_overrides(compose):
    cfg = compose(
        "sft_lora",
        [
            "model=mistral_7b_en",
            "train.max_steps=50",
            "train.learning_rate=2e-4",
            "output_dir=runs/x",
            "data.path=my.jsonl",
        ],
    )
    assert cfg.model.name == "mistral_7b_en"
    assert cfg.train.max_steps == 50 and cfg.train.learning_rate == 2e-4
    assert cfg.output_dir == "runs/x" and cfg.data.path == "my.jsonl"


def test_unknown_key_names_key_and_origin(compose):
    with pytest.raises(UserError) as err:
        compose("sft_lora", ["model.foo=1"])
    assert "model.foo" in str(err.value) and "command-line override" in str(err.value)


def test_unknown_key_in_a_config_file_names_the_file(compose, tmp_path, monkeypatch):
    recipes = tmp_path / "recipes"
    recipes.mkdir()
    text = (ROOT / "recipes" / "sft_lora.yaml").read_text() + "\nexport:\n  bogus_key: 1\n"
    (recipes / "bad.yaml").write_text(text)
    real = config_dir
    monkeypatch.setattr(config_compose, "config_dir", lambda name: recipes if name == "recipes" else real(name))
    with pytest.raises(UserError) as err:
        compose("bad", [])
    assert "export.bogus_key" in str(err.value) and "config file" in str(err.value)


def test_unknown_recipe_suggests_closest():
    rc = cli.main(["recipe=sft_lor"])
    assert rc == 2


@pytest.mark.parametrize(
    "recipe", ["sft_lora", "sft_qlora", "sft_dora", "sft_full", "dpo_lora", "dpo_full", "reward_lora"]
)
def test_learning_rate_follows_the_base_model(compose, recipe):
    demo = compose(recipe, []).train.learning_rate
    preset = compose(recipe, ["model=mistral_7b_en"]).train.learning_rate
    local = compose(recipe, ["model.path=/models/my-mistral"]).train.learning_rate
    assert preset == local and 0 < preset < 3e-4  # the usual ranges for a pretrained 7B
    assert demo >= 10 * preset  # a random tiny base needs far more
    assert compose(recipe, ["model=mistral_7b_en", "train.learning_rate=3e-5"]).train.learning_rate == 3e-5


def test_key_origin_names_the_config_file():
    assert key_origin("train.max_steps", [], "sft_lora") == "the config file recipes/sft_lora.yaml"
    assert key_origin("adapter.lora_alpha", [], "sft_lora") == "the config file conf/adapter/lora.yaml"
    assert key_origin("export.merged", ["export=none"], "sft_lora") == "the config file conf/export/none.yaml"


@pytest.mark.parametrize("override", ["model=../../etc/passwd", "data=/etc/hosts", "adapter=../recipes/sft_lora"])
def test_group_options_are_ids_not_paths(override):
    with pytest.raises(UserError, match="Unknown .* option"):
        compose("sft_lora", [override])


@pytest.mark.parametrize(
    ("overrides", "sft_lora", "sft_full"),
    [
        ([], 5e-3, 5e-4),  # the random-weight demo
        (["model=mixtral_tiny"], 5e-3, 5e-4),  # every *_tiny preset is random
        (["model=mistral_nemo_12b_en"], 2e-4, 1e-5),  # pretrained dense
        (["model=mixtral_8x7b_en"], 1e-4, 5e-6),  # pretrained MoE: about half
        (["model.name=mistralai/Mixtral-8x22B-v0.1"], 1e-4, 5e-6),  # a hub id naming Mixtral
        (["model.name=org/model_tiny"], 2e-4, 1e-5),  # a hub id is never the demo
    ],
)
def test_learning_rates_follow_the_base(compose, overrides, sft_lora, sft_full):
    assert compose("sft_lora", overrides).train.learning_rate == pytest.approx(sft_lora)
    assert compose("sft_full", overrides).train.learning_rate == pytest.approx(sft_full)
