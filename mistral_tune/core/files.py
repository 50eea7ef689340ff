"""File helpers every layer uses: atomic directories (complete or absent), atomic JSON writes, and a
writability check that fails with one clear error.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any, Iterator

from mistral_tune.core.errors import UserError

# Written into every directory ``atomic_directory`` creates: only such a directory is ever replaced.
OWNER_MARKER = ".written-by-mistral-tune"

_TEMP_RE = re.compile(r"^\.(?P<name>.+)\.(?:tmp|old)-(?P<pid>\d+)$")


# adapter/ directories written before OWNER_MARKER existed carry this sidecar (adapters/build.py SIDECAR), so the
# resume of a run started by an older version can still rewrite its adapter/.
LEGACY_MARKERS = ("mistral_tune_adapter.json",)


def written_by_us(path: Path) -> bool:
    """True for a directory mistral-tune wrote (it holds ``OWNER_MARKER``, or an older version's sidecar)."""
    return any((Path(path) / name).is_file() for name in (OWNER_MARKER, *LEGACY_MARKERS))


def check_replaceable(out_dir: Path, what: str = "") -> None:
    """Fail with one clear error when ``out_dir`` exists but is not a directory mistral-tune wrote."""
    out_dir = Path(out_dir)
    if not out_dir.exists() and not out_dir.is_symlink():
        return
    if out_dir.is_dir() and not out_dir.is_symlink() and written_by_us(out_dir):
        return
    kind = "file" if out_dir.is_file() else "symlink" if out_dir.is_symlink() else "directory"
    raise UserError(
        f"{out_dir} already exists and is a {kind} that mistral-tune did not write{what}; it would be replaced. "
        "Nothing was changed. Move it away, or choose another output directory."
    )


@contextlib.contextmanager
def atomic_directory(out_dir: Path) -> Iterator[Path]:
    """Yield a temporary sibling of ``out_dir`` to fill; rename it to ``out_dir`` only if the block succeeds.

    An interrupted or failed write leaves at most a hidden ``.NAME.tmp-PID`` directory, never an
    ``out_dir`` that looks complete. An existing ``out_dir`` is replaced only after the new one is written,
    and only if mistral-tune wrote it (``OWNER_MARKER``); anything else there is a ``UserError`` up front.
    """
    out_dir = Path(out_dir)
    check_replaceable(out_dir)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        (tmp / OWNER_MARKER).write_text("This directory was written by mistral-tune, which may replace it.\n")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out_dir.exists():
        old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
        out_dir.rename(old)
        tmp.rename(out_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(out_dir)


def save_json(path: Path, data: Any) -> None:
    tmp = Path(path).with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n", encoding="utf-8")
    tmp.replace(path)


def check_writable(path: Path) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as exc:
        raise UserError(f"output_dir={path} is not writable ({exc.strerror}). Choose another output_dir.") from exc


def remove_stale_temporaries(parent: Path) -> list[Path]:
    """Delete ``.NAME.tmp-PID`` / ``.NAME.old-PID`` directories that ``atomic_directory`` left in ``parent``
    when its process was killed (the pid is no longer running). Returns what was removed."""
    parent = Path(parent)
    if not parent.is_dir():
        return []
    removed = []
    for p in parent.iterdir():
        match = _TEMP_RE.match(p.name)
        if not match or not p.is_dir() or p.is_symlink() or pid_alive(int(match.group("pid"))):
            continue
        shutil.rmtree(p, ignore_errors=True)
        removed.append(p)
    return removed


def pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
