"""Contrastive search as a ``custom_generate`` decoding method for transformers' ``generate()``.

transformers v5 moved contrastive search out of its core into a Hub repository that needs
``trust_remote_code`` and a network. This is the same algorithm (Su et al., 2022, "A Contrastive
Framework for Neural Text Generation") written against the public model/cache API, plugged in with
``generate(custom_generate=contrastive_search, contrastive_k=k, contrastive_alpha=alpha)`` (generate()
hands a custom method the arguments its signature adds to ``_sample``'s); generate() still does
the input preparation, the cache (sliding-window aware), logits processors and stopping criteria.
"""

from __future__ import annotations

from typing import Any


def contrastive_search(
    model: Any,
    input_ids: Any,
    logits_processor: Any,
    stopping_criteria: Any,
    generation_config: Any,
    synced_gpus: bool = False,
    streamer: Any = None,
    contrastive_k: int = 5,
    contrastive_alpha: float = 0.6,
    **model_kwargs: Any,
):
    """Decode by contrastive search; returns the prompt plus new ids, padded after a stop token."""
    import torch

    k, alpha = int(contrastive_k), float(contrastive_alpha)
    pad = generation_config._pad_token_tensor
    # generate() prepares the cache under the name the model's forward takes: "cache" from transformers 5.24,
    # "past_key_values" before. Read it and pass it back under the same name.
    cache_key = "cache" if "cache" in model_kwargs else "past_key_values"
    cache = model_kwargs.get(cache_key)
    if cache is None:  # transformers 5.0 leaves the cache to the model's forward; this loop needs it in hand
        from transformers import DynamicCache

        cache = DynamicCache(config=model.config.get_text_config(decoder=True))
    mask = model_kwargs.get("attention_mask")
    mask = torch.ones_like(input_ids) if mask is None else mask  # generate() drops an all-ones mask
    batch = input_ids.shape[0]
    has_eos = any(hasattr(c, "eos_token_id") for c in stopping_criteria)

    def forward(ids, attention_mask, positions):
        return model(
            input_ids=ids,
            attention_mask=attention_mask,
            position_ids=positions,
            **{cache_key: cache},
            use_cache=True,
            output_hidden_states=True,
            logits_to_keep=1,
            return_dict=True,
        )

    # Prefill: the prompt's last-layer states are the context the penalty compares against.
    positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
    out = forward(input_ids, mask, positions)
    context = out.hidden_states[-1]  # [batch, length, hidden]
    context_mask = mask.bool()
    logits = out.logits[:, -1].float()
    unfinished = torch.ones(batch, dtype=torch.bool, device=input_ids.device)
    while True:
        scores = logits_processor(input_ids, logits)
        probs, candidates = scores.softmax(-1).topk(k, dim=-1)  # [batch, k]
        # Feed every candidate in one batched step of the k-fold expanded cache.
        cache.batch_repeat_interleave(k)
        step_mask = torch.cat([mask, mask.new_ones(batch, 1)], dim=-1)
        step_pos = positions[:, -1:] + 1
        out = forward(candidates.reshape(-1, 1), step_mask.repeat_interleave(k, 0), step_pos.repeat_interleave(k, 0))
        cand_state = out.hidden_states[-1][:, -1]  # [batch*k, hidden]
        ctx = context.repeat_interleave(k, 0)
        sim = torch.nn.functional.cosine_similarity(cand_state[:, None, :], ctx, dim=-1)
        sim = sim.masked_fill(~context_mask.repeat_interleave(k, 0), -1.0).max(-1).values  # padding never counts
        score = (1 - alpha) * probs.reshape(-1) - alpha * sim
        choice = score.view(batch, k).argmax(-1)
        pick = torch.arange(batch, device=choice.device) * k + choice
        cache.batch_select_indices(pick)
        tokens = candidates.gather(1, choice[:, None]).squeeze(1)
        if has_eos and pad is not None:
            tokens = torch.where(unfinished, tokens, pad.to(tokens.device))
        input_ids = torch.cat([input_ids, tokens[:, None]], dim=-1)
        if streamer is not None:
            streamer.put(tokens.cpu())
        context = torch.cat([context, cand_state[pick][:, None]], dim=1)
        context_mask = torch.cat([context_mask, context_mask.new_ones(batch, 1)], dim=-1)
        mask, positions, logits = step_mask, step_pos, out.logits[pick, -1].float()
        unfinished &= ~stopping_criteria(input_ids, None)
        if not unfinished.any():
            break
    if streamer is not None:
        streamer.end()
    return input_ids
