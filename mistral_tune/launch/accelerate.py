"""``launcher=ddp|fsdp|deepspeed_*``: start the job's processes through ``accelerate launch``.

``mistral-tune recipe=R launcher=ddp launcher.num_processes=8 k=v`` becomes, in this process,

    accelerate launch --config_file <package>/launch/configs/ddp.yaml --num_processes 8 ... \\
        -m mistral_tune recipe=R launcher=ddp launcher.num_processes=8 k=v output_dir=<fixed path>

run through accelerate's own launcher API (torchrun underneath). Every worker composes the same
config; it sees LOCAL_RANK in its environment, so it trains instead of launching again
(:func:`mistral_tune.distributed.in_launched_process`). The engine (DDP, FSDP2, DeepSpeed ZeRO) is
set by the shipped accelerate config; its DeepSpeed "auto" values are filled from ``train.*``.
If any process fails, torchrun stops the others and this process prints the failing rank's error.
"""

from __future__ import annotations

import logging
import re
import shlex
import sys
from pathlib import Path
from typing import Any

from mistral_tune.core.errors import UserError

log = logging.getLogger(__name__)


CONFIG_DIR = Path(__file__).parent / "configs"


def should_launch(cfg: Any) -> bool:
    """True when this process must start the job rather than train in it."""
    from mistral_tune.core.process import in_launched_process

    return cfg.launcher.name != "local" and not in_launched_process()


def accelerate_config_path(launcher_cfg: Any) -> Path:
    from mistral_tune.config.registry import LAUNCHERS

    shipped = LAUNCHERS.get(launcher_cfg.name) or f"{launcher_cfg.name}.yaml"
    path = Path(launcher_cfg.accelerate_config or CONFIG_DIR / shipped).expanduser()
    if not path.is_file():
        raise UserError(f"launcher.accelerate_config={path}: no such file.")
    return path.resolve()


def deepspeed_config_path(launcher_cfg: Any) -> Path | None:
    if not launcher_cfg.name.startswith("deepspeed"):
        return None
    path = Path(launcher_cfg.deepspeed_config or CONFIG_DIR / f"{launcher_cfg.name}.json").expanduser()
    if not path.is_file():
        raise UserError(f"launcher.deepspeed_config={path}: no such file.")
    return path.resolve()


def total_processes(launcher_cfg: Any) -> int:
    """``num_processes``, with 0 meaning one process per visible GPU on each machine."""
    total = launcher_cfg.num_processes
    if not total:
        import torch

        gpus = torch.cuda.device_count()
        if gpus == 0:
            raise UserError(
                f"launcher={launcher_cfg.name} with launcher.num_processes=0 starts one process per GPU, but no GPU "
                "is visible. Set launcher.num_processes=N (on CPU, N gloo processes)."
            )
        total = gpus * launcher_cfg.num_machines
    if launcher_cfg.name == "ddp" and total < 2:
        # DeepSpeed and FSDP make sense on one GPU (offload, sharded states); DDP of one process does not.
        raise UserError(f"launcher=ddp needs at least 2 processes (got {total}); for one process use launcher=local.")
    return total


def check_engine_usable(launcher_cfg: Any) -> None:
    """Fail before starting any process when the engine cannot run here."""
    if launcher_cfg.name == "fsdp":
        import torch

        from mistral_tune.launch.engine import FSDP_NEEDS_GPUS

        if not torch.cuda.is_available():
            raise UserError(FSDP_NEEDS_GPUS)
    if launcher_cfg.name.startswith("deepspeed"):
        try:
            import deepspeed  # noqa: F401
        except ImportError as exc:
            raise UserError(
                f"launcher={launcher_cfg.name} needs DeepSpeed. Install it with `pip install 'mistral-tune[deepspeed]'` "
                "(or `pip install deepspeed`), or use launcher=ddp or launcher=fsdp."
            ) from exc


def hydra_value(text: str) -> str:
    """Quote a path for a Hydra override when it holds characters Hydra's grammar would parse."""
    if re.fullmatch(r"[\w./~+-]+", text):
        return text
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def worker_overrides(overrides: list[str], output_dir: Path) -> list[str]:
    """The user's overrides with output_dir pinned, so every process writes to the same directory."""
    kept = [o for o in overrides if o.lstrip("+~").split("=", 1)[0] != "output_dir"]
    return [*kept, f"output_dir={hydra_value(str(output_dir))}"]


def accelerate_argv(cfg: Any, recipe: str, overrides: list[str], output_dir: Path) -> list[str]:
    """Arguments of ``accelerate launch`` for this config (without the ``accelerate launch`` words)."""
    lc = cfg.launcher
    argv = [
        "--config_file", str(accelerate_config_path(lc)),
        "--num_processes", str(total_processes(lc)),
        "--num_machines", str(lc.num_machines),
        "--machine_rank", str(lc.machine_rank),
        "--main_process_port", str(lc.main_process_port),
    ]  # fmt: skip
    if lc.main_process_ip:
        argv += ["--main_process_ip", lc.main_process_ip]
    ds_config = deepspeed_config_path(lc)
    if ds_config is not None:
        argv += ["--deepspeed_config_file", str(ds_config)]
    return [*argv, "-m", "mistral_tune", f"recipe={recipe}", *worker_overrides(overrides, output_dir)]


def launch(cfg: Any, recipe: str, overrides: list[str]) -> int:
    """Start the job's processes on this machine and wait for them; returns the exit status."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    from mistral_tune.compat.accelerate import parse_launch_args, run_launch
    from mistral_tune.core.files import check_writable
    from mistral_tune.core.process import default_output_dir

    check_engine_usable(cfg.launcher)
    if cfg.resume and not cfg.output_dir:  # the workers get a pinned output_dir, so say it here
        raise UserError(
            "resume continues the run in output_dir, but no output_dir was given (the default is a new "
            "timestamped directory). Pass output_dir=runs/<the run to continue>."
        )
    output_dir = Path(cfg.output_dir or default_output_dir(recipe)).absolute()
    check_writable(output_dir)
    argv = accelerate_argv(cfg, recipe, overrides, output_dir)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S"
    )
    log.info("launching: accelerate launch %s", shlex.join(argv))
    args = parse_launch_args(argv)
    try:
        run_launch(args)
    except (ValueError, ConnectionError) as exc:  # accelerate's answer to a config or port it cannot use
        raise UserError(f"accelerate launch refused this launch: {exc}") from exc
    except ChildFailedError as exc:
        print(describe_failure(exc), file=sys.stderr)
        _, first = exc.get_first_failure()
        return first.exitcode if first.exitcode > 0 else 1
    log.info("all %s processes finished; run directory: %s", args.num_processes, output_dir)
    return 0


def describe_failure(exc: Any) -> str:
    """One line per failed process, the first failure first, each with its own error message."""
    from mistral_tune.core.redaction import redact_text

    first_rank, _ = exc.get_first_failure()
    order = sorted(exc.failures, key=lambda r: (r != first_rank, r))
    lines = [f"error: the job stopped because {len(order)} process(es) failed; the others were ended."]
    for rank in order:
        failure = exc.failures[rank]
        message = failure.message if isinstance(failure.message, str) else failure.message.get("message", "")
        how = f"exit code {failure.exitcode}" if failure.exitcode >= 0 else f"signal {failure.signal_name()}"
        message = redact_text(message) if message else "no error recorded"
        lines.append(f"  rank {rank} (local rank {failure.local_rank}, {how}): {message}")
    return "\n".join(lines)
