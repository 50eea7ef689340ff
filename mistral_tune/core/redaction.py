"""Keep secrets out of logs and the run directory.

API keys and hub tokens reach a run in two ways: through the environment (``HF_TOKEN``,
``WANDB_API_KEY``, ...) and, by mistake, through config values (a token pasted into
``tracking.run_name`` or a URL with credentials in ``data.path``). Everything the run writes or logs
about its config goes through ``redact``; every log record goes through ``RedactingFilter``.

Example::

    >>> redact_text("push with hf_abcdefghijklmnopqrstuvwxyz0123")
    'push with ***REDACTED***'
"""

from __future__ import annotations

import logging
import os
import re
from typing import Any

MASK = "***REDACTED***"

# Environment variables whose values are credentials. Matched on the name, so new services
# (OPENAI_API_KEY, AWS_SECRET_ACCESS_KEY, ...) are covered without listing them.
SECRET_ENV_NAME = re.compile(r"TOKEN|API_?KEY|SECRET|PASSWORD|PASSWD|ACCESS_KEY|PRIVATE_KEY|CREDENTIAL", re.I)

# Config keys whose values are credentials whatever they look like (hub_token, api_key, ...; not tokens_seen).
SECRET_KEY_NAME = re.compile(
    r"(^|[_.-])(token|auth_token|secret|password|passwd|api_?key|access_?key|private_?key|credentials?)$", re.I
)

# Values that look like tokens of the services a fine-tuning run talks to. 40-hex strings are left
# alone on purpose: git commit ids (model.revision) look the same as old W&B keys, and the W&B key
# itself is caught through WANDB_API_KEY in the environment.
TOKEN_PATTERNS = [
    r"hf_[A-Za-z0-9]{20,}",  # Hugging Face user/org tokens
    r"api_org_[A-Za-z0-9]{20,}",  # Hugging Face org API tokens (legacy)
    r"sk-[A-Za-z0-9_\-]{20,}",  # OpenAI-style secret keys
    r"gh[pousr]_[A-Za-z0-9]{30,}",  # GitHub tokens
    r"github_pat_[A-Za-z0-9_]{30,}",
    r"xox[abposr]-[A-Za-z0-9\-]{10,}",  # Slack
    r"AKIA[0-9A-Z]{16}",  # AWS access key ids
    r"wandb_v1_[A-Za-z0-9_]{20,}",  # newer W&B keys
    r"(?<=://)[^/\s:@]+:[^/\s@]+(?=@)",  # user:password@ inside URLs
    r"(?<=[Bb]earer )[A-Za-z0-9._\-]{16,}",
]

_TOKEN_RE = re.compile("|".join(f"(?:{p})" for p in TOKEN_PATTERNS))

MIN_SECRET_LENGTH = 6  # shorter env values ("1", "true") would mask innocent text everywhere


def secret_env_values() -> list[str]:
    """Values of credential-looking environment variables, longest first (read at call time)."""
    values = {v for k, v in os.environ.items() if SECRET_ENV_NAME.search(k) and len(v.strip()) >= MIN_SECRET_LENGTH}
    return sorted(values, key=len, reverse=True)


def redact_text(text: str, secrets: list[str] | None = None) -> str:
    """``text`` with environment secrets and token-looking substrings replaced by ``***REDACTED***``."""
    for value in secret_env_values() if secrets is None else secrets:
        if value in text:
            text = text.replace(value, MASK)
    return _TOKEN_RE.sub(MASK, text)


def redact(obj: Any, secrets: list[str] | None = None) -> Any:
    """A copy of a JSON-like structure (dicts, lists, strings) with every secret masked.

    Values under credential-named keys are masked whatever they hold; other strings are scanned.
    """
    secrets = secret_env_values() if secrets is None else secrets
    if isinstance(obj, dict):
        return {
            k: (
                MASK if isinstance(k, str) and SECRET_KEY_NAME.search(k) and v not in (None, "") else redact(v, secrets)
            )
            for k, v in obj.items()
        }
    if isinstance(obj, (list, tuple)):
        return [redact(v, secrets) for v in obj]
    if isinstance(obj, str):
        return redact_text(obj, secrets)
    return obj


def redact_config(cfg: Any) -> dict[str, Any]:
    """The resolved config as a plain dict, safe to write to resolved_config.yaml or a tracker."""
    from omegaconf import OmegaConf

    return redact(OmegaConf.to_container(cfg, resolve=True))


class RedactingFilter(logging.Filter):
    """Masks secrets in every record a handler emits (message, arguments and traceback)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        clean = redact_text(message)
        if clean != message:
            record.msg, record.args = clean, None
        if record.exc_info and record.exc_info[1] is not None:
            # Format the traceback now, redacted, so the handler does not format the raw one.
            record.exc_text = redact_text(logging.Formatter().formatException(record.exc_info))
            record.exc_info = None
        return True
