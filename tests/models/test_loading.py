from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import mistral_tune.models.loading as models
from mistral_tune.config.compose import compose
from mistral_tune.core.errors import UserError
from mistral_tune.models.loading import load_model
from mistral_tune.models.presets import PRESETS
from mistral_tune.models.sources import resolve_source


def tiny_model_dir(path: Path, *, pickle_only: bool = False) -> Path:
    """A small Mistral checkpoint in Hugging Face layout (safetensors, or only pytorch_model.bin)."""
    from transformers import MistralConfig, MistralForCausalLM

    config = dict(PRESETS["mistral_tiny"].config)
    config.update(num_hidden_layers=1, hidden_size=64, intermediate_size=128, vocab_size=1000, head_dim=16)
    torch.manual_seed(0)
    model = MistralForCausalLM(MistralConfig(**config))
    model.save_pretrained(path)
    if pickle_only:
        (path / "model.safetensors").unlink()
        torch.save(model.state_dict(), path / "pytorch_model.bin")
    return path


def model_cfg(path: Path, **overrides):
    args = [f"model.path={path}"] + [f"model.{k}={v}" for k, v in overrides.items()]
    return compose("sft_lora", args).model


PACKAGE = Path(__file__).resolve().parents[2] / "mistral_tune"


def test_tiny_preset_is_mistral_with_window_shorter_than_training_length(compose):
    c = PRESETS["mistral_tiny"].config
    assert c["num_key_value_heads"] < c["num_attention_heads"]  # GQA
    assert c["vocab_size"] == 32000
    cfg = compose("sft_lora", [])
    assert c["sliding_window"] < cfg.trainer.max_length


def test_tiny_model_is_reproducible_for_a_seed(compose):
    import torch

    cfg = compose("sft_lora", [])
    src = resolve_source("mistral_tiny")
    a = models.load_model(cfg.model, src, seed=3)
    b = models.load_model(cfg.model, src, seed=3)
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))
    assert a.config.sliding_window == 32 and a.config.model_type == "mistral"


def test_pickle_weights_refused_unless_allowed(tmp_path):
    directory = tiny_model_dir(tmp_path / "m", pickle_only=True)
    source = resolve_source("mistral_tiny", str(directory))
    with pytest.raises(UserError, match=r"pytorch_model.bin.*arbitrary code.*model.allow_pickle=true"):
        load_model(model_cfg(directory), source)
    model = load_model(model_cfg(directory, allow_pickle="true"), source)
    saved = torch.load(directory / "pytorch_model.bin", weights_only=True)
    assert torch.equal(model.state_dict()["lm_head.weight"], saved["lm_head.weight"])


def test_remote_code_never_runs_unless_trusted(tmp_path):
    directory = tiny_model_dir(tmp_path / "m")
    config = json.loads((directory / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"}
    (directory / "config.json").write_text(json.dumps(config))
    sentinel = tmp_path / "remote-code-ran"
    (directory / "evil.py").write_text(
        f"open({str(sentinel)!r}, 'w').write('x')\n"
        "from transformers import MistralConfig as EvilConfig, MistralForCausalLM as EvilModel\n"
    )
    cfg = model_cfg(directory)
    assert cfg.trust_remote_code is False  # the default
    model = load_model(cfg, resolve_source("mistral_tiny", str(directory)))
    assert type(model).__name__ == "MistralForCausalLM" and not sentinel.exists()
    # The check can fail: with the user's explicit consent the repo's code does run. In a child process:
    # trusting remote code registers its classes (here transformers' own Mistral ones) for auto-saving
    # process-wide, and every later save_pretrained in this process would then try to copy code files.
    script = (
        "import sys; from pathlib import Path; from tests.models.test_loading import model_cfg; "
        "from mistral_tune.models.loading import load_model; from mistral_tune.models.sources import resolve_source; "
        "d = Path(sys.argv[1]); load_model(model_cfg(d, trust_remote_code='true'), resolve_source('mistral_tiny', str(d)))"
    )
    subprocess.run([sys.executable, "-c", script, str(directory)], check=True, cwd=Path(__file__).resolve().parents[2])
    assert sentinel.exists()


def test_no_code_path_turns_remote_code_on():
    offenders = [p.name for p in PACKAGE.rglob("*.py") if "trust_remote_code=True" in p.read_text(encoding="utf-8")]
    assert offenders == []
