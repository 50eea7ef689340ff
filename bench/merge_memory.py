"""Peak memory of the streamed merge vs the in-memory (PEFT merge_and_unload) merge.

Builds a random-init (load_weights=False style) Mistral with the 7B preset's layer shapes but fewer
layers, saves it in bf16 in small shards with an all-linear LoRA adapter (r=16, non-zero), then runs
each merge in a fresh process while sampling /proc/self/status every 5 ms:

    PYTHONPATH=. python bench/merge_memory.py --layers 4 --shard-size 500MB --workdir /tmp/merge-bench

Per-layer tensors have the real 7B sizes (the largest tensor, the 32000x4096 embedding, too), so
the streamed merge's peak is what a 7B merge would need; the in-memory merge's peak grows with the
whole model. Prints one JSON object and checks that both merges produce the same tensors.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


class PeakSampler:
    """Highest VmRSS / RssAnon / RssFile of this process, sampled from /proc every few ms."""

    FIELDS = ("VmRSS", "RssAnon", "RssFile")

    def __init__(self, interval: float = 0.005):
        self.interval, self.peak = interval, dict.fromkeys(self.FIELDS, 0)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sample(self) -> dict[str, int]:
        values = {}
        with open("/proc/self/status") as f:
            for line in f:
                key = line.split(":", 1)[0]
                if key in self.FIELDS:
                    values[key] = int(line.split()[1]) * 1024
        return values

    def _run(self) -> None:
        while not self._stop.is_set():
            for key, value in self.sample().items():
                self.peak[key] = max(self.peak[key], value)
            time.sleep(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def build(workdir: Path, layers: int, shard_size: str) -> dict:
    """Random-init base (bf16, sharded) + random LoRA adapter on disk."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import MistralForCausalLM

    from mistral_tune.models.loading import preset_config
    from mistral_tune.models.presets import PRESETS

    torch.manual_seed(0)
    # What models.load_model does for model.load_weights=false, at fewer layers: the preset's
    # architecture with transformers' random init.
    config = preset_config(PRESETS["mistral_7b_en"], num_hidden_layers=layers)
    torch.set_default_dtype(torch.bfloat16)  # initialize in bf16 directly: half the memory of fp32 + cast
    try:
        model = MistralForCausalLM(config)
    finally:
        torch.set_default_dtype(torch.float32)
    model.save_pretrained(workdir / "base", max_shard_size=shard_size)
    n_params = sum(p.numel() for p in model.parameters())
    peft_model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.01)
    peft_model.save_pretrained(workdir / "adapter")
    shards = sorted(p.name for p in (workdir / "base").glob("*.safetensors"))
    return {"parameters": n_params, "base_shards": len(shards), "layers": layers}


def merge_streamed(workdir: Path, shard_size: str) -> None:
    from mistral_tune.export.stream_merge import stream_merge

    stream_merge(workdir / "base", workdir / "adapter", workdir / "streamed", max_shard_size=shard_size)


def merge_in_memory(workdir: Path, shard_size: str) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(workdir / "base", dtype=torch.bfloat16)
    model = PeftModel.from_pretrained(model, workdir / "adapter").merge_and_unload()
    model.save_pretrained(workdir / "in_memory", max_shard_size=shard_size)


def measure(mode: str, workdir: Path, shard_size: str) -> dict:
    """Run one mode in this (fresh) process; baseline = after imports, before any weight is read."""
    import peft  # noqa: F401
    import safetensors  # noqa: F401
    import torch  # noqa: F401
    import transformers  # noqa: F401

    with PeakSampler() as sampler:
        baseline = sampler.sample()
        start = time.perf_counter()
        {"streamed": merge_streamed, "in_memory": merge_in_memory}[mode](workdir, shard_size)
        seconds = time.perf_counter() - start
    return {"mode": mode, "seconds": round(seconds, 1), "baseline": baseline, "peak": sampler.peak}


def compare(workdir: Path) -> float:
    """Largest |difference| between the two merged checkpoints, tensor by tensor."""
    from mistral_tune.export.stream_merge import base_shards

    def tensors(directory):
        from safetensors import safe_open

        for shard in base_shards(directory):
            with safe_open(str(shard), framework="pt") as f:
                for name in f.keys():
                    yield name, f.get_tensor(name)

    streamed = dict(tensors(workdir / "streamed"))
    worst = 0.0
    for name, t in tensors(workdir / "in_memory"):
        worst = max(worst, (t.float() - streamed.pop(name).float()).abs().max().item())
    assert not streamed, f"tensors only in the streamed merge: {list(streamed)[:3]}"
    return worst


def mib(n: int) -> float:
    return round(n / 2**20)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4, help="decoder layers of 7B shape (32 = the real 7B)")
    parser.add_argument("--shard-size", default="500MB", help="base and output shard limit")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/merge-bench"))
    parser.add_argument("--mode", choices=["streamed", "in_memory"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.mode:  # child process: one measurement, as JSON on stdout
        print(json.dumps(measure(args.mode, args.workdir, args.shard_size)))
        return
    args.workdir.mkdir(parents=True, exist_ok=True)
    info = build(args.workdir, args.layers, args.shard_size)
    info["base_bytes"] = sum(p.stat().st_size for p in (args.workdir / "base").glob("*.safetensors"))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    results = {}
    for mode in ("streamed", "in_memory"):
        cmd = [
            sys.executable,
            __file__,
            "--mode",
            mode,
            "--workdir",
            str(args.workdir),
            "--shard-size",
            args.shard_size,
        ]
        out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
        r = json.loads(out.strip().splitlines()[-1])
        results[mode] = {
            "seconds": r["seconds"],
            "peak_rss_mib": mib(r["peak"]["VmRSS"]),
            "peak_anon_mib": mib(r["peak"]["RssAnon"]),
            "peak_file_mapped_mib": mib(r["peak"]["RssFile"]),
            "above_baseline_anon_mib": mib(r["peak"]["RssAnon"] - r["baseline"]["RssAnon"]),
            "baseline_rss_mib": mib(r["baseline"]["VmRSS"]),
        }
    info["base_mib"] = mib(info.pop("base_bytes"))
    print(
        json.dumps({**info, "shard_size": args.shard_size, **results, "max_abs_diff": compare(args.workdir)}, indent=2)
    )


if __name__ == "__main__":
    main()
