"""Mistral-7B LoRA/QLoRA throughput on one NVIDIA GPU: tokens/s, MFU and peak memory per attention backend.

The Mistral-7B v0.1 architecture with random weights (model.load_weights=false: nothing to
download), bf16, LoRA r=16 on q_proj/v_proj, batch 1 x 2,048 tokens of synthetic data, every
framework step paired with a bare PyTorch step. MFU = model FLOPs / (seconds x dense bf16 peak),
model FLOPs per token = 4 N + attention with N = 7.11e9 matmul weights (mistral_tune/benchmark/flops.py).

Variants: lora_sdpa, lora_flex (flex_attention), lora_fa2 (flash_attention_2, only when flash-attn
is installed), qlora (4-bit NF4 base, gradient checkpointing; target: peak <= 8 GiB).

Command (one H100; each variant ~2-4 minutes, QLoRA the longest since the random base is
saved and re-loaded quantized):
    python bench/gpu_throughput.py --steps 10 --warmup 3 --out bench/results/gpu_h100
    python bench/gpu_throughput.py --only qlora --out bench/results/gpu_h100_qlora
Smoke test of the same code path on a CPU (tiny model, fp32, no MFU):
    python bench/gpu_throughput.py --cpu-smoke --steps 2 --warmup 1 --out /tmp/gpu-smoke
"""

from __future__ import annotations

import importlib.util
import sys

from _common import run

COMMON = [
    "recipe=sft_lora",
    "model=mistral_7b_en",
    "model.load_weights=false",
    "model.dtype=bfloat16",
    "adapter.r=16",
    "adapter.lora_alpha=32",
    "adapter.lora_dropout=0.0",
    "trainer.max_length=2048",
    "bench.synthetic_length=2048",
    "train.per_device_train_batch_size=1",
    "train.bf16=true",
]
VARIANTS = {
    "lora_sdpa": ["model.attn_implementation=sdpa"],
    "lora_flex": ["model.attn_implementation=flex_attention"],
    "lora_fa2": ["model.attn_implementation=flash_attention_2"],
    "qlora": ["adapter.name=qlora", "model.attn_implementation=sdpa", "train.gradient_checkpointing=true"],
}
SMOKE = [
    "recipe=sft_lora",
    "adapter.r=16",
    "bench.synthetic_length=128",
    "train.per_device_train_batch_size=1",
]


def main(argv: list[str]) -> int:
    only = None
    if "--only" in argv:
        i = argv.index("--only")
        only = argv[i + 1].split(",")
        del argv[i : i + 2]
    smoke = "--cpu-smoke" in argv
    if smoke:
        argv.remove("--cpu-smoke")
    else:
        import torch

        if not torch.cuda.is_available():
            print("gpu_throughput.py needs a CUDA GPU (use --cpu-smoke to exercise the code path on a CPU).")
            return 2
    default = ["lora_sdpa", "qlora"] if smoke else list(VARIANTS)  # on a CPU the backends would all be sdpa
    names = [n for n in VARIANTS if (only is None and n in default) or (only is not None and n in only)]
    if "lora_fa2" in names and importlib.util.find_spec("flash_attn") is None and not smoke:
        print("lora_fa2 skipped: flash-attn is not installed (pip install flash-attn --no-build-isolation)")
        names.remove("lora_fa2")
    args = list(SMOKE if smoke else COMMON)
    for name in names:
        overrides = [o for o in VARIANTS[name] if not (smoke and ("flex" in o or "flash" in o or "qlora" in o))]
        args += ["--variant", name, *overrides]
    return run(args, argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
