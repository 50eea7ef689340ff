"""7B-scale streamed merge on a CPU machine: random Mistral 7B base on disk in bf16, LoRA adapter, merge.

Three steps, each meant to run in its own process under ``/usr/bin/time -v`` (peak RSS, wall time):

    D=/tmp/merge7b
    /usr/bin/time -v python bench/merge_7b.py base    --workdir $D   # 14.5 GB of bf16 safetensors, streamed
    /usr/bin/time -v python bench/merge_7b.py adapter --workdir $D   # LoRA r=16 on every linear layer
    /usr/bin/time -v python -m mistral_tune export adapter=$D/adapter base=$D/base out=$D/merged \
        dtype=bfloat16 verify=false                                      # the streamed merge itself
    python bench/merge_7b.py check   --workdir $D   # spot-check merged tensors against W + s*B@A

``base`` writes what ``load_model(model=mistral_7b_en, load_weights=false)`` + ``save_pretrained``
would (same tensors, bit for bit: models/random_init.py), but tensor by tensor, so it never holds
the model. ``--shard-size 10GB`` matches the hub's Mistral-7B-v0.1 layout (a 9.9 GB and a 4.5 GB
shard). bench/run_7b_memory.sh runs all of it and records the /usr/bin/time lines.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def write_base(workdir: Path, shard_size: str) -> None:
    import torch

    from mistral_tune.models.loading import preset_config
    from mistral_tune.models.presets import PRESETS
    from mistral_tune.models.random_init import save_random_checkpoint

    start = time.perf_counter()
    shards = save_random_checkpoint(
        preset_config(PRESETS["mistral_7b_en"]),
        workdir / "base",
        seed=0,
        dtype=torch.bfloat16,
        max_shard_size=shard_size,
    )
    size = sum(p.stat().st_size for p in (workdir / "base").glob("*.safetensors"))
    print(
        json.dumps({"step": "base", "shards": shards, "bytes": size, "seconds": round(time.perf_counter() - start, 1)})
    )


def write_adapter(workdir: Path, rank: int) -> None:
    """A PEFT-layout LoRA adapter (non-zero B, so every delta is real) for every linear layer of 7B."""
    import torch
    from peft import LoraConfig
    from safetensors.torch import save_file

    from mistral_tune.models.loading import preset_config
    from mistral_tune.models.presets import PRESETS

    c = preset_config(PRESETS["mistral_7b_en"])
    h, kv = c.hidden_size, c.num_key_value_heads * (c.hidden_size // c.num_attention_heads)
    shapes = {
        "q_proj": (h, h),
        "k_proj": (kv, h),
        "v_proj": (kv, h),
        "o_proj": (h, h),
        "gate_proj": (c.intermediate_size, h),
        "up_proj": (c.intermediate_size, h),
        "down_proj": (h, c.intermediate_size),
    }
    g = torch.Generator().manual_seed(1)
    tensors = {}
    for layer in range(c.num_hidden_layers):
        for m in MODULES:
            part = "self_attn" if m in MODULES[:4] else "mlp"
            out_f, in_f = shapes[m]
            key = f"base_model.model.model.layers.{layer}.{part}.{m}"
            tensors[f"{key}.lora_A.weight"] = (torch.randn(rank, in_f, generator=g) * 0.01).to(torch.bfloat16)
            tensors[f"{key}.lora_B.weight"] = (torch.randn(out_f, rank, generator=g) * 0.01).to(torch.bfloat16)
    out = workdir / "adapter"
    LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=list(MODULES), task_type="CAUSAL_LM").save_pretrained(out)
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    print(
        json.dumps({"step": "adapter", "tensors": len(tensors), "parameters": sum(t.numel() for t in tensors.values())})
    )


def check(workdir: Path) -> None:
    """A few merged tensors against W + (alpha/r) * B @ A computed here from base and adapter."""
    import torch
    from safetensors import safe_open

    from mistral_tune.export.stream_merge import base_shards

    def find(directory: Path, name: str):
        shards = [directory / "adapter_model.safetensors"] if directory.name == "adapter" else base_shards(directory)
        for shard in shards:
            with safe_open(str(shard), framework="pt") as f:
                if name in f.keys():
                    return f.get_tensor(name)
        raise KeyError(name)

    cfg = json.loads((workdir / "adapter" / "adapter_config.json").read_text())
    scale = cfg["lora_alpha"] / cfg["r"]
    worst = 0.0
    for name in (
        "model.layers.0.self_attn.q_proj",
        "model.layers.31.mlp.down_proj",
        "model.layers.17.self_attn.v_proj",
    ):
        w = find(workdir / "base", f"{name}.weight").float()
        a = find(workdir / "adapter", f"base_model.model.{name}.lora_A.weight").float()
        b = find(workdir / "adapter", f"base_model.model.{name}.lora_B.weight").float()
        expected = (w + (b @ a) * scale).to(torch.bfloat16)
        got = find(workdir / "merged", f"{name}.weight")
        worst = max(worst, (got.float() - expected.float()).abs().max().item())
    untouched = torch.equal(find(workdir / "base", "lm_head.weight"), find(workdir / "merged", "lm_head.weight"))
    print(json.dumps({"step": "check", "max_abs_diff": worst, "lm_head_unchanged": untouched}))
    assert worst == 0.0 and untouched


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("step", choices=["base", "adapter", "check"])
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--shard-size", default="10GB")
    parser.add_argument("--rank", type=int, default=16)
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    {"base": lambda: write_base(args.workdir, args.shard_size), "adapter": lambda: write_adapter(args.workdir, args.rank),
     "check": lambda: check(args.workdir)}[args.step]()  # fmt: skip


if __name__ == "__main__":
    main()
