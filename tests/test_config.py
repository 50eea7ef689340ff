"""Recipes compose and validate; config mistakes fail early with one clear message."""

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import mistral_tune.config.compose as config_compose
from mistral_tune import cli
from mistral_tune.config.compose import config_dir, recipes
from mistral_tune.config.schema import check_values
from mistral_tune.core.errors import UserError

ROOT = Path(__file__).resolve().parent.parent


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


def test_wrong_type_fails_before_anything_is_built(compose):
    with pytest.raises(UserError) as err:
        compose("sft_lora", ["train.max_steps=abc"])
    assert "train.max_steps" in str(err.value)


def test_bad_value_is_reported(compose):
    with pytest.raises(UserError, match="adapter.name='xx'"):
        compose("sft_lora", ["adapter.name=xx"])


def test_unknown_recipe_suggests_closest():
    rc = cli.main(["recipe=sft_lor"])
    assert rc == 2


def test_unknown_recipe_message(capsys):
    cli.main(["recipe=sft_lor"])
    assert "Did you mean recipe=sft_lora?" in capsys.readouterr().err


def test_help_lists_recipes_and_groups(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in recipes():
        assert name in out
    for group in ("model", "adapter", "trainer", "data", "launcher", "tracking", "export"):
        assert f"  {group}" in out


def test_cfg_job_prints_resolved_config(capsys):
    assert cli.main(["recipe=sft_lora", "train.max_steps=7", "--cfg", "job"]) == 0
    out = capsys.readouterr().out
    assert "max_steps: 7" in out and "recipe: sft_lora" in out
    assert "learning_rate: 0.005" in out and "${" not in out
    assert cli.main(["recipe=sft_lora", "--cfg", "train.max_steps=9"]) == 0  # the override after --cfg still counts
    assert "max_steps: 9" in capsys.readouterr().out


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


def test_cli_entry_point_runs_without_source_tree_imports():
    out = subprocess.run(
        [sys.executable, "-m", "mistral_tune", "list"], capture_output=True, text=True, check=True, cwd="/"
    ).stdout
    assert "mistral_tiny" in out and "7.24B" in out


def test_wheel_ships_recipes_conf_and_sample_data(tmp_path):
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(ROOT),
        ],
        check=True,
    )
    (wheel,) = tmp_path.glob("mistral_tune-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for recipe in recipes():
        assert f"mistral_tune/recipes/{recipe}.yaml" in names
    assert "mistral_tune/conf/model/mistral_tiny.yaml" in names
    assert "mistral_tune/data/sft_sample.jsonl" in names
    for launcher in ("ddp", "fsdp", "deepspeed_zero2", "deepspeed_zero3", "deepspeed_zero3_offload"):
        assert f"mistral_tune/conf/launcher/{launcher}.yaml" in names
        assert (
            f"mistral_tune/launch/configs/{launcher}.yaml" in names
        )  # the accelerate config launch/accelerate.py uses
    for stage in ("zero2", "zero3", "zero3_offload"):
        assert f"mistral_tune/launch/configs/deepspeed_{stage}.json" in names
