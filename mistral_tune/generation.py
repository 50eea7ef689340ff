"""Token generation shared by the run's samples, the Python API and the CLI."""

from __future__ import annotations

from typing import Any, Sequence


def encode_prompt(tokenizer: Any, prompt: Any) -> list[int]:
    """A string is plain text (with BOS); a list of messages gets the chat template."""
    if isinstance(prompt, str):
        return tokenizer.encode(prompt)
    return tokenizer.apply_chat_template(list(prompt), add_generation_prompt=True)


def greedy_generate(model: Any, tokenizer: Any, prompts: Sequence[Any], max_new_tokens: int = 32) -> list[str]:
    """Greedy continuations (new text only) for each prompt, one at a time (no padding involved)."""
    import torch

    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    outputs = []
    with torch.no_grad():
        for prompt in prompts:
            ids = torch.tensor([encode_prompt(tokenizer, prompt)], device=device)
            out = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                eos_token_id=tokenizer.eos_id,
                pad_token_id=tokenizer.pad_id,
            )
            outputs.append(tokenizer.decode(out[0, ids.shape[1] :].tolist()))
    model.train(was_training)
    return outputs
