from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from mistral_tune.config.compose import recipes

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.usefixtures("single_thread")
def test_import_stays_cheap():
    code = (
        "import sys, mistral_tune; assert 'torch' not in sys.modules, 'torch imported'; "
        "assert 'MistralCausalLM' in dir(mistral_tune)"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


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
