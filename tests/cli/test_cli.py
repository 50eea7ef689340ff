import json
import subprocess
import sys

import pytest

from mistral_tune import cli
from mistral_tune.config.compose import recipes


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


def test_cli_entry_point_runs_without_source_tree_imports():
    out = subprocess.run(
        [sys.executable, "-m", "mistral_tune", "list"], capture_output=True, text=True, check=True, cwd="/"
    ).stdout
    assert "mistral_tiny" in out and "7.24B" in out


@pytest.mark.parametrize("command", ["--help", "list"])
def test_help_and_list_are_instant_and_import_no_torch(command):
    code = (
        "import sys, time, json; t = time.perf_counter(); from mistral_tune.cli import main; "
        f"main([{command!r}]); elapsed = time.perf_counter() - t; "
        "heavy = sorted(m for m in ('torch', 'transformers', 'peft', 'trl', 'datasets', 'hydra') if m in sys.modules); "
        "print(json.dumps({'elapsed': elapsed, 'heavy': heavy}), file=sys.stderr)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    report = json.loads(proc.stderr.strip().splitlines()[-1])
    assert report["heavy"] == [] and report["elapsed"] < 2.0, report
    assert "sft_lora" in proc.stdout
