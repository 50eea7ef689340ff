"""``mistral-tune export``: merge an adapter (a run's, or any adapter onto a base) shard by shard and
write verified merged/ and preset/ directories, or a run's model card.
"""

from __future__ import annotations

import json
import logging
import sys
from typing import Any

from mistral_tune.core.errors import UserError
from mistral_tune.export.from_adapter import FORMATS, export_formats, plan

log = logging.getLogger(__name__)


USAGE = """\
usage: mistral-tune export run_dir=PATH [formats=[merged,preset,adapter]] [dtype=auto] [max_shard_size=2GB]
                           [verify=true] [tolerance=X]
       mistral-tune export adapter=PATH base=PRESET_OR_DIR out=DIR [formats=[merged]] [dtype=auto] [seed=42] ...

run_dir  a finished run; writes RUN/merged, RUN/preset and/or RUN/adapter/README.md (model card)
adapter  an adapter directory; base is a preset id (mistral-tune list) or a Hugging Face directory;
         out is the export directory (with several formats: one subdirectory per format)
dtype    auto (the base's dtype) | float32 | bfloat16 | float16
seed     the seed a random-init preset (mistral_tiny) was built with; run_dir reads it from the run
"""

KEYS = ("run_dir", "adapter", "base", "out", "formats", "dtype", "max_shard_size", "verify", "tolerance", "seed")


def parse_args(args: list[str]) -> dict[str, Any]:
    """key=value arguments; lists as [a,b]; one UserError naming every bad argument."""
    opts: dict[str, Any] = {"formats": None, "dtype": "auto", "max_shard_size": "2GB", "verify": "true"}
    bad = []
    for arg in args:
        key, sep, value = arg.partition("=")
        if not sep or key not in KEYS:
            bad.append(arg)
            continue
        opts[key] = value
    if bad:
        raise UserError(f"mistral-tune export: unknown argument(s) {', '.join(bad)}. Keys: {', '.join(KEYS)}.")
    if opts["formats"] is not None:
        opts["formats"] = [f.strip() for f in opts["formats"].strip("[]").split(",") if f.strip()]
        unknown = [f for f in opts["formats"] if f not in FORMATS]
        if unknown:
            raise UserError(f"formats: {', '.join(unknown)} not one of {', '.join(FORMATS)}.")
    from mistral_tune.config.registry import DTYPE_CHOICES

    if opts["dtype"] not in DTYPE_CHOICES:
        raise UserError(f"dtype={opts['dtype']} is not one of {', '.join(DTYPE_CHOICES)}.")
    opts["verify"] = str(opts["verify"]).lower() in ("true", "1", "yes")
    try:
        opts["tolerance"] = float(opts["tolerance"]) if opts.get("tolerance") else None
        opts["seed"] = int(opts["seed"]) if opts.get("seed") else None
    except ValueError as exc:
        raise UserError(f"mistral-tune export: tolerance= takes a number and seed= an integer ({exc}).") from None
    return opts


def main(args: list[str]) -> int:
    """Entry point of ``mistral-tune export``; prints the result as JSON."""
    if not args or args[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0
    opts = parse_args(args)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    results = export_formats(plan(opts), opts)
    json.dump(results, sys.stdout, indent=2)
    print()
    return 0
