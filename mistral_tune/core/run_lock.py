"""One run per run directory: an exclusive OS lock on ``<run_dir>/.mistral-tune.lock``, held for the whole run.

The lock is ``fcntl.flock`` on an open file, so the operating system releases it when the process ends,
however it ends (an exception, a signal, SIGKILL). The file records the holder's pid, host and start
time: a second run gets one error naming them. A file that still names a holder but is not locked was
left by a process that died; the next run takes it over and says so. Under a launcher only rank 0
takes the lock (the other ranks of the same job share the directory on purpose).

Example::

    >>> with RunLock(Path("runs/x")):   # doctest: +SKIP
    ...     train()
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import time
from pathlib import Path
from typing import Any, Optional

from mistral_tune.core.errors import UserError

log = logging.getLogger("mistral_tune")

LOCK_NAME = ".mistral-tune.lock"


def read_holder(path: Path) -> dict[str, Any]:
    try:
        holder = json.loads(path.read_text(encoding="utf-8") or "{}")
    except (OSError, ValueError):
        return {}
    return holder if isinstance(holder, dict) else {}


def describe(holder: dict[str, Any]) -> str:
    if not holder:
        return "another process"
    since = holder.get("started")
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(since)) if isinstance(since, (int, float)) else "?"
    return f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')} (since {when})"


class RunLock:
    """An exclusive lock on a run directory; ``acquire()`` raises ``UserError`` naming the current holder."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOCK_NAME
        self._fd: Optional[int] = None

    def acquire(self) -> RunLock:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise UserError(
                f"output_dir={self.path.parent} is in use by another run: {describe(read_holder(self.path))}. "
                "Two runs in one directory would overwrite each other's checkpoints and metrics. Wait for it to "
                "finish, stop it, or choose another output_dir."
            ) from None
        except OSError as exc:  # a filesystem without flock support
            os.close(fd)
            raise UserError(
                f"output_dir={self.path.parent}: cannot lock {self.path.name} ({exc.strerror}). Choose an output_dir "
                "on a filesystem that supports file locks."
            ) from exc
        stale = read_holder(self.path)
        if stale:
            log.warning("output_dir=%s: taking over the lock left by %s, which is no longer running",
                        self.path.parent, describe(stale))  # fmt: skip
        record = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()})
        os.ftruncate(fd, 0)
        os.pwrite(fd, record.encode(), 0)
        os.fsync(fd)
        self._fd = fd
        return self

    def release(self) -> None:
        """Clear the holder record and unlock (a clean exit leaves an empty, unlocked file)."""
        if self._fd is None:
            return
        try:
            os.ftruncate(self._fd, 0)
        except OSError:
            pass  # e.g. a full disk: the record stays, and the next run reports it as stale and takes over
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()
