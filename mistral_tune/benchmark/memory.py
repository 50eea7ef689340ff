"""Peak memory per benchmark phase: ``torch.cuda.max_memory_allocated`` on GPU, sampled RSS on CPU.

The process-wide RSS high-water mark (``ru_maxrss``) never goes down, so two phases in one process
(the framework's steps and the bare loop's, interleaved) cannot be told apart with it. On CPU a
background thread reads the resident set size every millisecond and keeps the maximum of the
phase that is running; PyTorch's CPU allocator returns large blocks to the OS when they are freed,
so RSS follows the live tensors. On CUDA the allocator's own peak counter is reset per phase.
"""

from __future__ import annotations

import os
import resource
import threading
import time

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def current_rss() -> int:
    """Resident set size of this process in bytes."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * _PAGE
    except OSError:  # not Linux
        import psutil

        return psutil.Process().memory_info().rss


def process_peak_rss() -> int:
    """High-water mark of this process's RSS in bytes (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class PhasePeaks:
    """Track the peak memory of named phases; ``enter(name)`` switches the running phase.

    Example:
        >>> peaks = PhasePeaks(cuda=False)
        >>> peaks.enter("framework"); ...; peaks.enter("bare"); ...; peaks.stop()
        >>> peaks.peaks["framework"]
    """

    def __init__(self, cuda: bool, interval: float = 0.001):
        self.cuda = cuda
        self.interval = interval
        self.peaks: dict[str, int] = {}
        self.phase: str | None = None
        self._stop = threading.Event()
        self._thread = None
        if not cuda:
            self._thread = threading.Thread(target=self._sample, name="rss-sampler", daemon=True)
            self._thread.start()

    @property
    def kind(self) -> str:
        return "cuda_max_memory_allocated" if self.cuda else "rss_sampled"

    def _record(self, phase: str | None, value: int) -> None:
        if phase is not None and value > self.peaks.get(phase, 0):
            self.peaks[phase] = value

    def _sample(self) -> None:
        while not self._stop.is_set():
            self._record(self.phase, current_rss())
            time.sleep(self.interval)

    def enter(self, phase: str | None) -> None:
        """Close the running phase (recording its peak) and start ``phase`` (None: untracked)."""
        if self.cuda:
            import torch

            torch.cuda.synchronize()
            self._record(self.phase, int(torch.cuda.max_memory_allocated()))
            torch.cuda.reset_peak_memory_stats()
        else:
            self._record(self.phase, current_rss())
            self._record(phase, current_rss())
        self.phase = phase

    def stop(self) -> None:
        self.enter(None)
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=1)
