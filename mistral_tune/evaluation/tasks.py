"""Which lm-evaluation-harness tasks a name means: one of ours (shipped in this package, offline) or one
of lm-eval's own (its data comes from the Hugging Face hub, so offline it fails at once, with a reason).
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from mistral_tune.core.errors import UserError

TASK_DIR = Path(__file__).resolve().parent / "tasks"

# Our tasks: name -> YAML file in tasks/ (its data file lies beside it).
LOCAL_TASKS = {
    "mistral_tune_mc": "mistral_tune_mc.yaml",
    "mistral_tune_ppl": "mistral_tune_ppl.yaml",
}

# lm-eval output types scored by rolling log-likelihood (perplexity): these need add_bos_token=False.
ROLLING = "loglikelihood_rolling"


def local_task(name: str) -> dict[str, Any]:
    """The task's config as lm-eval reads it, with its data file's absolute path."""
    import yaml

    config = yaml.safe_load((TASK_DIR / LOCAL_TASKS[name]).read_text(encoding="utf-8"))
    files = config["dataset_kwargs"]["data_files"]
    config["dataset_kwargs"]["data_files"] = {split: str(TASK_DIR / f) for split, f in files.items()}
    return config


def hub_reachable(timeout: float = 3.0) -> bool:
    """False when the hub is switched off (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE) or does not answer."""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "") or os.environ.get("HF_DATASETS_OFFLINE", "0") not in (
        "0",
        "",
    ):
        return False
    url = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname, port), timeout=timeout):
            return True
    except OSError:
        return False


def resolve_tasks(names: list[str]) -> list[tuple[str, dict[str, Any] | str, str]]:
    """``(name, what simple_evaluate takes, output type)`` per task; a UserError names lm-eval's tasks when
    the hub cannot be reached (at once, offline), and unknown tasks."""
    if not names:
        raise UserError(
            f"mistral-tune eval needs tasks=[...]: ours are {', '.join(LOCAL_TASKS)}, or lm-eval task names."
        )
    resolved, others = [], []
    for name in names:
        if name in LOCAL_TASKS:
            config = local_task(name)
            resolved.append((name, config, config["output_type"]))
        else:
            others.append(name)
    if not others:
        return resolved
    # Checked before lm-eval indexes its ~10,000 task files (half a minute on a busy CPU): offline, fail now.
    if not hub_reachable():
        raise UserError(
            f"Task(s) {', '.join(others)} are not ours ({', '.join(LOCAL_TASKS)}); lm-eval's own tasks download "
            "their data from the Hugging Face hub, which this machine cannot reach. Offline, run our local tasks, "
            "or run once online so the datasets are cached, then set HF_DATASETS_OFFLINE=1."
        )
    from lm_eval.tasks import TaskManager

    manager = TaskManager()
    unknown = [name for name in others if name not in manager.all_tasks]
    if unknown:
        raise UserError(
            f"Unknown evaluation task(s) {', '.join(unknown)}. Ours: {', '.join(LOCAL_TASKS)}; lm-eval's: "
            "`python -m lm_eval ls tasks`."
        )
    hub = others
    for name in hub:  # the output type as the task's YAML states it (its data is not read here)
        entry = manager.task_index.get(name)
        resolved.append((name, name, ((entry.cfg if entry else None) or {}).get("output_type", "unknown")))
    return resolved
