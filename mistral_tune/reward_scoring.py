"""Scores from a trained reward model, and the ``mistral-tune score`` command that prints them.

``mistral-tune score preset=runs/reward/merged text="..."`` scores one plain text;
``prompt=... response=...`` scores a one-turn chat in the training chat template (what the reward model
was trained on); ``file=pairs.jsonl`` scores every row: ``text``, ``prompt``+``response`` or ``messages``
rows one line each, and preference pairs (any ``data.format``) as chosen/rejected with the accuracy.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from typing import Any

from .errors import UserError

USAGE = (
    "usage: mistral-tune score preset=MODEL [adapter=DIR] (text=TEXT | prompt=TEXT response=TEXT | file=PATH) "
    "[batch_size=8]\n  MODEL: a merged reward model directory (e.g. runs/reward_lora-.../merged), a preset id "
    "or a hub id; adapter: a reward adapter directory trained on that base"
)


def score_ids(model: Any, sequences: Sequence[Sequence[int]], pad_id: int, batch_size: int = 8) -> list[float]:
    """One reward per token sequence (right-padded batches; the model reads the last real token)."""
    import torch

    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    rewards: list[float] = []
    try:
        with torch.no_grad():
            for start in range(0, len(sequences), batch_size):
                batch = [list(s) for s in sequences[start : start + batch_size]]
                width = max(len(s) for s in batch)
                ids = torch.tensor([s + [pad_id] * (width - len(s)) for s in batch], device=device)
                mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in batch], device=device)
                rewards += model(input_ids=ids, attention_mask=mask).logits.float().squeeze(-1).tolist()
    finally:
        model.train(was_training)
    return rewards


def score_chats(model: Any, tokenizer: Any, chats: Sequence[Any], batch_size: int = 8) -> list[float]:
    """Rewards for conversations (message lists, in the chat template) or plain strings (BOS + text)."""
    sequences = [
        tokenizer.encode(c)
        if isinstance(c, str)
        else tokenizer.apply_chat_template(list(c), add_generation_prompt=False)
        for c in chats
    ]
    return score_ids(model, sequences, tokenizer.pad_id, batch_size)


def load_reward_model(preset: str, adapter: str | None = None, seed: int = 42):
    """(model, tokenizer) for scoring: a merged reward model, or a base plus a reward adapter."""
    import logging

    from . import models
    from .config import ModelConfig

    builtin = preset in models.PRESETS  # anything else is a path or hub id, like model.path in a recipe
    model_cfg = ModelConfig(name=preset if builtin else "custom", path=None if builtin else preset)
    source = models.download_source(models.resolve_source(model_cfg.name, model_cfg.path), model_cfg)
    tokenizer = models.load_tokenizer(source)
    model = models.load_model(model_cfg, source, seed=seed, task="SEQ_CLS")
    model.config.pad_token_id = tokenizer.pad_id
    if adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter)
    elif "ForSequenceClassification" not in " ".join(_architectures(source)):
        logging.getLogger(__name__).warning(
            "%s is not a trained reward model: its score head is freshly initialized, so the scores are noise. "
            "Pass the merged/ directory of a reward run, or adapter=DIR.",
            source.label,
        )
    return model, tokenizer


def _architectures(source: Any) -> list[str]:
    if source.local_dir is None or not (source.local_dir / "config.json").is_file():
        return []
    return json.loads((source.local_dir / "config.json").read_text(encoding="utf-8")).get("architectures") or []


ARGUMENTS = {"preset": str, "adapter": str, "text": str, "prompt": str, "response": str, "file": str,
             "batch_size": int, "seed": int}  # fmt: skip


def parse_args(args: list[str]) -> dict[str, Any]:
    """The ``score`` command's key=value arguments, typed and checked (the ``generate`` command's parser)."""
    from .generate_cli import parse_args as parse_key_values

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


def rows_to_items(rows: list[dict[str, Any]]):
    """Split rows into single chats to score and preference pairs to compare."""
    from .preference_data import BadPair, detect_preference_format, to_pair

    if rows and {"chosen", "rejected"} <= set(rows[0]):
        fmt = detect_preference_format(rows)
        pairs, bad = [], 0
        for row in rows:
            try:
                pairs.append(to_pair(row, fmt))
            except BadPair:
                bad += 1
        if not pairs:
            raise UserError(f"score: none of the {len(rows)} preference rows is a usable pair ({fmt} format).")
        return [], pairs, bad
    singles = []
    for i, row in enumerate(rows):
        if isinstance(row.get("text"), str):
            singles.append(row["text"])
        elif isinstance(row.get("prompt"), str) and isinstance(row.get("response"), str):
            singles.append(
                [{"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": row["response"]}]
            )
        elif isinstance(row.get("messages"), list):
            singles.append(row["messages"])
        else:
            raise UserError(
                f"score: row {i + 1} has none of 'text', 'prompt'+'response', 'messages', 'chosen'+'rejected'."
            )
    return singles, [], 0


def cmd_score(args: list[str]) -> int:
    """``mistral-tune score``: print one JSON line of rewards per text, chat or preference pair."""
    if not args or args[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    options = parse_args(args)
    batch_size = options["batch_size"]
    if "file" in options:
        from .data import load_records

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
