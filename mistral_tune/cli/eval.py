"""``mistral-tune eval``: lm-evaluation-harness on a run (its merged model, or base + adapter) or a
Hugging Face model directory; a run gets eval/results.json and an ``eval`` entry in summary.json."""

from __future__ import annotations

import json
import logging
import sys
from typing import Any

from mistral_tune.cli.args import Command, Key, run_help

EVAL = Command(
    "eval",
    """\
usage: mistral-tune eval preset=RUN_OR_DIR tasks=[mistral_tune_mc,mistral_tune_ppl] [limit=N] [batch_size=8]""",
    keys=(
        Key("preset", help="a run directory (its merged/, else base + adapter/ unmerged) or a Hugging Face model directory",
            required="mistral-tune eval needs preset=RUN_OR_DIR."),
        Key("tasks", list, help="our offline tasks (mistral_tune_mc, mistral_tune_ppl) and/or lm-eval task names (need the hub)",
            required="mistral-tune eval needs tasks=[...]."),
        Key("limit", int, help="at most N documents per task (a quick look; scores are then not comparable)"),
        Key("batch_size", int, 8, help="lm-eval's batch size (default 8)"),
    ),
    epilog="""\
Perplexity tasks (rolling log-likelihood) run in their own lm-eval call with add_bos_token=False, the
others with add_bos_token=True; see docs/evaluation.md. Evaluating a GGUF is not supported yet.""",
)  # fmt: skip


def parse_args(args: list[str]) -> dict[str, Any]:
    return EVAL.parse(args)


def main(args: list[str]) -> int:
    """Entry point of ``mistral-tune eval``; prints the summary entry as JSON."""
    if run_help(EVAL, args):
        return 0
    opts = parse_args(args)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from mistral_tune.evaluation.harness import evaluate

    entry = evaluate(opts["preset"], opts["tasks"], limit=opts["limit"], batch_size=opts["batch_size"])
    json.dump(entry, sys.stdout, indent=2)
    print()
    return 0
