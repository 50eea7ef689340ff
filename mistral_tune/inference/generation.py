"""Token generation shared by the run's samples, the Python API and the CLI."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any, Optional, Sequence

from mistral_tune.core.errors import UserError


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
    try:
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
    finally:
        model.train(was_training)
    return outputs


def is_conversation(value: Any) -> bool:
    """A conversation is a non-empty list of message dicts (``{"role": ..., "content": ...}``)."""
    return isinstance(value, (list, tuple)) and bool(value) and all(isinstance(m, Mapping) for m in value)


def normalize_inputs(inputs: Any) -> tuple[list[Any], bool]:
    """(list of prompts, whether a single prompt was given): str, conversation, or a list of either."""
    if isinstance(inputs, str) or is_conversation(inputs):
        return [inputs], True
    if isinstance(inputs, (list, tuple)) and inputs and all(isinstance(p, str) or is_conversation(p) for p in inputs):
        return list(inputs), False
    if type(inputs).__module__.startswith("tensorflow"):
        raise UserError(
            "generate() does not take a tf.data.Dataset: mistral-tune runs on PyTorch without TensorFlow. Pass "
            "the strings as a list (e.g. [x.decode() for x in ds.as_numpy_iterator()])."
        )
    raise UserError(
        "generate() takes a string, a conversation (a list of {'role', 'content'} dicts), a non-empty list "
        f"of those, or a dict of token ids ({{'token_ids', 'padding_mask'}}); got {type(inputs).__name__}."
    )


def is_token_dict(inputs: Any) -> bool:
    """keras-hub's preprocessed input: ``{"token_ids": [batch, seq], "padding_mask": [batch, seq]}``."""
    return isinstance(inputs, Mapping) and "token_ids" in inputs


def generate_token_dict(
    model: Any,
    tokenizer: Any,
    inputs: Mapping,
    *,
    sampler: Any,
    stop_ids: Optional[tuple[int, ...]],
    strip_prompt: bool,
) -> dict[str, Any]:
    """keras-hub's ``generate`` on token ids: each row's prompt (its ``padding_mask``, right-padded)
    is continued up to the width of ``token_ids``. Returns the same dict shape: ``padding_mask`` is
    true on the prompt and the new tokens up to and including a stop id; with ``strip_prompt`` the
    new tokens are moved to the front and only they are marked."""
    import torch

    ids = torch.as_tensor(inputs["token_ids"]).long()
    single = ids.dim() == 1
    ids = ids[None] if single else ids
    mask = inputs.get("padding_mask")
    mask = torch.ones_like(ids, dtype=torch.bool) if mask is None else torch.as_tensor(mask).bool()
    mask = mask[None] if mask.dim() == 1 else mask
    width = ids.shape[1]
    prompts = [row[m].tolist() for row, m in zip(ids, mask)]
    new = generate_ids(model, tokenizer, prompts, sampler=sampler, max_length=width, stop_ids=stop_ids)
    if len(new) != len(prompts):
        raise UserError("generate() on token ids returns one sequence per row; use a sampler without several beams.")
    out_ids = torch.full_like(ids, tokenizer.pad_id)
    out_mask = torch.zeros_like(mask)
    for i, (prompt, gen) in enumerate(zip(prompts, new)):
        row = gen if strip_prompt else prompt + gen
        out_ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        out_mask[i, : len(row)] = True  # past a stop: padding (keras-hub leaves masked-out tokens there)
    result = {"token_ids": out_ids, "padding_mask": out_mask}
    return {k: v[0] for k, v in result.items()} if single else result


def encode_inputs(tokenizer: Any, prompts: Sequence[Any]) -> list[list[int]]:
    """Token ids per prompt; conversations go through the tokenizer's one chat-template definition."""
    out = []
    for prompt in prompts:
        try:
            out.append(encode_prompt(tokenizer, prompt))
        except ValueError as exc:  # the template's own validation (roles, empty turns)
            raise UserError(f"Invalid conversation: {exc}.") from exc
    return out


def left_pad(sequences: Sequence[Sequence[int]], pad_id: int, device: Any = None):
    """(input_ids, attention_mask) with padding on the left, so every prompt ends where generation starts."""
    import torch

    width = max(len(s) for s in sequences)
    ids = [[pad_id] * (width - len(s)) + list(s) for s in sequences]
    mask = [[0] * (width - len(s)) + [1] * len(s) for s in sequences]
    return torch.tensor(ids, device=device), torch.tensor(mask, device=device)


def positions_from_mask(attention_mask: Any):
    """Position ids that skip left padding: a padded prompt gets the positions it has alone."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def resolve_stop_ids(stop_token_ids: Any, tokenizer: Any) -> Optional[tuple[int, ...]]:
    """Stop ids: "auto" -> (EOS,), None -> no stopping, an int or a sequence of ints -> those ids."""
    if stop_token_ids is None:
        return None
    if isinstance(stop_token_ids, str):
        if stop_token_ids != "auto":
            raise UserError(f"stop_token_ids must be 'auto', None or token ids; got {stop_token_ids!r}.")
        return (tokenizer.eos_id,)
    ids = (stop_token_ids,) if isinstance(stop_token_ids, int) else tuple(stop_token_ids)
    if not ids or not all(isinstance(i, int) and 0 <= i < tokenizer.vocabulary_size for i in ids):
        raise UserError(f"stop_token_ids must be ids in [0, {tokenizer.vocabulary_size}); got {stop_token_ids!r}.")
    return ids


@contextlib.contextmanager
def _clean_generation_config(model: Any, tokenizer: Any) -> Iterator[None]:
    """Only our arguments steer generate(): a model's saved defaults (top_k=50, eos, ...) are set aside."""
    from transformers import GenerationConfig

    saved = model.generation_config
    model.generation_config = GenerationConfig(bos_token_id=tokenizer.bos_id, pad_token_id=tokenizer.pad_id)
    try:
        yield
    finally:
        model.generation_config = saved


def generate_ids(
    model: Any,
    tokenizer: Any,
    prompt_ids: Sequence[Sequence[int]],
    *,
    sampler: Any,
    max_length: int,
    stop_ids: Optional[tuple[int, ...]],
) -> list[list[int]]:
    """New token ids per prompt, batched with left padding, cut after the first stop id (kept).

    A sampler returning several sequences per prompt (all beams) gives them consecutively.

    ``max_length`` is each row's own limit, prompt plus new tokens, as in keras-hub: in a batch a
    short prompt gets more new tokens than a long one. The batch runs until its shortest prompt can
    reach ``max_length``; longer rows are cut to their own limit (rows never see each other, so the
    extra steps change nothing in them). The stop token closing a row is returned; callers that
    hide EOS (``"auto"``) drop it when decoding, as keras-hub's postprocessing does.
    """
    import torch

    longest = max(len(p) for p in prompt_ids)
    shortest = min(len(p) for p in prompt_ids)
    if longest >= max_length:
        raise UserError(f"The longest prompt has {longest} tokens, which leaves no room below max_length={max_length}.")
    device = next(model.parameters()).device
    input_ids, attention_mask = left_pad(prompt_ids, tokenizer.pad_id, device)
    kwargs = sampler.transformers_kwargs()
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), sampler.rng(), _clean_generation_config(model, tokenizer):
            out = sampler.run(
                model,
                input_ids=input_ids,
                attention_mask=attention_mask,  # generate() derives padding-aware position ids from it
                max_new_tokens=max_length - shortest,
                eos_token_id=list(stop_ids) if stop_ids else None,
                pad_token_id=tokenizer.pad_id,
                use_cache=True,
                **kwargs,
            )
    finally:
        model.train(was_training)
    results = []
    per_prompt = out.shape[0] // len(prompt_ids)  # BeamSampler(return_all_beams=True): num_beams rows each
    for i, row in enumerate(out[:, input_ids.shape[1] :].tolist()):
        prompt = prompt_ids[i // per_prompt]
        row = row[: max_length - len(prompt)]
        if stop_ids:
            cut = next((i for i, t in enumerate(row) if t in stop_ids), None)
            row = row if cut is None else row[: cut + 1]
        results.append(row)
    return results


CHAT_TRAINERS = ("sft", "dpo")  # trainers whose merged model answers in the chat template (reward models score)


def chat_model_reason(local_dir: Any, metadata: Optional[Mapping], base_preset: Optional[str]) -> Optional[str]:
    """Why prompts for this model should go through its chat template, or None for a plain language model.

    A run's ``merged/`` or ``preset/`` says what trained it: the run directory's ``resolved_config.yaml`` and
    ``summary.json`` (``data_format``), or ``metadata.json``'s provenance. SFT and DPO runs on chat data
    (anything but ``text``) and the built-in instruct presets are chat models.
    """
    import json
    from pathlib import Path

    provenance = dict((metadata or {}).get("provenance") or {})
    if local_dir is not None:
        run = Path(local_dir).parent
        config, summary = run / "resolved_config.yaml", run / "summary.json"
        if config.is_file():
            from omegaconf import OmegaConf

            cfg = OmegaConf.to_container(OmegaConf.load(config))
            provenance.setdefault("recipe", cfg.get("recipe"))
            provenance.setdefault("trainer", (cfg.get("trainer") or {}).get("name"))
            provenance.setdefault("data", cfg.get("data"))
        if summary.is_file():
            provenance.setdefault("data_format", json.loads(summary.read_text(encoding="utf-8")).get("data_format"))
    trainer = provenance.get("trainer") or str(provenance.get("recipe") or "").split("_")[0]
    if trainer in CHAT_TRAINERS:
        fmt = provenance.get("data_format") or (provenance.get("data") or {}).get("format")
        if fmt != "text":
            return f"trained by {provenance.get('recipe') or trainer} on {fmt or 'chat'} data (the run's metadata)"
        return None
    label = str(base_preset or "").lower()
    if not trainer and "instruct" in label and (label.startswith("hf://") or _builtin(str(base_preset))):
        return f"{base_preset} is an instruct model"
    return None


def _builtin(preset_id: str) -> bool:
    from mistral_tune.models.presets import PRESETS

    return preset_id in PRESETS


def empty_answer(new_ids: Sequence[int], tokenizer: Any, stop_ids: Optional[Sequence[int]]) -> Optional[str]:
    """Why a generation's new text is empty (None when it is not): its first new token was a stop token (EOS on
    a chat model given raw text, typically), or every new token decodes to blanks."""
    body = list(new_ids)
    stop = body.pop() if body and stop_ids and body[-1] in stop_ids else None  # generate_ids keeps the stop id
    if tokenizer.decode(body).strip():
        return None
    if not body and stop is not None:
        return "the model's first new token was " + ("EOS" if stop == tokenizer.eos_id else f"stop token {stop}")
    return f"the {len(body)} new token(s) decode to whitespace only"
