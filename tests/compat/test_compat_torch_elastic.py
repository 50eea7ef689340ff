"""Canary for mistral_tune/compat/torch_elastic.py: torchrun's workers can join the store their agent hosts."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from mistral_tune.compat import broken

REPO = Path(__file__).resolve().parents[2]

WORKER = """
import os, sys
from mistral_tune.compat.torch_elastic import agent_store
store = agent_store(timeout=60)
assert store is not None, "no agent store announced"
rank = int(os.environ["RANK"])
store.set(f"canary/{rank}", str(os.getpid()))
store.wait([f"canary/{1 - rank}"])  # the other worker's key: both talk to one store
os.write(1, f"saw {store.get(f'canary/{1 - rank}').decode()}\\n".encode())  # one write: the workers share stdout
"""


def test_workers_of_a_torchrun_launch_share_their_agents_store(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(port), str(script)],
        env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0 and proc.stdout.count("saw ") == 2, broken(
        "torch",
        "torch.distributed.elastic (TORCHELASTIC_USE_AGENT_STORE)",
        f"workers no longer join their agent's store at MASTER_ADDR:MASTER_PORT: {proc.stderr[-2000:]}",
    )
