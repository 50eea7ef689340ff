"""DPO and reward against SFT, real tokens/s on the same data lengths, in one interleaved run (CPU).

SFT trains on real Alpaca rows (``/work/shared/data/alpaca_5000.json``, first 2,000). The preference runs train on
pairs built from the same 2,000 rows: prompt = instruction (+ input), chosen = the row's own output, rejected = the
output of another row drawn with a fixed seed. So a DPO chosen sequence is exactly an SFT example, and its rejected
sequence has the same length distribution. Every variant: mistral_tiny, LoRA r=8 on q/v, batch 8 (8 SFT examples,
8 pairs = 16 sequences for DPO and reward), max_length 512 (no Alpaca example is longer), fp32. tokens/s counts the
real (non-padding) tokens of every sequence the step trains on. Variants, interleaved:

- sft_lora:           the SFT recipe (chunked loss on the answer tokens)
- dpo_lora:           the DPO recipe (completion-token log-probs, mistral_tune.train.lm_head_loss.token_logprobs)
- dpo_lora_trl_head:  the same with TRL 1.16's own fused LM head (every position, full vocabulary): the code before
- reward_lora:        the reward recipe (sequence classification, pairwise loss)

Each framework step is paired with a bare PyTorch step on the same batches (SFT: the model's loss; DPO: the sigmoid
DPO loss by hand from full logits, policy and reference; reward: the pairwise loss). The worker also records the
minor page faults and system CPU seconds of each side.

Command (writes bench/results/dpo_speed/results.{json,md}; the pairs go to a temporary file):
    python bench/dpo_speed.py --steps 4 --warmup 1 --repeat 2 --out bench/results/dpo_speed
"""

from __future__ import annotations

import json
import os
import random
import sys
import tempfile
from pathlib import Path

from _common import run

DATA = Path(os.environ.get("ALPACA_JSON", "/work/shared/data/alpaca_5000.json"))
ROWS = 2000


def alpaca_pairs(source: Path, rows: int = ROWS, seed: int = 0) -> Path:
    """prompt/chosen/rejected pairs from Alpaca rows (rejected: another row's output), in a temporary file."""
    data = json.loads(source.read_text(encoding="utf-8"))
    rng = random.Random(seed)
    out = Path(tempfile.gettempdir()) / "mistral-tune-bench" / f"alpaca_pairs_{rows}_{seed}.jsonl"
    out.parent.mkdir(parents=True, exist_ok=True)
    lines = []
    for row in data[:rows]:
        prompt = row["instruction"] + (f"\n\n{row['input']}" if row.get("input") else "")
        other = data[rng.randrange(len(data))]["output"]
        while other == row["output"]:
            other = data[rng.randrange(len(data))]["output"]
        lines.append(json.dumps({"prompt": prompt, "chosen": row["output"], "rejected": other}))
    out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return out


def args_for(pairs: Path) -> list[str]:
    return [
        "recipe=sft_lora",
        f"data.max_samples={ROWS}",
        "trainer.max_length=512",  # no Alpaca example is longer: nothing is truncated
        "train.per_device_train_batch_size=8",
        "--variant", "sft_lora", f"data.path={DATA}",
        "--variant", "dpo_lora", "bench.recipe=dpo_lora", f"data.path={pairs}",
        "--variant", "dpo_lora_trl_head", "bench.recipe=dpo_lora", f"data.path={pairs}", "bench.trainer=trl",
        "--variant", "reward_lora", "bench.recipe=reward_lora", f"data.path={pairs}",
    ]  # fmt: skip


if __name__ == "__main__":
    if not DATA.exists():
        print(f"skipped: {DATA} not found (set ALPACA_JSON=/path/to/alpaca_5000.json)")
        sys.exit(0)
    sys.exit(run(args_for(alpaca_pairs(DATA))))
