"""Scoring: logits, per-token log-likelihoods and loss of given sequences, and perplexity over texts."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from mistral_tune.core.errors import UserError
from mistral_tune.inference.generation import left_pad, positions_from_mask

SCORING_MODES = ("log_likelihood", "loss", "logits")


def _device(model: Any):
    return next(model.parameters()).device


def batch_logits(model: Any, token_ids: Any, padding_mask: Any = None):
    """Logits for a padded batch; position ids skip padding, so padding never changes a row's result."""
    import torch

    device = _device(model)
    ids = token_ids.to(device) if isinstance(token_ids, torch.Tensor) else torch.as_tensor(token_ids, device=device)
    if ids.dim() != 2:
        raise UserError(f"token_ids must be [batch, seq]; got shape {tuple(ids.shape)}.")
    if padding_mask is None:
        mask = torch.ones_like(ids)
    elif isinstance(padding_mask, torch.Tensor):
        mask = padding_mask.to(device).long()
    else:
        mask = torch.as_tensor(padding_mask, device=device).long()
    return model(input_ids=ids.long(), attention_mask=mask, position_ids=positions_from_mask(mask)).logits, ids, mask


def token_log_likelihoods(logits: Any, ids: Any, mask: Any):
    """log p(ids[t] | ids[<t]) at each position t >= 1 where both t and t-1 are real tokens; 0 elsewhere."""
    import torch

    logprobs = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    picked = logprobs.gather(-1, ids[:, 1:, None]).squeeze(-1)
    valid = (mask[:, 1:] * mask[:, :-1]).bool()
    out = torch.zeros(ids.shape, dtype=picked.dtype, device=ids.device)
    out[:, 1:] = picked.masked_fill(~valid, 0.0)
    return out, torch.cat([valid.new_zeros(ids.shape[0], 1), valid], dim=1)


def score(
    model: Any,
    tokenizer: Any,
    inputs: Any,
    padding_mask: Any,
    scoring_mode: str,
    *,
    layer_intercept_fn: Any = None,
    target_ids: Any = None,
):
    """See ``MistralCausalLM.score``."""
    import torch

    if scoring_mode not in SCORING_MODES:
        raise UserError(f"scoring_mode={scoring_mode!r} is not one of {', '.join(SCORING_MODES)}.")
    if isinstance(inputs, str) or (isinstance(inputs, (list, tuple)) and inputs and isinstance(inputs[0], str)):
        texts = [inputs] if isinstance(inputs, str) else list(inputs)
        inputs, padding_mask = left_pad([tokenizer.encode(t) for t in texts], tokenizer.pad_id)
    was_training = model.training
    model.eval()
    try:
        # keras-hub computes score under the caller's gradient tape; an intercept fn is how a caller
        # reaches activations, so autograd stays on with one.
        with torch.set_grad_enabled(layer_intercept_fn is not None), _intercepted(model, layer_intercept_fn):
            logits, ids, mask = batch_logits(model, inputs, padding_mask)
    finally:
        model.train(was_training)
    if scoring_mode == "logits":
        return logits
    if target_ids is not None:
        targets = torch.as_tensor(target_ids, device=logits.device).long()
        if targets.shape != ids.shape:
            raise UserError(
                f"target_ids must have the shape of token_ids {tuple(ids.shape)}; got {tuple(targets.shape)}."
            )
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        ll = logprobs.gather(-1, targets[..., None]).squeeze(-1)
        return ll if scoring_mode == "log_likelihood" else -ll
    ll, _ = token_log_likelihoods(logits, ids, mask)
    return ll if scoring_mode == "log_likelihood" else -ll


@contextlib.contextmanager
def _intercepted(model: Any, fn: Any) -> Iterator[None]:
    """Run ``fn(x, -1)`` on the token embeddings and ``fn(x, i)`` on decoder layer i's output, in place of them."""
    if fn is None:
        yield
        return
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model.model

    def hook(index: int):
        def replace(module: Any, args: Any, output: Any) -> Any:
            if isinstance(output, tuple):
                return (fn(output[0], index), *output[1:])
            return fn(output, index)

        return replace

    handles = [decoder.embed_tokens.register_forward_hook(hook(-1))]
    handles += [layer.register_forward_hook(hook(i)) for i, layer in enumerate(decoder.layers)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _texts(data: Any, text_field: str) -> Iterable[str]:
    if isinstance(data, str):
        raise UserError("perplexity() takes a collection of texts, not a single string; wrap it in a list.")
    for i, row in enumerate(data):
        text = row.get(text_field) if isinstance(row, Mapping) else row
        if not isinstance(text, str):
            raise UserError(f"perplexity(): item {i} has no text (expected a str or a '{text_field}' field).")
        yield text


def perplexity(model: Any, tokenizer: Any, data: Any, batch_size: int, max_length: int, text_field: str) -> dict:
    """See ``MistralCausalLM.perplexity``. Every text is accounted for: truncated and empty ones are counted."""
    import torch

    if batch_size < 1 or max_length < 2:
        raise UserError(f"perplexity(): need batch_size >= 1 and max_length >= 2; got {batch_size}, {max_length}.")
    total_nll, tokens, sequences, truncated, empty = 0.0, 0, 0, 0, 0
    batch: list[list[int]] = []

    def flush() -> None:
        nonlocal total_nll, tokens
        ids, mask = left_pad(batch, tokenizer.pad_id)
        with torch.no_grad():
            logits, ids, mask = batch_logits(model, ids, mask)
        ll, valid = token_log_likelihoods(logits, ids, mask)
        total_nll -= float(ll.sum())
        tokens += int(valid.sum())
        batch.clear()

    was_training = model.training
    model.eval()
    try:
        for text in _texts(data, text_field):
            sequences += 1
            ids = tokenizer.encode(text)
            if len(ids) > max_length:
                truncated += 1
                ids = ids[:max_length]
            if len(ids) < 2:  # BOS alone predicts nothing
                empty += 1
                continue
            batch.append(ids)
            if len(batch) == batch_size:
                flush()
        if batch:
            flush()
    finally:
        model.train(was_training)
    if tokens == 0:
        raise UserError(f"perplexity(): no tokens to score in {sequences} texts ({empty} empty).")
    loss = total_nll / tokens
    return {
        "perplexity": math.exp(loss),
        "loss": loss,
        "tokens": tokens,
        "sequences": sequences,
        "truncated": truncated,
        "empty": empty,
    }
