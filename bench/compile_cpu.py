"""torch.compile on CPU: step time once compiled, and what the compiling costs.

The bare loop always runs the model eagerly (for the compiled variant, the module inside the
compiled wrapper), so in the compiled variant framework/bare compares compiled steps with eager
steps taken right after them, under the same load. The warm-up steps include the compilation
(``warmup_seconds`` in the results): weigh it against the per-step saving before turning it on.

Command (writes bench/results/compile_cpu/results.{json,md}):
    python bench/compile_cpu.py --steps 8 --warmup 3 --repeat 2 --out bench/results/compile_cpu
"""

from __future__ import annotations

import sys

from _common import run

ARGS = [
    "recipe=sft_lora",
    "--variant", "eager",
    "--variant", "compiled", "train.torch_compile=true",
]  # fmt: skip

if __name__ == "__main__":
    sys.exit(run(ARGS))
