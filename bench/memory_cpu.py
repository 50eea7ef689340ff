"""Peak memory of the loss and gradient-checkpointing options, one fresh process per option.

Synthetic rows of 512 tokens, batch 8 (4,096 tokens a step) on mistral_tiny, where full-vocabulary
logits are large next to the model: 4,096 tokens x 32,000 x 4 bytes = 500 MiB per fp32 copy. The
bare loop is off (bench.bare=false): each process holds one option only, so the sampled RSS peak
of the training steps belongs to it.

Command (writes bench/results/memory_cpu/results.{json,md}):
    python bench/memory_cpu.py --steps 4 --warmup 1 --out bench/results/memory_cpu
"""

from __future__ import annotations

import sys

from _common import run

ARGS = [
    "recipe=sft_lora",
    "bench.synthetic_length=512",
    "trainer.max_length=512",
    "train.per_device_train_batch_size=8",
    "bench.bare=false",
    "--variant", "plain", "trainer.loss=plain",
    "--variant", "chunked", "trainer.loss=chunked",
    "--variant", "plain+checkpointing", "trainer.loss=plain", "train.gradient_checkpointing=true",
    "--variant", "chunked+checkpointing", "trainer.loss=chunked", "train.gradient_checkpointing=true",
]  # fmt: skip

if __name__ == "__main__":
    sys.exit(run(ARGS))
