"""Run logging: INFO to stdout and ``train.log`` on rank 0 (warnings only elsewhere), secrets redacted,
library warnings as one log line each.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

_HANDLERS: list[logging.Handler] = []  # installed by the running (or previous) run() in this process


def setup_logging(run_dir: Path, main_process: bool = True) -> None:
    """INFO to stdout and train.log; the other processes of a launch print warnings and errors only."""
    from mistral_tune.core.redaction import RedactingFilter

    fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S")
    root = logging.getLogger()
    root.setLevel(logging.INFO if main_process else logging.WARNING)
    teardown_logging()  # a second run() in one process must not log into the first run's train.log
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stdout)]
    if main_process:
        handlers.append(logging.FileHandler(run_dir / "train.log"))
    for handler in handlers:
        handler.setFormatter(fmt)
        handler.addFilter(RedactingFilter())  # API keys and tokens never reach the console or train.log
        root.addHandler(handler)
        _HANDLERS.append(handler)
    for noisy in ("httpx", "urllib3", "filelock", "datasets", "bitsandbytes", "matplotlib"):
        logging.getLogger(noisy).setLevel(logging.ERROR)


def teardown_logging() -> None:
    root = logging.getLogger()
    while _HANDLERS:
        handler = _HANDLERS.pop()
        root.removeHandler(handler)
        handler.close()


def log_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Library warnings as one log line each, instead of two-line stderr dumps."""
    logging.getLogger("py.warnings").warning("%s: %s", category.__name__, message)
