from __future__ import annotations

import pytest
import torch

from mistral_tune import ContrastiveSampler

pytestmark = pytest.mark.usefixtures("single_thread")


PROMPTS = ["The capital of France is", "def add(a, b):"]


def run(lm, sampler, inputs=PROMPTS, **kwargs):
    lm.compile(sampler=sampler)
    kwargs.setdefault("max_length", 18)
    kwargs.setdefault("strip_prompt", True)
    return lm.generate(inputs, **kwargs)


def naive_contrastive(model, ids, steps, k, alpha):
    """Contrastive search by full forward passes (no cache), one candidate at a time."""
    ids = list(ids)
    for _ in range(steps):
        with torch.no_grad():
            out = model(input_ids=torch.tensor([ids]), output_hidden_states=True)
        context = out.hidden_states[-1][0]
        probs, cands = out.logits[0, -1].float().softmax(-1).topk(k)
        best, best_score = None, -float("inf")
        for prob, cand in zip(probs.tolist(), cands.tolist()):
            with torch.no_grad():
                h = model(input_ids=torch.tensor([ids + [cand]]), output_hidden_states=True).hidden_states[-1][0, -1]
            sim = torch.nn.functional.cosine_similarity(h[None], context, dim=-1).max().item()
            score = (1 - alpha) * prob - alpha * sim
            if score > best_score:
                best, best_score = cand, score
        ids.append(best)
    return ids


def test_contrastive_search_matches_a_naive_reference(lm):
    prompt_ids = lm.tokenizer.encode(PROMPTS[0])
    steps = 6
    expected = naive_contrastive(lm.hf_model, prompt_ids, steps, k=4, alpha=0.6)
    lm.compile(sampler=ContrastiveSampler(k=4, alpha=0.6))
    got = lm.generate(PROMPTS[0], max_length=len(prompt_ids) + steps, stop_token_ids=None)
    assert got == lm.tokenizer.decode(expected)
    assert got != run(
        lm, "greedy", PROMPTS[0], max_length=len(prompt_ids) + steps, stop_token_ids=None, strip_prompt=False
    )
    # In a left-padded batch, padding neither shifts positions nor enters the similarity.
    longer = "A much longer prompt than the first one, by far."
    lm.compile(sampler=ContrastiveSampler(k=4, alpha=0.6))
    width = len(lm.tokenizer.encode(longer))
    batch = lm.generate([PROMPTS[0], longer], max_length=width + steps, stop_token_ids=None)
    assert width > len(prompt_ids) and batch[0] == got
