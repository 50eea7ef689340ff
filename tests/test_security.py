"""Security: no remote code, safetensors only, ids never become paths, secrets never written or logged."""

from __future__ import annotations

import io
import json
import logging
import secrets
from pathlib import Path

import pytest
import torch

from mistral_tune.cli import main
from mistral_tune.config.compose import compose
from mistral_tune.core.errors import UserError
from mistral_tune.core.redaction import MASK, RedactingFilter, redact, redact_text
from mistral_tune.models.loading import load_model
from mistral_tune.models.presets import PRESETS
from mistral_tune.models.sources import resolve_source

PACKAGE = Path(__file__).resolve().parent.parent / "mistral_tune"


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
    # The check can fail: with the user's explicit consent the repo's code does run.
    load_model(model_cfg(directory, trust_remote_code="true"), resolve_source("mistral_tiny", str(directory)))
    assert sentinel.exists()


def test_no_code_path_turns_remote_code_on():
    offenders = [p.name for p in PACKAGE.rglob("*.py") if "trust_remote_code=True" in p.read_text(encoding="utf-8")]
    assert offenders == []


@pytest.mark.parametrize("name", ["../../etc", "/etc", "~/models", "..", "org/../../etc", "hf://../etc", "a/b/c"])
def test_model_name_never_becomes_a_path(name):
    with pytest.raises(UserError, match="never read as filesystem paths"):
        resolve_source(name)


def test_model_name_hub_id_and_preset_resolve_without_filesystem(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "org" / "name").mkdir(parents=True)  # a local dir named like the id must not be picked
    source = resolve_source("org/name")
    assert source.hub_repo == "org/name" and source.local_dir is None
    assert resolve_source("hf://org/name").hub_repo == "org/name"
    assert resolve_source("mistral_tiny").local_dir is None


@pytest.mark.parametrize("override", ["model=../../etc/passwd", "data=/etc/hosts", "adapter=../recipes/sft_lora"])
def test_group_options_are_ids_not_paths(override):
    with pytest.raises(UserError, match="Unknown .* option"):
        compose("sft_lora", [override])


def test_redact_text_masks_tokens_and_env_secrets(monkeypatch):
    env_secret = secrets.token_hex(20)
    monkeypatch.setenv("WANDB_API_KEY", env_secret)
    hf = "hf_" + secrets.token_hex(17)
    text = f"key={env_secret} hub={hf} url=https://user:pa55word@host/x sk-{'a' * 24}"
    clean = redact_text(text)
    for secret in (env_secret, hf, "pa55word", "a" * 24):
        assert secret not in clean
    assert clean.count(MASK) == 4


def test_redact_keeps_innocent_values(monkeypatch):
    monkeypatch.setenv("SOME_TOKEN", "1")  # too short to mask everywhere
    data = {"tokens_seen": 123, "max_new_tokens": 32, "revision": "a" * 40, "hub_token": "x" * 8, "text": "1 token"}
    assert redact(data) == {**data, "hub_token": MASK}


def test_log_records_are_redacted(monkeypatch):
    token = "hf_" + secrets.token_hex(17)
    monkeypatch.setenv("HF_TOKEN", token)
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(RedactingFilter())
    logger = logging.getLogger("test_security.redaction")
    logger.addHandler(handler)
    try:
        logger.warning("pushing with %s", token)
        try:
            raise ValueError(f"bad token {token}")
        except ValueError:
            logger.exception("failed")
    finally:
        logger.removeHandler(handler)
    out = stream.getvalue()
    assert token not in out and out.count(MASK) == 2 and "ValueError" in out


def test_cli_errors_are_redacted(tmp_path, capsys, monkeypatch):
    token = "hf_" + secrets.token_hex(17)
    monkeypatch.setenv("HF_TOKEN", token)
    # An error message quoting a config value that holds the token (here: an invalid data.format).
    code = main(["recipe=sft_lora", f"data.format={token}"])
    err = capsys.readouterr().err
    assert code == 2 and "data.format=" in err and token not in err and MASK in err
