"""generate(): samplers, batching with left padding, stop tokens, chat templates, contrastive search."""

from __future__ import annotations

import pytest
import torch

from mistral_tune import (
    BeamSampler,
    ContrastiveSampler,
    GreedySampler,
    MistralCausalLM,
    RandomSampler,
    TopKSampler,
    TopPSampler,
)
from mistral_tune.core.errors import UserError
from mistral_tune.inference.generation import encode_inputs, resolve_stop_ids

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


def test_deterministic_samplers_reduce_to_greedy(lm):
    greedy = run(lm, "greedy")
    assert len(greedy) == 2 and all(isinstance(t, str) and t for t in greedy)
    assert run(lm, TopKSampler(k=1, seed=3)) == greedy
    assert run(lm, TopPSampler(p=1e-6, seed=3)) == greedy
    assert run(lm, BeamSampler(num_beams=1)) == greedy
    assert run(lm, ContrastiveSampler(k=4, alpha=0.0)) == greedy


def test_seeded_sampling_repeats_and_leaves_global_rng_alone(lm):
    for sampler in (TopKSampler(k=50, seed=7), TopPSampler(p=0.9, temperature=1.5, seed=7)):
        torch.manual_seed(123)
        first = run(lm, sampler)
        after = torch.rand(1)
        torch.manual_seed(123)
        assert run(lm, sampler) == first
        assert torch.equal(torch.rand(1), after)  # the seed was scoped to generate()
    assert run(lm, RandomSampler(temperature=1.5, seed=8)) != run(lm, RandomSampler(temperature=1.5, seed=7))


def test_beam_search_finds_at_least_greedys_log_probability(lm):
    lm.compile(sampler="greedy")
    greedy = lm.generate(PROMPTS[0], max_length=14, stop_token_ids=None)
    lm.compile(sampler=BeamSampler(num_beams=4))
    beam = lm.generate(PROMPTS[0], max_length=14, stop_token_ids=None)
    n = len(lm.tokenizer.encode(PROMPTS[0]))

    def new_token_logprob(text):
        ids = lm.tokenizer.encode(text)
        return lm.score([ids])[0, n:].sum().item()

    assert new_token_logprob(beam) >= new_token_logprob(greedy) - 1e-4


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
    alone = lm.generate(PROMPTS[0], max_length=width + steps, stop_token_ids=None)  # each row fills max_length
    assert width > len(prompt_ids) and batch[0] == alone and alone.startswith(got)


def test_generate_shapes_padding_and_strip_prompt(lm):
    lm.compile(sampler="greedy")
    full = lm.generate(PROMPTS[0], max_length=20)
    assert isinstance(full, str) and full.startswith(PROMPTS[0])
    new = lm.generate(PROMPTS[0], max_length=20, strip_prompt=True)
    assert full.endswith(new) and len(new) < len(full)
    # Batched (left-padded) results equal one-at-a-time results.
    long_prompt = "Sliding windows keep attention local. " * 5  # longer than the 32-token window
    batch = lm.generate([PROMPTS[0], long_prompt], max_length=56, stop_token_ids=None)
    width = len(lm.tokenizer.encode(long_prompt))
    assert batch[1] == lm.generate(long_prompt, max_length=56, stop_token_ids=None)
    # As in keras-hub, every row is filled to max_length: the short prompt gets more new tokens.
    alone = lm.generate(PROMPTS[0], max_length=56, stop_token_ids=None)
    assert batch[0] == alone
    short_len = len(lm.tokenizer.encode(PROMPTS[0]))
    ids = lm.generate(lm.preprocessor.generate_preprocess([PROMPTS[0], long_prompt], 56), stop_token_ids=None)
    assert ids["padding_mask"].sum(-1).tolist() == [56, 56] and short_len < width < 56
    with pytest.raises(UserError, match="no room below max_length"):
        lm.generate(long_prompt, max_length=10)
    with pytest.raises(UserError, match="takes a string"):
        lm.generate(42)


def test_stop_token_ids(lm):
    lm.compile(sampler="greedy")
    prompts = [PROMPTS[0], "Another prompt"]
    n_prompt = max(len(lm.tokenizer.encode(p)) for p in prompts)
    ids = [lm.tokenizer.encode(p) for p in prompts]
    from mistral_tune.inference.generation import generate_ids

    free = generate_ids(
        lm.hf_model, lm.tokenizer, ids, sampler=GreedySampler(), max_length=n_prompt + 10, stop_ids=None
    )
    assert [len(r) for r in free] == [n_prompt + 10 - len(i) for i in ids]  # None: each row to max_length
    stop = free[0][3]
    cut = generate_ids(
        lm.hf_model, lm.tokenizer, ids, sampler=GreedySampler(), max_length=n_prompt + 10, stop_ids=(stop,)
    )
    assert cut[0] == free[0][: free[0].index(stop) + 1]  # stopped there, the stop token kept (keras-hub)
    assert cut[1] == (free[1][: free[1].index(stop) + 1] if stop in free[1] else free[1])  # the other ran on
    text = lm.generate(prompts[0], max_length=n_prompt + 10, stop_token_ids=(stop,), strip_prompt=True)
    assert text == lm.tokenizer.decode(cut[0]) and text != lm.tokenizer.decode(cut[0][:-1])
    assert resolve_stop_ids("auto", lm.tokenizer) == (lm.tokenizer.eos_id,)
    assert resolve_stop_ids(None, lm.tokenizer) is None
    with pytest.raises(UserError, match="stop_token_ids"):
        resolve_stop_ids((10**6,), lm.tokenizer)


def test_auto_stops_at_eos():
    """Make EOS a likely greedy choice, then check that "auto" stops at the first EOS."""
    from mistral_tune.inference.generation import generate_ids

    model = MistralCausalLM.from_preset("mistral_tiny")
    assert isinstance(model.sampler, TopKSampler) and model.sampler.k == 5  # keras-hub's default sampler
    model.compile(sampler="greedy")
    ids = [model.tokenizer.encode(PROMPTS[0])]
    length = len(ids[0]) + 10
    free = generate_ids(
        model.hf_model, model.tokenizer, ids, sampler=GreedySampler(), max_length=length, stop_ids=None
    )[0]
    eos = model.tokenizer.eos_id
    assert eos not in free
    head = model.hf_model.lm_head.weight
    with torch.no_grad():
        head[eos] = head[free[2]] * 1.5  # where the third token's logit is positive, EOS now beats it
    forced = generate_ids(
        model.hf_model, model.tokenizer, ids, sampler=GreedySampler(), max_length=length, stop_ids=None
    )[0]
    assert eos in forced[:3]
    auto = model.generate(PROMPTS[0], max_length=length, strip_prompt=True)
    assert auto == model.tokenizer.decode(forced[: forced.index(eos)])  # EOS itself never shows
    ids = {"token_ids": [ids[0] + [0] * 10], "padding_mask": [[1] * len(ids[0]) + [0] * 10]}
    out = model.generate(ids, stop_token_ids="auto", strip_prompt=True)
    assert out["token_ids"][0, : out["padding_mask"].sum()].tolist() == forced[: forced.index(eos) + 1]


def test_conversation_uses_the_chat_template(lm):
    conversation = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello!"}]
    assert encode_inputs(lm.tokenizer, [conversation]) == [lm.tokenizer.apply_chat_template(conversation)]
    lm.compile(sampler="greedy")
    out = lm.generate(conversation, max_length=28)
    assert out.startswith("[INST] Be brief.\n\nHello! [/INST]")
    both = lm.generate([conversation, [{"role": "user", "content": "Hi"}]], max_length=28, strip_prompt=True)
    assert both[0] == lm.generate(conversation, max_length=28, strip_prompt=True)  # same in a padded batch
    with pytest.raises(UserError, match="Invalid conversation"):
        lm.generate([{"role": "assistant", "content": "I start?"}])


def test_token_dict_inputs_keep_keras_hubs_shape(lm):
    lm.compile(sampler="greedy")
    x = lm.preprocessor.generate_preprocess(PROMPTS, sequence_length=16)
    lengths = x["padding_mask"].sum(-1).tolist()
    full = lm.generate(x, stop_token_ids=None)
    assert full["token_ids"].shape == (2, 16) and full["padding_mask"].all()
    assert torch.equal(full["token_ids"][x["padding_mask"]], x["token_ids"][x["padding_mask"]])  # prompts kept
    texts = lm.generate(PROMPTS, max_length=16, stop_token_ids=None)
    assert lm.preprocessor.generate_postprocess(full) == texts  # the text path, row by row
    stripped = lm.generate(x, stop_token_ids=None, strip_prompt=True)
    assert stripped["padding_mask"].sum(-1).tolist() == [16 - n for n in lengths]
    for row, n in enumerate(lengths):
        assert stripped["token_ids"][row, : 16 - n].tolist() == full["token_ids"][row, n:].tolist()
    single = lm.generate({"token_ids": x["token_ids"][0], "padding_mask": x["padding_mask"][0]}, stop_token_ids=None)
    assert torch.equal(single["token_ids"], full["token_ids"][0])


def test_tf_data_is_refused_with_a_way_out(lm):
    fake = type("DatasetV2", (), {"__module__": "tensorflow.python.data.ops.dataset_ops"})()
    with pytest.raises(UserError, match="tf.data.Dataset.*without TensorFlow"):
        lm.generate(fake)
