"""Per run of a run_peers.py results directory: the measured steps' wall time, forward+backward time
(Trainer.training_step) and the rest of the step (clipping, optimizer, callbacks), and the CPU seconds
the process's threads used per step (from the probe's /proc/self/task samples at each step's end).
CPU seconds per step count the work a step did; wall time also counts the time the machine's other jobs
took the cores away, so on a shared machine CPU s/step is the steadier comparison.

    python bench/peers/step_cpu.py bench/results/peers-2026-12-06-b [--warmup 1]
"""

import argparse
import json
import statistics
from pathlib import Path

ap = argparse.ArgumentParser()
ap.add_argument("results", type=Path)
ap.add_argument("--warmup", type=int, default=1)
args = ap.parse_args()

rows = []
for path in sorted((args.results / "runs").glob("*.probe.jsonl")):
    events = [json.loads(line) for line in path.read_text().splitlines()]
    ends = [e for e in events if e["event"] == "on_step_end" and "thread_cpu_s" in e]
    fwd_bwd = [e["seconds"] for e in events if e["event"] == "fwd_bwd"][args.warmup :]
    walls, cpus, busiest = [], [], 0
    for a, b in zip(ends[args.warmup - 1 :], ends[args.warmup :]) if args.warmup else []:
        walls.append(b["t"] - a["t"])
        deltas = [b["thread_cpu_s"][k] - a["thread_cpu_s"].get(k, 0.0) for k in b["thread_cpu_s"]]
        cpus.append(sum(deltas))
        busiest = max(busiest, sum(d > 0.05 for d in deltas))
    if not walls:
        continue
    wall, fb = statistics.median(walls), statistics.median(fwd_bwd[: len(walls)])
    rows.append({
        "run": path.name.removesuffix(".probe.jsonl"), "steps": len(walls), "wall_s": wall, "fwd_bwd_s": fb,
        "rest_s": wall - fb, "cpu_s": statistics.median(cpus), "cpu_per_wall": statistics.median(c / w for c, w in zip(cpus, walls)),
        "busy_threads": busiest,
    })  # fmt: skip
lines = [
    "| run | measured steps | step wall s (median) | fwd+bwd s | rest of step s | CPU s/step (all threads) | CPU/wall | threads using CPU |",
    "|---|---|---|---|---|---|---|---|",
]
for r in rows:
    lines.append(f"| {r['run']} | {r['steps']} | {r['wall_s']:.2f} | {r['fwd_bwd_s']:.2f} | {r['rest_s']:.2f} | {r['cpu_s']:.2f} | "
                 f"{r['cpu_per_wall']:.2f} | {r['busy_threads']} |")  # fmt: skip
(args.results / "step_cpu.json").write_text(json.dumps(rows, indent=1))
(args.results / "step_cpu.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
