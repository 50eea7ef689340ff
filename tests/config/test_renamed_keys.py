"""Keys renamed to the PEFT/TRL field names they feed: an old name fails once, naming its new name, from
the command line and from a config file alike; a saved run's resolved_config.yaml still exports."""

from pathlib import Path

import pytest
from omegaconf import OmegaConf

import mistral_tune.config.compose as config_compose
from mistral_tune.config.schema import RENAMED_KEYS, AdapterConfig, upgrade_renamed_keys
from mistral_tune.core.errors import UserError

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("old,new", sorted(RENAMED_KEYS.items()))
@pytest.mark.parametrize("plus", ["", "+"])
def test_old_key_on_the_command_line_names_the_new_one(compose, old, new, plus):
    with pytest.raises(UserError) as err:
        compose("sft_lora", [f"{plus}{old}=1"])
    assert str(err.value) == (
        f"{old} was renamed to {new} (from command-line override '{plus}{old}=1'); set {new} instead."
    )


@pytest.mark.parametrize("old,new", sorted(RENAMED_KEYS.items()))
def test_old_key_in_a_recipe_file_names_the_new_one(compose, tmp_path, monkeypatch, old, new):
    recipes = tmp_path / "recipes"
    recipes.mkdir()
    section, key = old.split(".")
    text = (ROOT / "recipes" / "sft_lora.yaml").read_text() + f"\n{section}:\n  {key}: 0.1\n"
    (recipes / "mine.yaml").write_text(text)
    real = config_compose.config_dir
    monkeypatch.setattr(config_compose, "config_dir", lambda name: recipes if name == "recipes" else real(name))
    with pytest.raises(UserError) as err:
        compose("mine", [])
    assert str(err.value) == f"{old} was renamed to {new} (from the config file recipes/mine.yaml); set {new} instead."


def test_new_names_reach_peft(compose):
    from mistral_tune.adapters.build import lora_config

    cfg = compose(
        "sft_lora", ["adapter.lora_alpha=32", "adapter.lora_dropout=0.0", "adapter.init_lora_weights=gaussian"]
    )
    lora = lora_config(cfg.adapter)
    assert (lora.lora_alpha, lora.lora_dropout, lora.init_lora_weights) == (32, 0.0, "gaussian")
    fields = set(AdapterConfig.__dataclass_fields__)
    assert {"lora_alpha", "lora_dropout", "init_lora_weights"} <= fields
    assert not {"alpha", "dropout", "init"} & fields


def test_a_resolved_config_saved_with_old_names_is_upgraded(tmp_path):
    old = OmegaConf.create({"adapter": {"name": "lora", "r": 8, "alpha": 16, "dropout": 0.05, "init": "pissa"}})
    cfg = upgrade_renamed_keys(old)
    assert dict(cfg.adapter) == {
        "name": "lora", "r": 8, "lora_alpha": 16, "lora_dropout": 0.05, "init_lora_weights": "pissa"
    }  # fmt: skip
    assert upgrade_renamed_keys(OmegaConf.create({"adapter": {"name": "none"}})).adapter == {"name": "none"}


def test_export_plan_reads_an_old_run_directory(tmp_path):
    from mistral_tune.export.from_adapter import plan

    run = tmp_path / "run"
    (run / "adapter").mkdir(parents=True)
    cfg = {
        "recipe": "sft_lora",
        "model": {"name": "mistral_tiny", "path": None, "load_weights": True, "dtype": "auto"},
        "adapter": {"name": "lora", "r": 8, "alpha": 16, "dropout": 0.05, "init": "default"},
        "train": {"seed": 42},
    }
    OmegaConf.save(OmegaConf.create(cfg), run / "resolved_config.yaml")
    p = plan({"run_dir": str(run), "formats": ["merged"]})
    assert p["cfg"].adapter.lora_alpha == 16 and p["cfg"].adapter.init_lora_weights == "default"
