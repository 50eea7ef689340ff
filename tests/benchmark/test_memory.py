from __future__ import annotations

import subprocess
import sys

PHASE_PEAKS_SCRIPT = """
import torch
from mistral_tune.benchmark.memory import PhasePeaks

peaks = PhasePeaks(cuda=False)
peaks.enter("small")
small = torch.ones(1024)
peaks.enter("big")
big = torch.ones(64 * 2**20 // 4)  # 64 MiB, written so the pages are resident
big.add_(1)
peaks.enter(None)
peaks.stop()
print(peaks.peaks["big"] - peaks.peaks["small"])
"""


def test_phase_peaks_attribute_memory_to_the_running_phase():
    # A fresh process: in the test process, pages freed by earlier tests stay resident and a new
    # allocation can reuse them without the RSS growing at all.
    out = subprocess.run([sys.executable, "-c", PHASE_PEAKS_SCRIPT], capture_output=True, text=True, check=True)
    assert int(out.stdout.split()[-1]) > 48 * 2**20
