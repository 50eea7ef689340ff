"""Which process this is in a launch (RANK, WORLD_SIZE, LOCAL_RANK from torchrun/accelerate/DeepSpeed),
the one run directory all ranks share, and torchrun's error file. Torch-free.
"""

from __future__ import annotations

import os
from datetime import datetime
from pathlib import Path

from mistral_tune.core.errors import UserError

# Fault drill: the process of this global rank raises at the end of optimizer step 1. Lets a user (and
# the tests) check that one failing process ends the whole job and that its error is the one shown.
FAIL_RANK_ENV = "MISTRAL_TUNE_FAIL_RANK"
# The drill's step (default 1), and how the process fails: "raise" (an error, the default) or "hang"
# (it stops itself with SIGSTOP, as a hung or unplugged machine stops answering without closing its
# connections, so the others only learn of it through the collective timeout, train.ddp_timeout).
FAIL_STEP_ENV = "MISTRAL_TUNE_FAIL_STEP"
FAIL_HOW_ENV = "MISTRAL_TUNE_FAIL_HOW"


def rank() -> int:
    """Global rank of this process (0 outside a launch)."""
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    """Only this process writes run artifacts, logs, samples and tracker runs."""
    return rank() == 0


def in_launched_process() -> bool:
    """True inside torchrun / accelerate launch / deepspeed workers: such a process must not launch again."""
    return "LOCAL_RANK" in os.environ


def num_machines() -> int:
    local = int(os.environ.get("LOCAL_WORLD_SIZE", world_size()))
    return max(1, world_size() // max(local, 1))


def machine_rank() -> int:
    """Index of this process's machine in the job (torchrun's GROUP_RANK; 0 outside a launch)."""
    return int(os.environ.get("GROUP_RANK", "0"))


def engine_from_env() -> str:
    """deepspeed | fsdp | ddp | single: what the launcher configured, before any trainer exists."""
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        return "deepspeed"
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        return "fsdp"
    return "ddp" if world_size() > 1 else "single"


def shared_run_dir(output_dir: str | None, default_dir) -> Path:
    """The run directory, identical in every process of the job.

    ``default_dir(started)`` names a directory after a start time. Processes of one machine share
    their launcher (their parent process), so its start time gives every one of them the same name.
    Machines do not share a clock reading, so a multi-machine job must name ``output_dir`` itself.
    """
    if output_dir:
        return Path(output_dir)
    if world_size() == 1:
        return Path(default_dir(datetime.now()))
    if num_machines() > 1:
        raise UserError(
            f"This job spans {num_machines()} machines: set output_dir to one shared path (the same on every machine)."
        )
    import psutil

    return Path(default_dir(datetime.fromtimestamp(psutil.Process(os.getppid()).create_time())))


def record_error(exc: BaseException) -> None:
    """Hand this process's error to torchrun's error file, so the launcher names it as the root cause."""
    if "TORCHELASTIC_ERROR_FILE" not in os.environ:
        return
    from torch.distributed.elastic.multiprocessing.errors import get_error_handler

    get_error_handler().record_exception(exc)


def default_output_dir(recipe: str, when: datetime | None = None) -> Path:
    return Path("runs") / f"{recipe}-{(when or datetime.now()).strftime('%Y%m%d-%H%M%S')}"


def return_freed_heap() -> bool:
    """Hand memory that the C heap keeps after frees back to the system (glibc ``malloc_trim``).

    Loading a checkpoint and quantizing it frees gigabytes in blocks small enough for glibc to keep for
    reuse; on a 7B QLoRA load on CPU about 1.9 GiB stayed resident that way (docs/BENCHMARKS.md).
    Returns whether anything was released; False where the C library has no ``malloc_trim`` (musl, macOS).
    """
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        trim = ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):
        trim = None
    if trim is None:
        return False
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return bool(trim(0))
