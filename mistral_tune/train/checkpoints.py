"""Crash-safe checkpoints: written to a hidden staging directory, marked complete, renamed into place.

Hugging Face ``Trainer`` writes ``checkpoint-N`` in place, so a run killed while saving leaves a
directory that looks like a checkpoint but lacks files. ``AtomicCheckpointMixin`` points the trainer's
own save at ``checkpoints/.staging-checkpoint-N/`` instead, adds a ``checkpoint_complete.json``
marker listing every file and its size, and only then renames the result to ``checkpoints/checkpoint-N``.
``rename`` within one directory is atomic, so ``checkpoint-N`` either exists complete or not at all;
resume also checks the marker, so a checkpoint damaged later (a partial copy) is skipped too.

A checkpoint holds what HF saves (adapter or model weights as safetensors, optimizer.pt,
scheduler.pt, rng_state.pth, trainer_state.json with the global step, which fixes the data position)
plus ``checkpoint_complete.json`` with mistral-tune's own state (NaN skips, a fingerprint of the
training data and the batch geometry, checked on resume).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any

from mistral_tune.compat.transformers import CheckpointHooks
from mistral_tune.core.errors import UserError

log = logging.getLogger(__name__)


CHECKPOINTS_DIR = "checkpoints"  # under the run directory

MARKER = "checkpoint_complete.json"

STAGING_PREFIX = ".staging-"  # hidden, and not matched by HF's ``checkpoint-*`` globs

DELETING_PREFIX = ".deleting-"

_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


def checkpoint_step(path: Path) -> int | None:
    match = _CHECKPOINT_RE.match(Path(path).name)
    return int(match.group(1)) if match else None


# xxh3_128 finds accidental damage (bit rot, a partial copy, a same-size overwrite) as surely as sha256 for
# this purpose and reads ~16x faster (docs/BENCHMARKS.md: 3.4 GB/s vs 0.2 GB/s here). It is not a defence
# against someone forging a checkpoint: resume only from directories you trust.
CHECKSUM = "xxh3_128"


def file_checksum(path: Path) -> str:
    import xxhash

    digest = xxhash.xxh3_128()
    with Path(path).open("rb") as f:
        while chunk := f.read(2**24):
            digest.update(chunk)
    return digest.hexdigest()


def completeness_problem(path: Path, verify: bool = False) -> str | None:
    """None for a complete checkpoint, else why it is not one.

    Always checks that every file the marker lists is there with its size; ``verify`` also checks each
    file's checksum against the marker (markers written before checksums were recorded pass on sizes).
    """
    path = Path(path)
    marker = path / MARKER
    if not marker.is_file():
        return f"no {MARKER} (its write was interrupted)"
    try:
        info = json.loads(marker.read_text(encoding="utf-8"))
        files = dict(info["files"])
        sums = dict(info.get(CHECKSUM) or {})
    except (OSError, ValueError, KeyError, TypeError):
        return f"unreadable {MARKER}"
    for name, size in files.items():
        f = path / name
        if not f.is_file():
            return f"missing {name}"
        if f.stat().st_size != size:
            return f"{name} is {f.stat().st_size} bytes, expected {size}"
    if verify:
        for name, digest in sums.items():
            if file_checksum(path / name) != digest:
                return f"{name} does not match its checksum (the file was damaged after it was written)"
    return None


def list_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """``(step, path)`` of every ``checkpoint-N`` directory under ``root``, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(checkpoint_step(p), p) for p in root.iterdir() if p.is_dir() and checkpoint_step(p) is not None]
    return sorted(found)


def latest_complete(root: Path, verify: bool = False) -> Path | None:
    """The newest complete checkpoint under ``root``; incomplete ones are logged and skipped.

    ``verify`` (resume) also checks every file's checksum, so a damaged checkpoint falls back to the
    previous good one.
    """
    for _step, path in reversed(list_checkpoints(root)):
        problem = completeness_problem(path, verify=verify)
        if problem is None:
            return path
        log.warning("checkpoint %s is %s (%s); skipping it", path, "damaged" if "checksum" in problem else
                    "incomplete", problem)  # fmt: skip
    return None


def read_marker(path: Path) -> dict[str, Any]:
    return json.loads((Path(path) / MARKER).read_text(encoding="utf-8"))


def write_marker(path: Path, state: dict[str, Any]) -> None:
    """Record every file with its size and checksum, then the marker itself (last, fsynced)."""
    path = Path(path)
    files, sums = {}, {}
    for f in sorted(path.rglob("*")):
        if f.is_file() and f.name != MARKER:
            with f.open("rb") as handle:
                os.fsync(handle.fileno())  # data on disk before the marker says it is
            files[str(f.relative_to(path))] = f.stat().st_size
            sums[str(f.relative_to(path))] = file_checksum(f)
    tmp = path / (MARKER + ".tmp")
    with tmp.open("w", encoding="utf-8") as handle:
        json.dump({**state, "files": files, CHECKSUM: sums}, handle, indent=1)
        handle.flush()
        os.fsync(handle.fileno())
    tmp.replace(path / MARKER)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems cannot fsync a directory; the rename is still atomic
    finally:
        os.close(fd)


def remove_dir(path: Path) -> None:
    """Delete a directory so that an interruption never leaves something that looks like a checkpoint."""
    path = Path(path)
    if not path.exists():
        return
    doomed = path.with_name(f"{DELETING_PREFIX}{path.name}")
    shutil.rmtree(doomed, ignore_errors=True)
    path.rename(doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def rotate(root: Path, keep: int | None) -> list[Path]:
    """Delete all but the newest ``keep`` complete checkpoints; returns the deleted paths."""
    if not keep or keep <= 0:
        return []
    complete = [p for _, p in list_checkpoints(root) if completeness_problem(p) is None]
    doomed = complete[: max(len(complete) - keep, 0)]
    for path in doomed:
        log.info("deleting old checkpoint %s (train.save_total_limit=%d)", path.name, keep)
        remove_dir(path)
    return doomed


def remove_leftovers(root: Path) -> list[Path]:
    """Delete staging/deleting directories left behind by a killed run."""
    root = Path(root)
    if not root.is_dir():
        return []
    left = [p for p in root.iterdir() if p.name.startswith((STAGING_PREFIX, DELETING_PREFIX))]
    for p in left:
        log.info("removing %s left by an interrupted checkpoint write", p)
        shutil.rmtree(p, ignore_errors=True)
    return left


class AtomicCheckpointMixin(CheckpointHooks):
    """Trainer mixin: HF's checkpoint save writes into a staging directory that is renamed when complete.

    The trainer class using it provides ``checkpoint_state()`` (a JSON-able dict stored in the marker).
    """

    _staging_root: Path | None = None

    def checkpoint_output_dir(self, trial):
        if self._staging_root is not None:
            return str(self._staging_root)
        return self.hf_output_dir(trial)

    def checkpoint_state(self) -> dict[str, Any]:
        return {}

    def write_checkpoint(self, model, trial):
        root = Path(self.hf_output_dir(trial))
        name = f"checkpoint-{self.state.global_step}"
        staging = root / f"{STAGING_PREFIX}{name}"
        if self.args.should_save:
            shutil.rmtree(staging, ignore_errors=True)
        self.accelerator.wait_for_everyone()
        self._staging_root = staging
        try:
            # HF writes staging/checkpoint-N and "rotates" inside staging, where it is alone.
            self.hf_save_checkpoint(model, trial)
            self.accelerator.wait_for_everyone()
            if self.args.should_save:
                write_marker(staging / name, {"step": self.state.global_step, **self.checkpoint_state()})
                final = root / name
                remove_dir(final)  # a re-save of the same step (e.g. a signal right after resuming)
                (staging / name).rename(final)
                _fsync_dir(root)
                shutil.rmtree(staging, ignore_errors=True)
                log.info("checkpoint saved: %s", final)
                rotate(root, self.args.save_total_limit)
        except Exception as exc:
            # OSError from Python and torch; tokenizers raises a bare Exception and safetensors a SafetensorError
            # for the same full disk. Other errors are bugs and propagate as they are.
            if not isinstance(exc, OSError) and not is_disk_full(exc):
                raise
            shutil.rmtree(staging, ignore_errors=True)
            latest = latest_complete(root)
            reason = getattr(exc, "strerror", None) or str(exc)
            raise UserError(
                f"Writing checkpoint {root / name} failed ({reason}); nothing incomplete was "
                f"left behind. The last complete checkpoint is {latest or 'none'}. Free disk space or fix "
                "permissions, then continue with resume=auto."
            ) from exc
        finally:
            self._staging_root = None
        self.accelerator.wait_for_everyone()


DISK_FULL_TEXT = ("No space left on device", "Disk quota exceeded", "File too large")


def is_disk_full(exc: BaseException) -> bool:
    """True for a full disk or quota, whichever library reported it (OSError's errno, or the message of the
    bare ``Exception`` tokenizers raises and of safetensors' ``SafetensorError``)."""
    import errno

    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            return True
        if any(text in str(exc) for text in DISK_FULL_TEXT):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def estimate_checkpoint_bytes(trainable: int, total: int, *, full_model: bool, param_bytes: int) -> int:
    """Bytes of one checkpoint: saved weights + AdamW's two moment buffers per trainable weight + small files."""
    weights = (total if full_model else trainable) * param_bytes
    optimizer = 2 * trainable * max(param_bytes, 4)  # torch AdamW keeps exp_avg/exp_avg_sq like the (fp32) params
    return weights + optimizer + 4 * 2**20  # tokenizer files, rng/scheduler/trainer state


def required_disk_bytes(*, checkpoint_bytes: int, num_checkpoints: int, final_bytes: int, merged_bytes: int) -> int:
    """Peak disk use: kept checkpoints + one being staged before rotation + final adapter + merged export."""
    return checkpoint_bytes * (num_checkpoints + 1) + final_bytes + merged_bytes


def check_disk_space(path: Path, required: int, detail: str) -> int:
    """Fail before training when ``path`` has less free space than ``required`` bytes; returns free bytes."""
    free = shutil.disk_usage(path).free
    if free < required:
        raise UserError(
            f"output_dir={path} has {format_bytes(free)} free but this run needs about {format_bytes(required)} ({detail}). "
            "Free disk space, lower train.save_total_limit or raise train.save_steps, or choose another output_dir."
        )
    return free


def format_bytes(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**28 else f"{n / 2**20:.1f} MiB"
