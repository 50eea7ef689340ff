"""``mistral-tune score``: rewards from a reward model (a reward_lora run's merged/ or adapter) for texts
or a file of chats.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from mistral_tune.cli.args import Command, Key, run_help
from mistral_tune.core.errors import UserError
from mistral_tune.inference.reward_scoring import load_reward_model, rows_to_items, score_chats

SCORE = Command(
    "score",
    "usage: mistral-tune score preset=MODEL [adapter=DIR] (text=TEXT | prompt=TEXT response=TEXT | file=PATH) "
    "[batch_size=8]",
    description="  MODEL: a merged reward model directory (e.g. runs/reward_lora-.../merged), a preset id "
    "or a hub id; adapter: a reward adapter directory trained on that base",
    keys=(
        Key("preset", help="the reward model: a merged directory, a preset id or a hub id",
            required="preset=MODEL is required."),
        Key("adapter", help="a reward adapter directory trained on that base"),
        Key("text", help="a plain text to score (BOS + text)"),
        Key("prompt", help="a user turn; with response=, scored as a chat"),
        Key("response", help="the assistant turn that answers prompt="),
        Key("file", help="a JSON/JSONL file of rows: text, prompt+response, messages, or preference pairs"),
        Key("batch_size", int, 8, help="texts per forward pass (default 8)"),
        Key("seed", int, 42, help="the seed a random-init preset was built with (default 42)"),
    ),
)  # fmt: skip


def parse_args(args: list[str]) -> dict[str, Any]:
    """The ``score`` command's arguments, typed and checked: one UserError naming every bad one."""
    options, problems = SCORE.collect(args)
    given = [k for k in ("text", "prompt", "file") if options[k] is not None]
    if len(given) != 1 or (options["prompt"] is None) != (options["response"] is None):
        problems.append("pass exactly one of text=, prompt= with response=, or file=.")
    if isinstance(options["batch_size"], int) and options["batch_size"] < 1:
        problems.append(f"batch_size={options['batch_size']} must be at least 1.")
    if problems:
        raise SCORE.error(problems)
    return options


def cmd_score(args: list[str]) -> int:
    """``mistral-tune score``: print one JSON line of rewards per text, chat or preference pair."""
    if run_help(SCORE, args):
        return 0
    options = parse_args(args)
    batch_size = options["batch_size"]
    if options["file"] is not None:
        from mistral_tune.data.sources import load_records

        singles, pairs, bad = rows_to_items(load_records(options["file"]))
    elif options["text"] is not None:
        singles, pairs, bad = [options["text"]], [], 0
    else:
        chat = [{"role": "user", "content": options["prompt"]}, {"role": "assistant", "content": options["response"]}]
        singles, pairs, bad = [chat], [], 0
    model, tokenizer = load_reward_model(options["preset"], options["adapter"], options["seed"])
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
