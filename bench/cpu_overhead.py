"""Step overhead on CPU: mistral-tune's SFT step against a bare PyTorch loop, next to TRL's stock SFTTrainer.

Every framework step is followed by a bare step (forward, backward, optimizer step) on the same
model and the same batches, so both see the same machine load; the ratio is the median of the
per-step ratios. Variants:

- mistral_tune:        the recipe as users run it (trainer.loss=auto: chunked cross-entropy on CPU)
- mistral_tune_plain:  the same with the model's own full-logits loss (trainer.loss=plain)
- trl_stock:           TRL 1.16's SFTTrainer with its own compute_loss (chunked log-prob/entropy head)

Command (about 4 minutes on 2 idle cores; writes bench/results/cpu_overhead/results.{json,md}):
    python bench/cpu_overhead.py --steps 10 --warmup 3 --out bench/results/cpu_overhead
"""

from __future__ import annotations

import sys

from _common import run

ARGS = [
    "recipe=sft_lora",
    "train.logging_steps=1",  # log every step: the overhead a user watching the loss pays
    "--variant", "mistral_tune",
    "--variant", "mistral_tune_plain", "trainer.loss=plain",
    "--variant", "trl_stock", "bench.trainer=trl",
]  # fmt: skip

if __name__ == "__main__":
    sys.exit(run(ARGS))
