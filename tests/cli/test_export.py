import json

import pytest

from mistral_tune import cli

pytestmark = pytest.mark.usefixtures("single_thread")


def _adapter_dir(path, task_type="CAUSAL_LM", sidecar_base=None):
    path.mkdir()
    (path / "adapter_config.json").write_text(json.dumps({"task_type": task_type, "peft_type": "LORA"}))
    if sidecar_base is not None:
        (path / "mistral_tune_adapter.json").write_text(json.dumps({"adapter": "lora", "base": sidecar_base}))
    return path


def test_export_command_arguments_fail_clearly(capsys):
    assert cli.main(["export", "bogus=1"]) == 2
    assert "unknown argument(s) bogus=1" in capsys.readouterr().err
    assert cli.main(["export", "adapter=x"]) == 2
    assert "needs run_dir=PATH, or adapter=PATH base=PRESET_OR_DIR out=DIR" in capsys.readouterr().err
    assert cli.main(["export", "run_dir=/nonexistent", "formats=[zip]"]) == 2
    assert "zip not one of merged, preset, gguf, adapter" in capsys.readouterr().err
    assert cli.main(["export", "adapter=/nonexistent", "base=mistral_tiny", "out=x"]) == 2
    assert "is not an adapter directory" in capsys.readouterr().err
    assert cli.main(["export", "run_dir=/nonexistent", "tolerance=small"]) == 2
    assert "tolerance= takes a number" in capsys.readouterr().err


def test_export_rebuilds_a_random_base_from_the_seed_the_adapter_was_trained_on(tmp_path):
    from mistral_tune.export.from_adapter import plan

    trained = {"name": "mistral_tiny", "path": None, "seed": 7, "label": "mistral_tiny", "load_weights": True}
    adapter = _adapter_dir(tmp_path / "a", sidecar_base=trained)
    opts = {"adapter": str(adapter), "base": "mistral_tiny", "out": str(tmp_path / "o"), "formats": None, "seed": None}
    assert plan(opts)["model"]["seed"] == 7  # the sidecar's, not the recipes' default 42
    assert plan({**opts, "seed": 3})["model"]["seed"] == 3  # seed= still wins
    bare = _adapter_dir(tmp_path / "b")  # no sidecar (an adapter from elsewhere): the recipes' seed
    assert plan({**opts, "adapter": str(bare)})["model"]["seed"] == 42


def test_export_refuses_a_reward_adapter_before_loading_anything(tmp_path, capsys):
    adapter = _adapter_dir(tmp_path / "r", task_type="SEQ_CLS")
    assert cli.main(["export", f"adapter={adapter}", "base=mistral_tiny", f"out={tmp_path / 'o'}"]) == 2
    assert "is a reward-model adapter (task_type SEQ_CLS)" in " ".join(capsys.readouterr().err.split())
