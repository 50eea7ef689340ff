"""``MistralCausalLM.fit`` / ``evaluate``: the CLI's SFT trainer (TRL) on an in-memory model.

The examples are written to a JSONL file and go through the recipe pipeline's own pieces: the
``sft_full`` recipe composed and validated like the CLI's, ``data.sft`` (formats, chat template,
truncation, every dropped row counted) and ``MistralSFTTrainer``. Only the model differs: the one
in memory is trained in place (with its LoRA, when ``enable_lora`` was called, else every weight).
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mistral_tune.core.errors import UserError
from mistral_tune.inference.generation import is_conversation


def example_rows(x: Any) -> list[dict]:
    """JSONL rows for strings (text), conversations (messages) or dict rows (any supported format)."""
    if isinstance(x, str):
        raise UserError("fit()/evaluate() take a collection of examples; wrap a single string in a list.")
    rows = []
    for i, item in enumerate(x):
        if isinstance(item, str):
            rows.append({"text": item})
        elif is_conversation(item):
            rows.append({"messages": list(item)})
        elif isinstance(item, Mapping):
            rows.append(dict(item))
        else:
            raise UserError(f"example {i} is a {type(item).__name__}: use a str, a conversation or a dict row.")
    if not rows:
        raise UserError("fit()/evaluate(): no examples.")
    return rows


def compose_fit_config(data_path: Path, run_dir: Path, *, epochs: float, batch_size: int, max_length: int, overrides):
    """The ``sft_full`` recipe pointed at the examples; the model is the caller's, so ``model`` is unused."""
    from mistral_tune.config.compose import compose

    return compose(
        "sft_full",
        [
            f"data.path={data_path}",
            "data.holdout=0",
            "data.format=auto",
            "export=none",
            f"output_dir={run_dir}",
            f"trainer.max_length={max_length}",
            "train.max_steps=-1",
            f"train.num_train_epochs={epochs}",
            f"train.per_device_train_batch_size={batch_size}",
            "train.save_steps=1000000",  # the model stays in memory; save with save_to_preset
            *overrides,
        ],
    )


def run_trainer(lm: Any, x: Any, *, train: bool, epochs: float, batch_size: int, overrides, output_dir, callbacks):
    from mistral_tune.train.base import get_trainer

    tokenizer = lm._text_tokenizer()
    with tempfile.TemporaryDirectory(prefix="mistral-tune-fit-") as tmp:
        data_path = Path(tmp) / "examples.jsonl"
        with data_path.open("w", encoding="utf-8") as f:
            for row in example_rows(x):
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        run_dir = Path(output_dir) if output_dir else Path(tmp) / "run"
        max_length = lm.preprocessor.sequence_length if lm.preprocessor is not None else 1024
        cfg = compose_fit_config(
            data_path, run_dir, epochs=epochs, batch_size=batch_size, max_length=max_length, overrides=list(overrides)
        )
        method = get_trainer(cfg.trainer.name)
        data = method.prepare_data(cfg, tokenizer)
        if not any(p.requires_grad for p in lm.hf_model.parameters()):
            raise UserError("fit(): no weight is trainable (requires_grad is off everywhere).")
        trainer = method.build_trainer(cfg, lm.hf_model, tokenizer, data, run_dir, list(callbacks))
        if train:
            was_training = lm.hf_model.training
            try:
                trainer.train()
            finally:
                lm.hf_model.train(was_training)
            history = [r for r in trainer.state.log_history if "loss" in r or "train_loss" in r]
            return {
                "loss": [r["loss"] for r in history if "loss" in r],
                "train_loss": next((r["train_loss"] for r in history if "train_loss" in r), None),
                "steps": trainer.state.global_step,
                "examples": len(data.train),
                "tokens_seen": trainer.tokens_seen,
            }
        metrics = trainer.evaluate(eval_dataset=data.train)
        lm.hf_model.eval()
        return {"loss": metrics["eval_loss"], "examples": len(data.train)}
