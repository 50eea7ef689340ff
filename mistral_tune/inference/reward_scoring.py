"""Scores from a trained reward model, and the ``mistral-tune score`` command that prints them.

``mistral-tune score preset=runs/reward/merged text="..."`` scores one plain text;
``prompt=... response=...`` scores a one-turn chat in the training chat template (what the reward model
was trained on); ``file=pairs.jsonl`` scores every row: ``text``, ``prompt``+``response`` or ``messages``
rows one line each, and preference pairs (any ``data.format``) as chosen/rejected with the accuracy.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from mistral_tune.core.errors import UserError


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
    """(model, tokenizer) for scoring: a merged reward model, or a base plus a reward adapter.

    Anything else (a causal LM such as a DPO or SFT export) is refused with a ``UserError``."""
    import mistral_tune.models.loading as models
    from mistral_tune.config.schema import ModelConfig
    from mistral_tune.models.presets import PRESETS
    from mistral_tune.models.sources import download_source, resolve_source
    from mistral_tune.models.tokenizer import load_tokenizer

    builtin = preset in PRESETS  # anything else is a path or hub id, like model.path in a recipe
    model_cfg = ModelConfig(name=preset if builtin else "custom", path=None if builtin else preset)
    source = download_source(resolve_source(model_cfg.name, model_cfg.path), model_cfg)
    architectures = _architectures(source)
    if not adapter and not any("ForSequenceClassification" in a for a in architectures):
        # Refused before loading: a causal LM (a DPO or SFT export, a base preset) has no trained score head.
        kind = ", ".join(architectures) or "a built-in base preset"
        raise UserError(
            f"{source.label} is not a reward model ({kind}): `mistral-tune score` reads the score head a "
            "reward_lora run trains, and a new one would give noise. Pass a reward run's merged/ directory, or "
            "preset=BASE adapter=runs/<reward run>/adapter. To compare answers with a DPO or SFT model, use their "
            "log-likelihoods: MistralCausalLM.score (docs/models.md)."
        )
    tokenizer = load_tokenizer(source)
    model = models.load_model(model_cfg, source, seed=seed, task="SEQ_CLS")
    model.config.pad_token_id = tokenizer.pad_id
    if adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter)
    return model, tokenizer


def _architectures(source: Any) -> list[str]:
    if source.local_dir is None or not (source.local_dir / "config.json").is_file():
        return []
    return json.loads((source.local_dir / "config.json").read_text(encoding="utf-8")).get("architectures") or []


def rows_to_items(rows: list[dict[str, Any]]):
    """Split rows into single chats to score and preference pairs to compare."""
    from mistral_tune.data.preference import BadPair, detect_preference_format, to_pair

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
