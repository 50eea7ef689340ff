"""Shared entry point of the bench/ scripts: each script is one named `mistral-tune bench` command."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a source checkout without installing


def run(args: list[str], argv: list[str] | None = None) -> int:
    """Run ``mistral-tune bench`` with the script's arguments plus the caller's (--steps, --out, ...)."""
    from mistral_tune.cli import main

    extra = list(sys.argv[1:] if argv is None else argv)
    print("command: mistral-tune bench " + " ".join([*args, *extra]), flush=True)
    return main(["bench", *args, *extra])
