"""``mistral-tune bench``: time a recipe against a bare PyTorch loop, write JSON and a markdown table.

Each variant (a set of overrides on top of the common ones) runs in a fresh Python process
(``mistral_tune.benchmark.worker``), so peak memory and warm-up never leak from one variant into
the next. Inside it, every framework step is followed by a bare step on the same batches.

This module imports no torch: it only starts workers and summarizes. The command line is parsed
above it (``mistral_tune.cli.bench``), which hands each variant down as plain values.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from mistral_tune.benchmark import flops
from mistral_tune.core.errors import UserError


@dataclass
class BenchOptions:
    steps: int = 10
    warmup: int = 3
    repeat: int = 1
    out: str | None = None
    peak_tflops: float | None = None
    summarize_only: bool = False  # re-summarize the worker results already in --out, run nothing


def run_benchmark(recipe: str, common: list[str], variants: list, opts: BenchOptions, command: str = "") -> dict:
    """Run every variant ``opts.repeat`` times (round-robin) and write results.json / results.md.

    ``variants``: ``(name, overrides, hydra_overrides, options)`` each: the variant's arguments as given
    (common ones included, for the report), the Hydra overrides among them, and its bench options
    (``{"trainer": "mistral", "bare": True, "synthetic_length": 0}``).
    """
    out = Path(opts.out or f"runs/bench-{recipe}-{time.strftime('%Y%m%d-%H%M%S')}")
    out.mkdir(parents=True, exist_ok=True)
    runs: dict[str, list[dict]] = {name: [] for name, *_ in variants}
    errors: dict[str, str] = {}
    for r in range(opts.repeat):
        for name, overrides, hydra_overrides, options in variants:
            tag = f"{name}.{r}" if opts.repeat > 1 else name
            spec = {
                "name": name,
                "recipe": options.get("recipe") or recipe,
                "overrides": overrides,
                "hydra_overrides": hydra_overrides,
                "options": options,
                "steps": opts.steps,
                "warmup": opts.warmup,
                "run_dir": str(out / "runs" / tag),
            }
            if opts.summarize_only:
                result_path = out / f"{tag}.result.json"
                if not result_path.exists():
                    raise UserError(f"--summarize-only: {result_path} does not exist; run the benchmark first.")
                runs[name].append(json.loads(result_path.read_text(encoding="utf-8")))
                continue
            print(f"bench: {tag}: {' '.join(spec['overrides']) or '(recipe as is)'}", flush=True)
            result = run_worker(spec, out / f"{tag}.spec.json", out / f"{tag}.result.json", out / f"{tag}.log")
            if isinstance(result, str):
                errors[name] = result
                print(f"bench: {tag} FAILED (see {out / (tag + '.log')}): {result.splitlines()[-1]}", flush=True)
            else:
                runs[name].append(result)
    measured = {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "command": command}
    if opts.summarize_only and (out / "results.json").exists():  # keep when and how it was measured
        earlier = json.loads((out / "results.json").read_text(encoding="utf-8"))
        measured = {k: earlier.get(k, v) for k, v in measured.items()}
    summary = {
        **measured,
        "recipe": recipe,
        "common_overrides": common,
        "steps": opts.steps,
        "warmup": opts.warmup,
        "repeat": opts.repeat,
        "hardware": hardware_info(),
        "versions": package_versions(),
        "variants": [summarize(name, runs[name], opts.peak_tflops) for name, *_ in variants if runs[name]],
        "errors": errors,
    }
    (out / "results.json").write_text(json.dumps(summary, indent=1), encoding="utf-8")
    (out / "results.md").write_text(markdown_report(summary), encoding="utf-8")
    print(markdown_table(summary["variants"]))
    print(f"bench: wrote {out / 'results.json'} and {out / 'results.md'}")
    return summary


def run_worker(spec: dict, spec_path: Path, result_path: Path, log_path: Path):
    """One variant in a fresh interpreter; returns its result dict, or the log's tail on failure."""
    spec_path.write_text(json.dumps(spec, indent=1), encoding="utf-8")
    result_path.unlink(missing_ok=True)  # never mistake an earlier run's result for this one's
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[2])  # the checkout (or site-packages) holding mistral_tune
    env["PYTHONPATH"] = os.pathsep.join([root, *filter(None, [env.get("PYTHONPATH")])])
    cmd = [sys.executable, "-m", "mistral_tune.benchmark.worker", str(spec_path), str(result_path)]
    with log_path.open("w", encoding="utf-8") as log:
        proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, check=False)
    if proc.returncode != 0 or not result_path.exists():
        tail = log_path.read_text(encoding="utf-8", errors="replace").strip().splitlines()[-15:]
        return "\n".join(tail) or f"worker exited with {proc.returncode}"
    return json.loads(result_path.read_text(encoding="utf-8"))


def _stats(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"median": None, "mean": None, "min": None}
    return {"median": statistics.median(values), "mean": statistics.fmean(values), "min": min(values)}


def summarize(name: str, runs: list[dict], peak_tflops: float | None = None) -> dict[str, Any]:
    """Pool a variant's runs: step times over all measured steps, throughput as the median run.

    Throughput (tokens/s, MFU) is computed per run (its tokens over its seconds) and the median run
    is reported: on a shared machine one disturbed round would otherwise dominate a pooled sum.
    """
    first = runs[0]
    fw = [t for r in runs for t in r["framework_seconds"]]
    bare = [t for r in runs for t in r["bare_seconds"]]
    steps = [s for r in runs for s in r["step_batches"]]
    tokens = [sum(b["tokens"] for b in s) for s in steps]
    padded = [sum(b["padded_tokens"] for b in s) for s in steps]
    labels = [sum(b["label_tokens"] for b in s) for s in steps]
    config = SimpleNamespace(**first["model_config"])
    frozen = first["adapter"] != "none"
    adapter_params = first["parameters"]["trainable"] if frozen else 0

    def flops_of(step: list[dict]) -> float:
        lengths = [n for b in step for n in b["lengths"]]
        return flops.step_flops(config, lengths, frozen_base=frozen, adapter_parameters=adapter_params)

    step_flops = [flops_of(s) for s in steps]
    peak = peak_tflops or (flops.peak_tflops(first["device_name"] or "") if first["device"] == "cuda" else None)
    if first["dtype"] not in ("bfloat16", "float16"):
        peak = None  # MFU against the bf16 tensor-core peak means nothing for fp32 runs

    def side(key: str, phase: str) -> dict[str, Any] | None:
        seconds = [t for r in runs for t in r[key]]
        if not seconds:
            return None
        per_run = []  # (tokens/s, model FLOPs/s) of each run
        for r in runs:
            total = sum(r[key])
            if total > 0:
                n = len(r[key])
                run_tokens = sum(sum(b["tokens"] for b in s) for s in r["step_batches"][:n])
                per_run.append((run_tokens / total, sum(flops_of(s) for s in r["step_batches"][:n]) / total))
        return {
            "step_seconds": _stats(seconds),
            "tokens_per_second": statistics.median(t for t, _ in per_run),
            "tokens_per_second_runs": [t for t, _ in per_run],
            "peak_memory_bytes": max((r["peak_memory"].get(phase, 0) for r in runs), default=None),
            "mfu": flops.mfu(statistics.median(f for _, f in per_run), peak),
        }

    paired = [f / b for f, b in zip(fw, bare) if b > 0]
    return {
        "name": name,
        "recipe": first.get("recipe"),
        "overrides": first["overrides"],
        "trainer": first["trainer"],
        "device": first["device"],
        "device_name": first["device_name"],
        "dtype": first["dtype"],
        "attn_implementation": first["attn_implementation"],
        "loss_impl": first["loss_impl"],
        "gradient_checkpointing": first["gradient_checkpointing"],
        "packing": first["packing"],
        "parameters": first["parameters"],
        "matmul_parameters": flops.matmul_parameters(config),
        "measured_steps": len(fw),
        "warmup_seconds": statistics.fmean(r.get("warmup_seconds", 0.0) for r in runs),
        "tokens_per_step": statistics.fmean(tokens) if tokens else None,
        "padded_tokens_per_step": statistics.fmean(padded) if padded else None,
        "label_tokens_per_step": statistics.fmean(labels) if labels else None,
        "flops_per_step": statistics.fmean(step_flops) if step_flops else None,
        "peak_tflops": peak,
        "framework": side("framework_seconds", "framework"),
        "bare": side("bare_seconds", "bare"),
        # Median of per-step ratios: each framework step against the bare step right after it.
        "overhead_ratio": statistics.median(paired) if paired else None,
        # Fastest against fastest: the least disturbed step of each, a second estimate under load.
        "overhead_ratio_min": min(fw) / min(bare) if fw and bare else None,
        "framework_losses": first["framework_losses"],
        "bare_losses": first["bare_losses"],
        "memory_kind": first["memory_kind"],
        "rss_before_train_bytes": first["rss_before_train_bytes"],
        "process_peak_rss_bytes": max(r["process_peak_rss_bytes"] for r in runs),
        "usage_per_step": {
            side: usage_per_step(runs, side, key)
            for side, key in (("framework", "framework_seconds"), ("bare", "bare_seconds"))
        },
        "load_average": [r.get("load_average") for r in runs],
    }


def usage_per_step(runs: list[dict], side: str, key: str) -> dict[str, float] | None:
    """Minor page faults and user/system CPU seconds per measured step of one side (getrusage in the worker)."""
    steps = sum(len(r[key]) for r in runs)
    usages = [r.get("usage", {}).get(side) for r in runs]
    if not steps or not all(usages):
        return None
    out = {k: sum(u[k] for u in usages) / steps for k in ("minor_faults", "system_seconds", "user_seconds")}
    # Real tokens per CPU second (user + system): the cost of a token, whatever else shares the machine.
    tokens = sum(sum(b["tokens"] for b in step) for r in runs for step in r["step_batches"][: len(r[key])])
    cpu = sum(u["user_seconds"] + u["system_seconds"] for u in usages)
    out["tokens_per_cpu_second"] = tokens / cpu if cpu > 0 else None
    return out


def hardware_info() -> dict[str, Any]:
    """CPU model and core count (GPU names come from the workers, which import torch)."""
    model = platform.processor() or platform.machine()
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        model = next((ln.split(":", 1)[1].strip() for ln in lscpu.splitlines() if ln.startswith("Model name")), model)
    except OSError:
        pass
    return {"cpu_model": model, "cpu_count": os.cpu_count(), "platform": platform.platform()}


def package_versions() -> dict[str, str | None]:
    from importlib.metadata import PackageNotFoundError, version

    names = ("torch", "transformers", "trl", "peft", "accelerate", "liger-kernel", "flash-attn", "bitsandbytes")
    out = {}
    for name in names:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def _mib(n: float | None) -> str:
    return "-" if not n else f"{n / 2**20:,.0f} MiB"


def _num(x: float | None, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


def markdown_table(variants: list[dict]) -> str:
    """One row per variant: step times, the framework/bare ratio, tokens/s, peak memory, MFU."""
    head = (
        "| variant | tokens/step (padded) | framework s/step | bare s/step | framework/bare | framework tok/s "
        "| bare tok/s | peak mem framework | peak mem bare | MFU |\n|---|---|---|---|---|---|---|---|---|---|\n"
    )
    rows = []
    for v in variants:
        fw, bare = v["framework"] or {}, v["bare"] or {}
        mfu = fw.get("mfu")
        rows.append(
            f"| {v['name']} | {_num(v['tokens_per_step'], ',.0f')} ({_num(v['padded_tokens_per_step'], ',.0f')}) "
            f"| {_num((fw.get('step_seconds') or {}).get('median'), '.3f')} "
            f"| {_num((bare.get('step_seconds') or {}).get('median'), '.3f')} "
            f"| {_num(v['overhead_ratio'], '.2f')} | {_num(fw.get('tokens_per_second'), ',.0f')} "
            f"| {_num(bare.get('tokens_per_second'), ',.0f')} | {_mib(fw.get('peak_memory_bytes'))} "
            f"| {_mib(bare.get('peak_memory_bytes'))} | {'-' if mfu is None else f'{100 * mfu:.1f}%'} |"
        )
    return head + "\n".join(rows) + "\n"


def markdown_report(summary: dict) -> str:
    hw, lines = summary["hardware"], []
    lines.append(f"# Benchmark: recipe={summary['recipe']}\n")
    lines.append(f"- date: {summary['date']}")
    lines.append(f"- command: `{summary['command']}`")
    devices = sorted(
        {v["device_name"] or f"CPU ({hw['cpu_model']}, {hw['cpu_count']} cores)" for v in summary["variants"]}
    )
    lines.append(f"- hardware: {', '.join(devices) or hw['cpu_model']}")
    lines.append(f"- versions: {', '.join(f'{k} {v}' for k, v in summary['versions'].items() if v)}")
    lines.append(f"- {summary['warmup']} warm-up + {summary['steps']} measured steps per variant, x{summary['repeat']}")
    lines.append(
        "- step times: medians over all measured steps; tokens/s: the median run; framework/bare: median of per-step ratios"
    )
    mem = {v["memory_kind"] for v in summary["variants"]}
    lines.append(f"- peak memory: {', '.join(sorted(mem))}\n")
    lines.append(markdown_table(summary["variants"]))
    for v in summary["variants"]:
        usage = (v.get("usage_per_step") or {}).get("framework")
        if usage:
            lines.append(
                f"- {v['name']} ({v.get('recipe')}): per framework step {usage['minor_faults']:,.0f} minor page faults, "
                f"{usage['system_seconds']:.2f} s system and {usage['user_seconds']:.2f} s user CPU time; "
                f"{_num(usage['tokens_per_cpu_second'], ',.0f')} real tokens per CPU second"
            )
    for v in summary["variants"]:
        loads = ", ".join(f"{a}->{b}" for a, b in (x or [None, None] for x in v["load_average"]))
        lines.append(
            f"- {v['name']}: `{' '.join(v['overrides']) or '(recipe as is)'}` ({v['attn_implementation']}, "
            f"{v['dtype']}, loss={v['loss_impl']}, trainer={v['trainer']}); "
            f"fastest-step ratio {_num(v['overhead_ratio_min'], '.2f')}; warm-up {v['warmup_seconds']:.0f} s; "
            f"1-min load average {loads}"
        )
    for name, err in summary["errors"].items():
        lines.append(f"- {name}: FAILED: {err.splitlines()[-1]}")
    return "\n".join(lines) + "\n"
