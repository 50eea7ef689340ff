"""Where metrics go: metrics.jsonl (always), and W&B or TensorBoard when ``tracking=`` picks one.

W&B: we start the run ourselves (project, entity, name, tags, group, mode, and the resolved config)
and transformers' own ``WandbCallback`` logs into it. TensorBoard: a thin subclass of transformers'
``TensorBoardCallback`` writes event files under ``<run_dir>/tensorboard`` and adds the config.
"""

from __future__ import annotations

import logging
import netrc
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional
from urllib.parse import urlparse

from transformers.integrations import TensorBoardCallback

from mistral_tune.core.errors import UserError

log = logging.getLogger(__name__)


def report_to(tracking_cfg: Any) -> list[str]:
    """Integrations the Trainer creates itself: W&B's callback (it logs into the run we start).

    TensorBoard is not listed: ``start_tracking`` adds ``TensorBoardTracker`` as a callback instead.
    """
    return ["wandb"] if tracking_cfg.name == "wandb" else []


class TensorBoardTracker(TensorBoardCallback):
    """transformers' TensorBoard logging into ``log_dir``, plus the resolved config as text."""

    def __init__(self, log_dir: Path, config_yaml: str):
        super().__init__()
        # transformers 5 reads only TENSORBOARD_LOGGING_DIR; a user's setting wins over our default.
        self.logging_dir = self.logging_dir or str(log_dir)
        self.config_yaml = config_yaml

    def on_train_begin(self, args, state, control, **kwargs):
        super().on_train_begin(args, state, control, **kwargs)
        if self.tb_writer is not None:
            # Four leading spaces make TensorBoard's markdown render it as a code block.
            self.tb_writer.add_text("resolved_config", "    " + self.config_yaml.replace("\n", "\n    "))


@dataclass
class Tracking:
    """The active tracker: its Trainer callbacks, what summary.json records about it, and its run."""

    callbacks: list = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=lambda: {"name": "none"})
    wandb_run: Any = None

    def log_summary(self, summary: dict[str, Any]) -> None:
        if self.wandb_run is not None:
            flat = {k: v for k, v in summary.items() if isinstance(v, (int, float, str)) and v is not None}
            self.wandb_run.summary.update(flat)

    def finish(self, failed: bool = False) -> None:
        if self.wandb_run is not None:
            self.wandb_run.finish(exit_code=1 if failed else 0)
            self.wandb_run = None
            if self.info.get("sync_command"):
                log.info("wandb: offline run saved; upload it with `%s`", self.info["sync_command"])


def start_tracking(tracking_cfg: Any, run_dir: Path, config: dict[str, Any], config_yaml: str) -> Tracking:
    """Start the tracker ``tracking_cfg.name`` names (config/registry.py TRACKERS); ``config`` is redacted."""
    from mistral_tune.config.registry import TRACKERS, load

    target = TRACKERS[tracking_cfg.name]
    if target is None:
        return Tracking()
    return load(target)(tracking_cfg, run_dir, config, config_yaml)


def start_tensorboard(tracking_cfg: Any, run_dir: Path, config: dict[str, Any], config_yaml: str) -> Tracking:
    """TensorBoard event files under ``<run_dir>/tensorboard``, with the resolved config as text."""
    tracker = TensorBoardTracker(run_dir / "tensorboard", config_yaml)
    log.info("tensorboard: event files in %s (view with `tensorboard --logdir %s`)", tracker.logging_dir, run_dir)
    return Tracking([tracker], {"name": "tensorboard", "dir": tracker.logging_dir})


def wandb_credentials_found(environ: Optional[dict] = None) -> bool:
    """True when W&B can authenticate: WANDB_API_KEY, an identity token file, or `wandb login`'s netrc entry."""
    env = os.environ if environ is None else environ
    if env.get("WANDB_API_KEY") or env.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    host = urlparse(env.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    path = env.get("NETRC") or os.path.join(os.path.expanduser("~"), ".netrc")
    try:
        return netrc.netrc(path).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def wandb_mode(requested: str, environ: Optional[dict] = None) -> tuple[str, str]:
    """(online | offline, why) for ``tracking.mode``; auto honours WANDB_MODE, then credentials."""
    env = os.environ if environ is None else environ
    if requested != "auto":
        return requested, f"tracking.mode={requested}"
    if env.get("WANDB_MODE") in ("online", "offline"):
        return env["WANDB_MODE"], f"WANDB_MODE={env['WANDB_MODE']}"
    if wandb_credentials_found(env):
        return "online", "W&B credentials found"
    return "offline", "not logged in to W&B and WANDB_API_KEY is not set"


def start_wandb(tracking_cfg: Any, run_dir: Path, config: dict[str, Any], config_yaml: str = "") -> Tracking:
    import wandb

    mode, why = wandb_mode(tracking_cfg.mode)
    try:
        run = wandb.init(
            project=tracking_cfg.project,
            entity=tracking_cfg.entity,
            name=tracking_cfg.run_name or run_dir.name,
            tags=list(tracking_cfg.tags) or None,
            group=tracking_cfg.group,
            dir=str(run_dir),
            mode=mode,
            config=config,
        )
    except Exception as exc:  # wandb raises its own types for auth, network and usage problems
        raise UserError(
            f"Could not start the W&B run in {mode} mode ({type(exc).__name__}: {exc}). Run `wandb login`, "
            "or set tracking.mode=offline to save the run locally and `wandb sync` it later."
        ) from exc
    run_path = Path(run.dir).parent  # <run_dir>/wandb/<offline-run-...>/files -> the run's folder
    info: dict[str, Any] = {"name": "wandb", "mode": mode, "dir": str(run_path)}
    if mode == "offline":
        info["sync_command"] = f"wandb sync {run_path}"
        log.info(
            "wandb: offline mode (%s); the run is saved in %s. Upload it later with `wandb sync %s`",
            why,
            run_path,
            run_path,
        )
    else:
        info["url"] = run.url
        log.info("wandb: logging to %s", run.url)
    return Tracking([], info, run)
