"""Peers on the same job, interleaved in one invocation: mistral-tune, LLaMA-Factory, axolotl, stock TRL.

Runs in the project's venv; each peer runs in its own venv (bench/peers/install_*.sh) under
bench/peers/probe.py, which stamps every optimizer step and counts each batch's real tokens. The driver
samples the RSS of each run's whole process tree (psutil, every 20 ms).

The job (both shapes): the model directory bench/peers/prepare.py writes (same weights and tokenizer for
every tool), the first --rows rows of alpaca_5000.json, LoRA r=8 / alpha 16 / dropout 0.05 on q_proj and
v_proj, fp32, learning rate 1e-4 with a cosine schedule and no warm-up, seed 42, the same steps and batch.
- shape a: mistral_tiny, max length 256, batch 8, unpacked;
- shape b: the decoder-dominated model, max length 1024, batch 1 (packed: one row of up to 1024 tokens).

Variants per tool: `default` (the tool's own defaults for gradient checkpointing, packing, loss and what
happens after training) and `matched` (gradient checkpointing off, packing on for shape b and off for
shape a, the model's plain cross-entropy, only the adapter saved at the end). mistral-tune also runs
`matched_chunked`: matched, but with its default chunked loss (the one lever the others lack). `*_bf16`:
the same with the frozen weights loaded in bf16, the adapter in fp32 and bf16 autocast (on this CPU:
AVX512_BF16), for every tool that can run it on a CPU (not axolotl 0.19.0: see TOOLS). mistral-tune's
`*_sdpa` variants run transformers' `sdpa` instead of its default `sdpa_packed` (one attention call per
packed example), to measure that lever on its own.
Round r runs every variant of shape a then of shape b, A B C D ... in the same order each round.

    python bench/peers/run_peers.py --rounds 2 --out bench/results/peers-DATE
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
PROJECT_PY = os.environ.get("PROJECT_PYTHON", sys.executable)
VENVS = Path(os.environ.get("PEER_VENVS", "/work/venvs"))
LF_VENV = VENVS / "peer-llamafactory"
AX_VENV = VENVS / "peer-axolotl"
DATA = Path(os.environ.get("ALPACA_JSON", "/work/shared/data/alpaca_5000.json"))

LR = 1e-4
SHAPES = {
    "a": {"seq": 256, "batch": 8, "steps": 12, "warmup": 2, "packing": False},
    "b": {"seq": 1024, "batch": 1, "steps": 5, "warmup": 1, "packing": True},
}


# ---- one command per (tool, variant, shape) ---------------------------------------------------------------


def cmd_mistral_tune(variant, shape, work, run_dir):
    s = SHAPES[shape]
    args = [
        "recipe=sft_lora", f"model.path={work / 'models' / shape}", f"data.path={work / 'data' / 'alpaca.json'}",
        f"trainer.max_length={s['seq']}", f"train.per_device_train_batch_size={s['batch']}",
        f"train.learning_rate={LR}", "train.lr_scheduler_type=cosine", "train.warmup_steps=0",
        f"train.max_steps={s['steps']}", "train.logging_steps=1", "train.seed=42", f"output_dir={run_dir}",
    ]  # fmt: skip
    if variant.startswith("matched"):
        args += ["train.gradient_checkpointing=false", f"trainer.packing={str(s['packing']).lower()}", "export=none"]
        if not variant.startswith("matched_chunked"):
            args += ["trainer.loss=plain"]
    if "_bf16" in variant:  # frozen weights in bf16, the adapter in fp32, bf16 autocast
        args += ["model.dtype=bfloat16", "train.bf16=true"]
    if variant.endswith("_sdpa"):  # transformers' sdpa (one block-diagonal mask a row) instead of sdpa_packed
        args += ["model.attn_implementation=sdpa"]
    env = {"PYTHONPATH": str(ROOT)}
    return [PROJECT_PY, str(HERE / "probe.py"), "{probe}", "-m", "mistral_tune", *args], env


def cmd_trl(variant, shape, work, run_dir):
    s = SHAPES[shape]
    args = [
        "--model", str(work / "models" / shape), "--data", str(work / "data" / "alpaca.json"),
        "--output-dir", str(run_dir), "--max-length", str(s["seq"]), "--batch", str(s["batch"]),
        "--lr", str(LR), "--steps", str(s["steps"]),
    ]  # fmt: skip
    if variant.startswith("matched"):
        args += ["--gradient-checkpointing", "false", "--packing", str(s["packing"]).lower()]
    if variant.endswith("_bf16"):
        args += ["--bf16", "true"]
    return [PROJECT_PY, str(HERE / "probe.py"), "{probe}", str(HERE / "trl_sft.py"), *args], {}


def cmd_llamafactory(variant, shape, work, run_dir):
    s = SHAPES[shape]
    cfg = {
        "model_name_or_path": str(work / "models" / shape),
        "stage": "sft", "do_train": True, "finetuning_type": "lora",
        "lora_rank": 8, "lora_alpha": 16, "lora_dropout": 0.05, "lora_target": "q_proj,v_proj",
        "dataset": "bench_alpaca", "dataset_dir": str(work / "data"), "template": "mistral",
        "cutoff_len": s["seq"], "overwrite_cache": True,
        "output_dir": str(run_dir), "logging_steps": 1, "save_strategy": "no", "report_to": "none",
        "per_device_train_batch_size": s["batch"], "gradient_accumulation_steps": 1,
        "learning_rate": LR, "lr_scheduler_type": "cosine", "warmup_steps": 0, "max_steps": s["steps"],
        "bf16": False, "fp16": False, "seed": 42, "plot_loss": False,
    }  # fmt: skip
    if variant.startswith("matched"):
        cfg.update({"disable_gradient_checkpointing": True, "packing": s["packing"]})
    if variant.endswith("_bf16"):  # LLaMA-Factory then loads the model in bf16 and keeps the adapter in fp32
        cfg.update({"bf16": True, "use_cpu": True})  # transformers refuses bf16 without a GPU unless use_cpu
    path = (
        run_dir.parent / f"{run_dir.name}.llamafactory.yaml"
    )  # JSON is YAML; LLaMA-Factory 0.9.5 fails reading a .json config
    path.write_text(json.dumps(cfg, indent=1))
    env = {"DISABLE_VERSION_CHECK": "1", "FORCE_TORCHRUN": "0"}
    return [
        str(LF_VENV / "bin/python"),
        str(HERE / "probe.py"),
        "{probe}",
        str(LF_VENV / "bin/llamafactory-cli"),
        "train",
        str(path),
    ], env


def cmd_axolotl(variant, shape, work, run_dir):
    s = SHAPES[shape]
    cfg = {
        "base_model": str(work / "models" / shape),
        "datasets": [{"path": str(work / "data" / "alpaca.json"), "ds_type": "json", "type": "alpaca"}],
        "adapter": "lora", "lora_r": 8, "lora_alpha": 16, "lora_dropout": 0.05,
        "lora_target_modules": ["q_proj", "v_proj"],
        "sequence_len": s["seq"], "micro_batch_size": s["batch"], "gradient_accumulation_steps": 1,
        "learning_rate": LR, "lr_scheduler": "cosine", "warmup_steps": 0, "max_steps": s["steps"],
        "optimizer": "adamw_torch", "bf16": False, "fp16": False, "tf32": False, "seed": 42,
        "output_dir": str(run_dir), "logging_steps": 1, "save_strategy": "no", "val_set_size": 0,
        "dataset_prepared_path": str(run_dir / "prepared"),
    }  # fmt: skip
    if variant.startswith("matched"):
        cfg.update({"gradient_checkpointing": False, "sample_packing": s["packing"]})
    path = run_dir.parent / f"{run_dir.name}.axolotl.yaml"
    path.write_text(json.dumps(cfg, indent=1))
    env = {"AXOLOTL_DO_NOT_TRACK": "1", "DO_NOT_TRACK": "1"}  # no telemetry (it retries a blocked host)
    return [str(AX_VENV / "bin/python"), str(HERE / "probe.py"), "{probe}", "-m", "axolotl.cli.train", str(path)], env


TOOLS = {
    "mistral-tune": (
        cmd_mistral_tune,
        [
            "default",
            "matched",
            "matched_sdpa",
            "matched_chunked",
            "matched_bf16",
            "matched_chunked_bf16",
            "matched_chunked_bf16_sdpa",
        ],  # fmt: skip
    ),
    "llamafactory": (cmd_llamafactory, ["default", "matched", "matched_bf16"]),
    # no matched_bf16: axolotl 0.19.0 has no `use_cpu`, and transformers refuses bf16 without a GPU unless it is set
    "axolotl": (cmd_axolotl, ["default", "matched"]),
    "trl": (cmd_trl, ["default", "matched", "matched_bf16"]),
}


# ---- running and measuring -------------------------------------------------------------------------------


def tree_rss(proc: psutil.Process) -> int:
    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


def run_one(argv, env, log_path: Path, probe_path: Path, timeout: float) -> dict:
    probe_path.unlink(missing_ok=True)
    argv = [a.replace("{probe}", str(probe_path)) for a in argv]
    full_env = {**os.environ, **env}
    full_env.pop("PYTHONPATH", None) if "PYTHONPATH" not in env else None
    load_before = os.getloadavg()[0]
    t0 = time.time()
    with open(log_path, "w") as log:
        log.write("$ " + " ".join(argv) + "\n")
        log.flush()
        popen = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=full_env, cwd=str(log_path.parent))
        try:
            proc = psutil.Process(popen.pid)
        except psutil.NoSuchProcess:  # already gone: its log says why
            proc = None
        peak = [0]
        done = threading.Event()

        def sample():
            while proc is not None and not done.is_set():
                try:
                    peak[0] = max(peak[0], tree_rss(proc))
                except psutil.Error:
                    break
                time.sleep(0.02)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        try:
            rc = popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            popen.kill()
            rc = "timeout"
        t_end = time.time()
        done.set()
        sampler.join()
    return {"argv": argv, "rc": rc, "t_launch": t0, "t_exit": t_end, "peak_tree_rss_bytes": peak[0],
            "load_1min_before": load_before, "load_1min_after": os.getloadavg()[0]}  # fmt: skip


def analyse(raw: dict, probe_path: Path, warmup: int) -> dict:
    events = [json.loads(line) for line in probe_path.read_text().splitlines()] if probe_path.exists() else []
    begins = [e["t"] for e in events if e["event"] == "on_step_begin"]
    ends = [e["t"] for e in events if e["event"] == "on_step_end"]
    batches = [e for e in events if e["event"] == "batch"]
    losses = [e["logs"]["loss"] for e in events if e["event"] == "log" and "loss" in e["logs"]]
    out = dict(raw)
    out["steps_completed"] = len(ends)
    out["first_batch"] = batches[0] if batches else None
    out["losses"] = losses
    # forward + backward of each step (Trainer.training_step); a step's rest is clipping, optimizer, callbacks
    out["fwd_bwd_s"] = [e["seconds"] for e in events if e["event"] == "fwd_bwd"]
    if not begins or len(ends) <= warmup:
        out["ok"] = False
        return out
    out["ok"] = raw["rc"] == 0
    out["startup_s"] = begins[0] - raw["t_launch"]
    out["after_last_step_s"] = raw["t_exit"] - ends[-1]
    steps = [ends[i] - ends[i - 1] for i in range(warmup, len(ends))]
    measured = batches[warmup : len(ends)]
    real = sum(b["real_tokens"] for b in measured)
    labels = sum(b["label_tokens"] or 0 for b in measured)
    span = ends[-1] - ends[warmup - 1] if warmup > 0 else ends[-1] - begins[0]
    out.update(
        step_times_s=steps,
        step_time_median_s=statistics.median(steps),
        measured_steps=len(steps),
        real_tokens=real,
        label_tokens=labels,
        padded_tokens=sum(int(__import__("math").prod(b["shape"])) for b in measured),
        real_tokens_per_s=real / span,
        total_s=raw["t_exit"] - raw["t_launch"],
    )
    return out


def summarize(results: list[dict]) -> dict:
    table = {}
    for r in results:
        key = (r["shape"], r["tool"], r["variant"])
        table.setdefault(key, []).append(r)
    summary = []
    for (shape, tool, variant), runs in table.items():
        ok = [r for r in runs if r.get("ok")]
        row = {"shape": shape, "tool": tool, "variant": variant, "runs": len(runs), "ok_runs": len(ok)}
        if ok:
            med = lambda k, ok=ok: statistics.median(r[k] for r in ok)  # noqa: E731
            row.update(
                real_tokens_per_s=med("real_tokens_per_s"),
                real_tokens_per_s_each=[round(r["real_tokens_per_s"], 1) for r in ok],
                step_time_median_s=statistics.median(t for r in ok for t in r["step_times_s"]),
                real_tokens_per_step=statistics.median(r["real_tokens"] / r["measured_steps"] for r in ok),
                padded_tokens_per_step=statistics.median(r["padded_tokens"] / r["measured_steps"] for r in ok),
                peak_tree_rss_mib=med("peak_tree_rss_bytes") / 2**20,
                peak_tree_rss_mib_each=[round(r["peak_tree_rss_bytes"] / 2**20) for r in ok],
                startup_s=med("startup_s"),
                after_last_step_s=med("after_last_step_s"),
                first_loss=ok[0]["losses"][0] if ok[0]["losses"] else None,
                gradient_checkpointing=ok[0]["first_batch"].get("gradient_checkpointing"),
                batch_keys=ok[0]["first_batch"].get("keys"),
            )
        else:
            row["error_tail"] = runs[-1].get("error_tail")
        summary.append(row)
    return {"rows": summary}


def markdown(summary: dict, meta: dict) -> str:
    lines = [f"Load average (1 min) during the run: {meta['load_min']:.1f}-{meta['load_max']:.1f}", ""]
    for shape in SHAPES:
        s = SHAPES[shape]
        lines += [f"### shape {shape}: seq {s['seq']}, batch {s['batch']}, {s['steps']} steps ({s['warmup']} warm-up)", "",
                  "| tool | variant | real tokens/s (median of rounds) | each round | step s (median) | real (padded) tokens/step | peak RSS tree MiB | start-up to 1st step s | after last step s | grad ckpt | first loss |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for row in summary["rows"]:
            if row["shape"] != shape:
                continue
            if not row.get("ok_runs"):
                lines.append(f"| {row['tool']} | {row['variant']} | failed: see its log | | | | | | | | |")
                continue
            lines.append(
                f"| {row['tool']} | {row['variant']} | {row['real_tokens_per_s']:.0f} | {row['real_tokens_per_s_each']} | "
                f"{row['step_time_median_s']:.3f} | {row['real_tokens_per_step']:.0f} ({row['padded_tokens_per_step']:.0f}) | "
                f"{row['peak_tree_rss_mib']:.0f} | {row['startup_s']:.1f} | {row['after_last_step_s']:.1f} | "
                f"{row['gradient_checkpointing']} | {row['first_loss']} |"
            )
        lines.append("")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--work", type=Path, default=Path("/tmp/peers-bench"))
    ap.add_argument("--rows", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--shapes", default="a,b")
    ap.add_argument("--tools", default="mistral-tune,llamafactory,axolotl,trl")
    ap.add_argument("--variants", default=None, help="comma list to keep (default: all)")
    ap.add_argument("--skip", default="", help="SHAPE:VARIANT,... pairs left out (e.g. b:default)")
    ap.add_argument("--timeout", type=float, default=900)
    ap.add_argument("--steps", default=None, help="SHAPE:STEPS:WARMUP,... e.g. a:12:2,b:5:1 (the defaults)")
    ap.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS for every run (default: unset)")
    ap.add_argument("--summarize-only", action="store_true")
    args = ap.parse_args()
    args.out, args.work = args.out.resolve(), args.work.resolve()  # the runs' cwd is their log directory
    args.out.mkdir(parents=True, exist_ok=True)
    for item in (args.steps or "").split(","):
        if item:
            shape, steps, warmup = item.split(":")
            SHAPES[shape].update(steps=int(steps), warmup=int(warmup))
    if args.threads:
        os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(args.threads)
    if args.summarize_only:
        results = json.loads((args.out / "runs.json").read_text())
    else:
        if not DATA.exists():
            print(f"skipped: {DATA} not found (set ALPACA_JSON=/path/to/alpaca_5000.json)")
            return 0
        prep = [
            PROJECT_PY,
            str(HERE / "prepare.py"),
            "--work",
            str(args.work),
            "--data",
            str(DATA),
            "--rows",
            str(args.rows),
        ]
        print("$", " ".join(prep), flush=True)
        subprocess.run(prep, check=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
        tools = args.tools.split(",")
        plan = []
        for tool in tools:
            venv = {"llamafactory": LF_VENV, "axolotl": AX_VENV}.get(tool)
            if venv is not None and not (venv / "bin/python").exists():
                print(f"{tool}: no venv at {venv} (run bench/peers/install_{tool}.sh); left out", flush=True)
                continue
            for variant in TOOLS[tool][1]:
                if args.variants and variant not in args.variants.split(","):
                    continue
                plan.append((tool, variant))
        results = []
        stamp = time.strftime("%Y%m%d-%H%M%S")  # every invocation trains into new run directories
        runs_dir = args.out / "runs"
        runs_dir.mkdir(exist_ok=True)
        for rnd in range(args.rounds):
            for shape in args.shapes.split(","):
                for tool, variant in plan:
                    if f"{shape}:{variant}" in args.skip.split(","):
                        continue
                    name = f"r{rnd}-{shape}-{tool}-{variant}"
                    run_dir = args.work / "runs" / stamp / name
                    run_dir.mkdir(parents=True, exist_ok=True)
                    argv, env = TOOLS[tool][0](variant, shape, args.work, run_dir)
                    log_path = runs_dir / f"{name}.log"
                    probe_path = runs_dir / f"{name}.probe.jsonl"
                    raw = run_one(argv, env, log_path, probe_path, args.timeout)
                    r = analyse(raw, probe_path, SHAPES[shape]["warmup"])
                    r.update(round=rnd, shape=shape, tool=tool, variant=variant)
                    if not r["ok"]:
                        r["error_tail"] = log_path.read_text()[-3000:]
                    results.append(r)
                    tps = f"{r['real_tokens_per_s']:.0f} tok/s" if r.get("real_tokens_per_s") else "FAILED"
                    print(f"{name}: rc={r['rc']} {tps} rss={r['peak_tree_rss_bytes'] / 2**20:.0f} MiB "
                          f"total={r['t_exit'] - r['t_launch']:.0f}s load={r['load_1min_after']:.1f}", flush=True)  # fmt: skip
                    (args.out / "runs.json").write_text(json.dumps(results, indent=1))
    summary = summarize(results)
    loads = [r["load_1min_before"] for r in results] + [r["load_1min_after"] for r in results]
    meta = {
        "command": " ".join(sys.argv), "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
        "load_min": min(loads), "load_max": max(loads), "shapes": SHAPES, "rows": args.rows, "threads": args.threads, "learning_rate": LR,
    }  # fmt: skip
    summary["meta"] = meta
    (args.out / "results.json").write_text(json.dumps(summary, indent=1))
    (args.out / "results.md").write_text(markdown(summary, meta))
    print(markdown(summary, meta))
    return 0


if __name__ == "__main__":
    sys.exit(main())
