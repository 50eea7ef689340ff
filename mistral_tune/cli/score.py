"""``mistral-tune score``: rewards from a reward model (a reward_lora run's merged/ or adapter) for texts
or a file of chats.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from mistral_tune.core.errors import UserError
from mistral_tune.inference.reward_scoring import load_reward_model, rows_to_items, score_chats

USAGE = (
    "usage: mistral-tune score preset=MODEL [adapter=DIR] (text=TEXT | prompt=TEXT response=TEXT | file=PATH) "
    "[batch_size=8]\n  MODEL: a merged reward model directory (e.g. runs/reward_lora-.../merged), a preset id "
    "or a hub id; adapter: a reward adapter directory trained on that base"
)

ARGUMENTS = {"preset": str, "adapter": str, "text": str, "prompt": str, "response": str, "file": str,
             "batch_size": int, "seed": int}  # fmt: skip


def parse_args(args: list[str]) -> dict[str, Any]:
    """The ``score`` command's key=value arguments, typed and checked (the ``generate`` command's parser)."""
    from mistral_tune.cli.args import parse_args as parse_key_values

    if not any(arg.partition("=")[0] == "preset" for arg in args):
        raise UserError(f"score: preset=MODEL is required.\n{USAGE}")
    try:
        options = parse_key_values(args, ARGUMENTS)
    except UserError as exc:
        raise UserError(f"score: {exc}\n{USAGE}") from None
    given = [k for k in ("text", "file") if k in options] + (["prompt"] if "prompt" in options else [])
    if len(given) != 1 or ("prompt" in options) != ("response" in options):
        raise UserError(f"score: pass exactly one of text=, prompt= with response=, or file=.\n{USAGE}")
    if options.setdefault("batch_size", 8) < 1:
        raise UserError(f"score: batch_size={options['batch_size']} must be at least 1.")
    return options


def cmd_score(args: list[str]) -> int:
    """``mistral-tune score``: print one JSON line of rewards per text, chat or preference pair."""
    if not args or args[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    options = parse_args(args)
    batch_size = options["batch_size"]
    if "file" in options:
        from mistral_tune.data.sources import load_records

        singles, pairs, bad = rows_to_items(load_records(options["file"]))
    elif "text" in options:
        singles, pairs, bad = [options["text"]], [], 0
    else:
        chat = [{"role": "user", "content": options["prompt"]}, {"role": "assistant", "content": options["response"]}]
        singles, pairs, bad = [chat], [], 0
    model, tokenizer = load_reward_model(options["preset"], options.get("adapter"), options.get("seed", 42))
    try:
        if singles:
            for item, reward in zip(singles, score_chats(model, tokenizer, singles, batch_size)):
                key = "text" if isinstance(item, str) else "messages"
                print(json.dumps({key: item, "reward": round(reward, 6)}, ensure_ascii=False))
        if pairs:
            chats = [[*p.prompt, {"role": "assistant", "content": a}] for p in pairs for a in (p.chosen, p.rejected)]
            rewards = score_chats(model, tokenizer, chats, batch_size)
            for p, c, r in zip(pairs, rewards[0::2], rewards[1::2]):
                record = {"prompt": p.prompt, "chosen_reward": round(c, 6), "rejected_reward": round(r, 6)}
                print(json.dumps(record, ensure_ascii=False))
            right = sum(c > r for c, r in zip(rewards[0::2], rewards[1::2]))
            print(
                f"accuracy: {right / len(pairs):.4f} ({right} of {len(pairs)} pairs; {bad} unusable)", file=sys.stderr
            )
    except ValueError as exc:  # the chat template refuses bad roles or empty turns
        raise UserError(f"score: {exc}") from exc
    return 0
