"""Peak memory and time of the streamed GGUF writer on a 7B-shaped random Mistral.

Writes a random bf16 checkpoint with the mistral_7b_en preset's exact shapes (32 layers by default)
straight to safetensors shards, one tensor at a time (no model is ever built in memory), then writes
the GGUF in a fresh process while sampling /proc/self/status every 5 ms:

    nice -n 19 PYTHONPATH=. python bench/gguf_memory.py --type q8_0 --workdir /tmp/gguf-bench

Needs ~14.5 GB of disk for the checkpoint plus the GGUF (q8_0 7.7 GB, f16 14.5 GB); ``--keep`` keeps
them, otherwise both are deleted at the end. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from merge_memory import PeakSampler, mib  # noqa: E402


def build(workdir: Path, layers: int, shard_bytes: int) -> dict:
    """config.json and random bf16 shards of a 7B-shaped Mistral, written tensor by tensor."""
    import torch
    from safetensors.torch import save_file

    from mistral_tune.models.loading import mistral_config
    from mistral_tune.models.presets import PRESETS

    config = mistral_config(PRESETS["mistral_7b_en"], num_hidden_layers=layers)
    config.dtype = torch.bfloat16
    base = workdir / "base"
    base.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(base)
    h, m, v = config.hidden_size, config.intermediate_size, config.vocab_size
    kv = config.num_key_value_heads * (h // config.num_attention_heads)
    shapes = {"model.embed_tokens.weight": (v, h)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes.update({
            p + "self_attn.q_proj.weight": (h, h), p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, h),
            p + "mlp.gate_proj.weight": (m, h), p + "mlp.up_proj.weight": (m, h), p + "mlp.down_proj.weight": (h, m),
            p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
        })  # fmt: skip
    shapes.update({"model.norm.weight": (h,), "lm_head.weight": (v, h)})
    generator = torch.Generator().manual_seed(0)
    shard, size, index, n_params, n_shards = {}, 0, {}, 0, 0

    def flush() -> None:
        nonlocal shard, size, n_shards
        if shard:
            n_shards += 1
            name = f"model-{n_shards:05d}.safetensors"
            save_file(shard, str(base / name), metadata={"format": "pt"})
            index.update(dict.fromkeys(shard, name))
            shard, size = {}, 0

    for name, shape in shapes.items():
        t = torch.randn(shape, generator=generator, dtype=torch.float32).mul_(0.02).to(torch.bfloat16)
        if len(shape) == 1:
            t = torch.ones(shape, dtype=torch.bfloat16)
        if size + t.numel() * 2 > shard_bytes:
            flush()
        shard[name], size, n_params = t, size + t.numel() * 2, n_params + t.numel()
    flush()
    (base / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": index}))
    return {"parameters": n_params, "layers": layers, "shards": n_shards}


def measure(workdir: Path, gguf_type: str) -> dict:
    """Write the GGUF in this (fresh) process; baseline = after imports, before any weight is read."""
    import gguf  # noqa: F401
    import safetensors  # noqa: F401
    import torch  # noqa: F401

    from mistral_tune.export.gguf_file import write_gguf
    from mistral_tune.models.tokenizer import MistralTokenizer

    tokenizer = MistralTokenizer.from_version("v1")
    with PeakSampler() as sampler:
        baseline = sampler.sample()
        start = time.perf_counter()
        info = write_gguf(workdir / "base", workdir / f"bench-{gguf_type}.gguf", tokenizer, gguf_type, name="bench")
        seconds = time.perf_counter() - start
    return {"seconds": round(seconds, 1), "baseline": baseline, "peak": sampler.peak, "bytes": info["bytes"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=32, help="decoder layers of 7B shape (32 = the real 7B)")
    parser.add_argument("--type", default="q8_0", help="GGUF type (f32, f16, bf16, q8_0, q4_0)")
    parser.add_argument("--shard-mb", type=int, default=2000, help="checkpoint shard size in MB")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/gguf-bench"))
    parser.add_argument("--keep", action="store_true", help="keep the checkpoint and the GGUF")
    parser.add_argument("--measure", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.workdir, args.type)))
        return
    try:
        start = time.perf_counter()
        built = build(args.workdir, args.layers, args.shard_mb * 1_000_000)
        built["build_seconds"] = round(time.perf_counter() - start, 1)
        cmd = [sys.executable, __file__, "--measure", "--type", args.type, "--workdir", str(args.workdir)]
        env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
        run = json.loads(subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout)
        result = {
            **built,
            "type": args.type,
            "gguf_bytes": run["bytes"],
            "seconds": run["seconds"],
            "baseline_rss_mib": mib(run["baseline"]["VmRSS"]),
            "peak_rss_mib": mib(run["peak"]["VmRSS"]),
            "peak_anon_mib": mib(run["peak"]["RssAnon"]),
            "peak_anon_above_baseline_mib": mib(run["peak"]["RssAnon"] - run["baseline"]["RssAnon"]),
        }
        print(json.dumps(result, indent=2))
    finally:
        if not args.keep:
            shutil.rmtree(args.workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
