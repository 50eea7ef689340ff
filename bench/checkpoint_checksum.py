"""Cost of the xxh3_128 checksums in the checkpoint completeness marker, on a 7B-sized LoRA checkpoint.

Writes what a Mistral-7B LoRA run (r=16, all-linear: q/k/v/o and gate/up/down in 32 layers, 41.9M
trainable parameters) saves in a checkpoint: the fp32 adapter (adapter_model.safetensors) and AdamW's
two fp32 moment buffers (optimizer.pt), about 503 MB. Then times, on the same files:

- ``sizes``: what the marker cost before (fsync every file, record its size);
- ``marker``: what it costs now (fsync + xxh3_128 of every file, `checkpoints.write_marker`);
- ``verify``: the resume-time check (`completeness_problem(..., verify=True)`), which re-reads every file.

    PYTHONPATH=. python bench/checkpoint_checksum.py --workdir /tmp/ckpt-bench [--repeat 3]

Prints one JSON object (medians over --repeat); the figures go in docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import time
from pathlib import Path

# Mistral-7B: hidden 4096, intermediate 14336, 8 KV heads of 128, 32 layers.
HIDDEN, INTERMEDIATE, KV, LAYERS = 4096, 14336, 1024, 32
LINEARS = {
    "q_proj": (HIDDEN, HIDDEN),
    "k_proj": (HIDDEN, KV),
    "v_proj": (HIDDEN, KV),
    "o_proj": (HIDDEN, HIDDEN),
    "gate_proj": (HIDDEN, INTERMEDIATE),
    "up_proj": (HIDDEN, INTERMEDIATE),
    "down_proj": (INTERMEDIATE, HIDDEN),
}


def write_checkpoint(path: Path, rank: int) -> int:
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(0)
    adapter, params = {}, 0
    for layer in range(LAYERS):
        for name, (fan_in, fan_out) in LINEARS.items():
            block = "mlp" if name in ("gate_proj", "up_proj", "down_proj") else "self_attn"
            prefix = f"base_model.model.model.layers.{layer}.{block}.{name}"
            adapter[f"{prefix}.lora_A.weight"] = torch.randn(rank, fan_in)
            adapter[f"{prefix}.lora_B.weight"] = torch.randn(fan_out, rank)
    params = sum(t.numel() for t in adapter.values())
    path.mkdir(parents=True, exist_ok=True)
    save_file(adapter, str(path / "adapter_model.safetensors"))
    state = {i: {"step": torch.tensor(10.0), "exp_avg": torch.randn_like(t), "exp_avg_sq": torch.rand_like(t)}
             for i, t in enumerate(adapter.values())}  # fmt: skip
    torch.save({"state": state, "param_groups": [{"lr": 2e-4, "params": list(state)}]}, path / "optimizer.pt")
    (path / "trainer_state.json").write_text(json.dumps({"global_step": 10}))
    return params


def sizes_only(path: Path) -> None:
    """The marker as it was before checksums: fsync each file and record its size."""
    files = {}
    for f in sorted(path.rglob("*")):
        if f.is_file() and f.name != "checkpoint_complete.json":
            with f.open("rb") as handle:
                os.fsync(handle.fileno())
            files[str(f.relative_to(path))] = f.stat().st_size
    (path / "checkpoint_complete.json").write_text(json.dumps({"files": files}))


def drop_page_cache(path: Path) -> bool:
    """Evict the files from the page cache (root only), so that verify reads from disk like a fresh resume."""
    try:
        for f in path.rglob("*"):
            if f.is_file():
                fd = os.open(f, os.O_RDONLY)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                os.close(fd)
        return True
    except OSError:
        return False


def hash_speeds(mib: int = 256) -> dict[str, float]:
    """In-memory MB/s of xxh3_128 (used) and sha256 (the alternative), best of 3."""
    import hashlib

    import xxhash

    blob = os.urandom(mib * 2**20)
    out = {}
    for name, fn in (
        ("xxh3_128", lambda: xxhash.xxh3_128(blob).digest()),
        ("sha256", lambda: hashlib.sha256(blob).digest()),
    ):
        best = min(_timed(fn) for _ in range(3))
        out[f"{name}_MB_per_second"] = round(len(blob) / 1e6 / best, 1)
    return out


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    from mistral_tune.train import checkpoints

    parser = argparse.ArgumentParser()
    parser.add_argument("--workdir", default="/tmp/ckpt-checksum-bench")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    path = Path(args.workdir) / "checkpoint-10"
    shutil.rmtree(path, ignore_errors=True)
    params = write_checkpoint(path, args.rank)
    total = sum(f.stat().st_size for f in path.iterdir() if f.is_file())
    times: dict[str, list[float]] = {"sizes": [], "marker": [], "verify_warm": [], "verify_cold": []}
    for _ in range(args.repeat):
        start = time.perf_counter()
        sizes_only(path)
        times["sizes"].append(time.perf_counter() - start)
        start = time.perf_counter()
        checkpoints.write_marker(path, {"step": 10})
        times["marker"].append(time.perf_counter() - start)
        start = time.perf_counter()
        assert checkpoints.completeness_problem(path, verify=True) is None
        times["verify_warm"].append(time.perf_counter() - start)
        cold = drop_page_cache(path)
        start = time.perf_counter()
        assert checkpoints.completeness_problem(path, verify=True) is None
        times["verify_cold" if cold else "verify_warm"].append(time.perf_counter() - start)
    result = {
        "trainable_params": params,
        "checkpoint_bytes": total,
        "repeat": args.repeat,
        **{f"{k}_seconds": round(statistics.median(v), 3) for k, v in times.items() if v},
    }
    result["checksum_overhead_seconds"] = round(result["marker_seconds"] - result["sizes_seconds"], 3)
    result["verify_MB_per_second"] = round(total / 1e6 / max(result["verify_warm_seconds"], 1e-9), 1)
    result.update(hash_speeds())
    print(json.dumps(result, indent=1))
    shutil.rmtree(path, ignore_errors=True)


if __name__ == "__main__":
    main()
