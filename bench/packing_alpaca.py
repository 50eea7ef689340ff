"""Effective tokens/s with and without padding-free packing on a real length distribution.

Alpaca (instruction/input/output) has a long-tailed length distribution (on 2,000 examples with
the Mistral template: mean 90 tokens, median 73, p99 297, longest 450), so padded batches carry
a lot of padding. Both variants count only real tokens. The packed variant packs examples into
rows of 512 tokens and takes 2 rows a step, about as many real tokens per step as 8 padded
examples, so the comparison is about padding, not about batch size. Each is run with the default
chunked loss (which already skips padding in the LM head) and with the full-logits loss. Skipped
when the data file is absent.

Command (writes bench/results/packing_alpaca/results.{json,md}):
    python bench/packing_alpaca.py --steps 8 --warmup 2 --repeat 3 --out bench/results/packing_alpaca
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from _common import run

DATA = Path(os.environ.get("ALPACA_JSON", "/work/shared/data/alpaca_5000.json"))

ARGS = [
    "recipe=sft_lora",
    f"data.path={DATA}",
    "data.max_samples=2000",
    "trainer.max_length=512",  # no Alpaca example is longer: nothing is truncated
    "bench.bare=false",
    "--variant", "padded", "train.per_device_train_batch_size=8",
    "--variant", "packed", "trainer.packing=true", "train.per_device_train_batch_size=2",
    # With the full-logits loss the LM head also works on every padding position.
    "--variant", "padded_plain_loss", "trainer.loss=plain", "train.per_device_train_batch_size=8",
    "--variant", "packed_plain_loss", "trainer.loss=plain", "trainer.packing=true", "train.per_device_train_batch_size=2",
]  # fmt: skip

if __name__ == "__main__":
    if not DATA.exists():
        print(f"skipped: {DATA} not found (set ALPACA_JSON=/path/to/alpaca_5000.json)")
        sys.exit(0)
    sys.exit(run(ARGS))
