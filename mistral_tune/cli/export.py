"""``mistral-tune export``: merge an adapter (a run's, or any adapter onto a base) shard by shard and
write verified merged/, preset/ and gguf/ (llama.cpp) directories, or a run's model card.
"""

from __future__ import annotations

import json
import logging
import sys
from typing import Any

from mistral_tune.cli.args import Command, Key, run_help
from mistral_tune.config.registry import DTYPE_CHOICES, GGUF_TYPES
from mistral_tune.export.from_adapter import FORMATS, export_formats, plan

EXPORT = Command(
    "export",
    """\
usage: mistral-tune export run_dir=PATH [formats=[merged,preset,gguf,adapter]] [dtype=auto] [max_shard_size=2GB]
                           [verify=true] [tolerance=X] [gguf_types=[q8_0]] [gguf_tolerance=X]
       mistral-tune export adapter=PATH base=PRESET_OR_DIR out=DIR [formats=[merged]] [dtype=auto] [seed=42] ...""",
    keys=(
        Key("run_dir", help="a finished run; writes RUN/merged, RUN/preset and/or RUN/adapter/README.md (model card)"),
        Key("adapter", help="an adapter directory; base is a preset id (mistral-tune list) or a Hugging Face directory;\n"
            "out is the export directory (with several formats: one subdirectory per format)"),
        Key("base", help="with adapter=: the base model, a preset id or a Hugging Face directory"),
        Key("out", help="with adapter=: the export directory"),
        Key("formats", list, help="[merged,preset,gguf,adapter] (default [merged])", choices=FORMATS),
        Key("gguf_types", list, help="with gguf: the GGUF types, one file each (default [q8_0])",
            choices=GGUF_TYPES),
        Key("gguf_tolerance", float, help="with gguf: the largest top-k log-prob difference llama.cpp may show"),
        Key("dtype", default="auto", help="auto (the base's dtype) | float32 | bfloat16 | float16",
            choices=DTYPE_CHOICES),
        Key("max_shard_size", default="2GB", help="the merged checkpoint's shard size (default 2GB)"),
        Key("verify", bool, True, help="reload the export and compare its logits with the adapter's (default true)"),
        Key("tolerance", float, help="the largest logit difference verification accepts"),
        Key("seed", int, help="the seed a random-init preset (mistral_tiny) was built with; run_dir reads it from the run"),
    ),
)  # fmt: skip


def parse_args(args: list[str]) -> dict[str, Any]:
    """Every export key, typed (lists as [a,b]); one UserError naming every bad argument."""
    return EXPORT.parse(args)


def main(args: list[str]) -> int:
    """Entry point of ``mistral-tune export``; prints the result as JSON."""
    if run_help(EXPORT, args):
        return 0
    opts = parse_args(args)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    results = export_formats(plan(opts), opts)
    json.dump(results, sys.stdout, indent=2)
    print()
    return 0
