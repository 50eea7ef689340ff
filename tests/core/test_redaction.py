"""Security: no remote code, safetensors only, ids never become paths, secrets never written or logged."""

from __future__ import annotations

import io
import logging
import secrets

from mistral_tune.cli import main
from mistral_tune.core.redaction import MASK, RedactingFilter, redact, redact_text


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
