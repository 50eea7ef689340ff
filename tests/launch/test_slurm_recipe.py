"""The Slurm recipe (examples/slurm/, shown in docs/multi-gpu.md) renders, for 2 and 4 nodes, the commands
the launcher turns into the right ``accelerate launch`` on each node.

The script runs under bash with stand-ins for what only a cluster has: ``scontrol show hostnames`` prints
the allocation's hosts, ``srun`` runs its command once per node with that node's SLURM_NODEID (as
``--ntasks-per-node=1`` does), and ``mistral-tune`` records its arguments. Each recorded command is then
composed and handed to the launcher's own ``accelerate_argv``, and accelerate's parser reads the result.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest

import mistral_tune.launch.accelerate as launch
from mistral_tune.config.compose import compose, split_recipe

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "examples" / "slurm" / "sft_lora_2x8.sbatch"

FAKES = {
    "scontrol": """#!/bin/bash
[ "$1 $2" = "show hostnames" ] || exit 1
for h in $FAKE_HOSTS; do echo "$h"; done
""",
    "srun": """#!/bin/bash
while [[ "$1" == --* ]]; do shift; done   # srun's own options
node=0
for h in $FAKE_HOSTS; do SLURMD_NODENAME=$h SLURM_NODEID=$node "$@" || exit 1; node=$((node + 1)); done
""",
    "mistral-tune": """#!/usr/bin/env python3
import json, os, sys
with open(os.environ["FAKE_RECORD"], "a") as f:
    f.write(json.dumps({"node": os.environ["SLURMD_NODENAME"], "argv": sys.argv[1:]}) + "\\n")
""",
}


def render(tmp: Path, nodes: int) -> list[dict]:
    """Run the sbatch script as Slurm would on ``nodes`` nodes; returns each node's mistral-tune command."""
    bin_dir = tmp / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name, text in FAKES.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    hosts = [f"gpu{i + 1:03d}" for i in range(nodes)]
    record = tmp / f"commands-{nodes}.jsonl"
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "FAKE_HOSTS": " ".join(hosts), "FAKE_RECORD": str(record),
           "SLURM_JOB_NAME": "sft-lora-7b", "SLURM_JOB_ID": "4242", "SLURM_NNODES": str(nodes),
           "SLURM_JOB_NODELIST": f"gpu[001-{nodes:03d}]"}  # fmt: skip
    subprocess.run(["bash", str(SCRIPT)], env=env, check=True, capture_output=True, text=True, timeout=60)
    return [json.loads(line) for line in record.read_text().splitlines()]


@pytest.mark.parametrize("nodes", [2, 4])
def test_the_slurm_script_starts_one_launcher_per_node_that_accelerate_reads_right(tmp_path, nodes):
    from accelerate.commands.launch import launch_command_parser

    commands = render(tmp_path, nodes)
    assert [c["node"] for c in commands] == [f"gpu{i + 1:03d}" for i in range(nodes)]  # one mistral-tune per node
    workers = []
    for machine_rank, command in enumerate(commands):
        recipe, overrides = split_recipe(command["argv"])
        cfg = compose(recipe, overrides)
        assert cfg.launcher.name == "ddp" and cfg.output_dir == "/shared/runs/sft-lora-7b" and cfg.resume == "auto"
        args = launch_command_parser().parse_args(launch.accelerate_argv(cfg, recipe, overrides, Path(cfg.output_dir)))
        # 8 GPUs per node: torchrun on each node starts 8 of the job's 8 x nodes processes
        assert (args.num_processes, args.num_machines, args.machine_rank) == (8 * nodes, nodes, machine_rank)
        assert (args.main_process_ip, args.main_process_port) == ("gpu001", 29500)
        assert Path(args.config_file) == launch.CONFIG_DIR / "ddp.yaml"
        assert args.module and args.training_script == "mistral_tune"
        workers.append([a for a in args.training_script_args if not a.startswith("launcher.machine_rank=")])
    assert all(w == workers[0] for w in workers)  # every node's processes compose the same job


def test_the_docs_show_the_slurm_script_as_it_is():
    """docs/multi-gpu.md quotes examples/slurm/ verbatim, so what the test above checks is what users read."""
    page = (REPO / "docs" / "multi-gpu.md").read_text()
    blocks = re.findall(r"```bash\n(#!/bin/bash\n.*?)```", page, re.S)
    assert SCRIPT.read_text() in blocks
    assert f"examples/slurm/{SCRIPT.name}" in page


def test_the_script_is_valid_bash():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)
