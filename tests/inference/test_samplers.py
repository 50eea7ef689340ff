from __future__ import annotations

import pytest
import torch

from mistral_tune import BeamSampler, ContrastiveSampler, GreedySampler, RandomSampler, TopKSampler, TopPSampler
from mistral_tune.core.errors import UserError
from mistral_tune.inference.samplers import get_sampler

pytestmark = pytest.mark.usefixtures("single_thread")


def test_sampler_names_and_defaults(lm):
    expected = {
        "greedy": GreedySampler,
        "top_k": TopKSampler,
        "top_p": TopPSampler,
        "random": RandomSampler,
        "beam": BeamSampler,
        "contrastive": ContrastiveSampler,
    }
    for name, cls in expected.items():
        assert type(get_sampler(name)) is cls
    assert get_sampler("top_p").p == 0.1 and get_sampler("beam").num_beams == 5
    assert (get_sampler("contrastive").k, get_sampler("contrastive").alpha) == (5, 0.6)
    with pytest.raises(UserError, match="Did you mean 'top_k'"):
        lm.compile(sampler="topk")
    with pytest.raises(UserError, match="temperature"):
        TopKSampler(temperature=0)


def test_keras_style_custom_sampler_runs_get_next_token(lm):
    from mistral_tune import Sampler

    class SecondBest(Sampler):  # keras-hub's documented way to write a sampler
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.calls = 0

        def get_next_token(self, probabilities):
            self.calls += 1
            return probabilities.topk(2, dim=-1).indices[:, 1]

    prompt = lm.tokenizer.encode("The capital of France is")
    sampler = SecondBest()
    lm.compile(sampler=sampler)
    out = lm.generate("The capital of France is", max_length=len(prompt) + 5, stop_token_ids=None, strip_prompt=True)
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(5):
            logits = lm.hf_model(input_ids=torch.tensor([ids])).logits[0, -1]
            ids.append(int(logits.topk(2).indices[1]))
    assert sampler.calls == 5 and out == lm.tokenizer.decode(ids[len(prompt) :])


def test_greedy_takes_temperature_and_samplers_serialize(lm):
    from mistral_tune.inference import samplers

    assert GreedySampler(temperature=0.5).temperature == 0.5
    lm.compile(sampler="greedy")
    plain = lm.generate("Hello there", max_length=12, stop_token_ids=None)
    lm.compile(sampler=GreedySampler(temperature=0.3))
    assert lm.generate("Hello there", max_length=12, stop_token_ids=None) == plain  # argmax is unchanged
    for sampler in (TopKSampler(k=7, temperature=0.5, seed=3), BeamSampler(num_beams=3, return_all_beams=True)):
        config = samplers.serialize(sampler)
        again = samplers.get(config)
        assert type(again) is type(sampler) and again.get_config() == sampler.get_config()
    assert type(samplers.get({"class_name": "keras_hub>GreedySampler", "config": {}})) is GreedySampler
    assert type(samplers.get("top_p")) is TopPSampler and type(samplers.get(RandomSampler)) is RandomSampler
    with pytest.raises(UserError, match="Unknown sampler class"):
        samplers.get({"class_name": "Nope", "config": {}})


def test_beam_sampler_returns_all_beams(lm):
    lm.compile(sampler=BeamSampler(num_beams=3))
    best = lm.generate(["Hello there", "The sky"], max_length=12, stop_token_ids=None)
    lm.compile(sampler=BeamSampler(num_beams=3, return_all_beams=True))
    beams = lm.generate(["Hello there", "The sky"], max_length=12, stop_token_ids=None)
    assert [len(b) for b in beams] == [3, 3] and [b[0] for b in beams] == best
    assert all(len(set(b)) == 3 for b in beams)  # distinct beams, best first
    single = lm.generate("Hello there", max_length=12, stop_token_ids=None)
    assert isinstance(single, list) and single[0] == best[0]


def test_speculative_sampler_gives_the_models_greedy_text(lm):
    from mistral_tune import MistralCausalLM, SpeculativeSampler

    draft = MistralCausalLM.from_preset("mistral_tiny", seed=1)  # another random model: it often disagrees
    prompts = ["The capital of France is", "Once upon a time there"]
    lm.compile(sampler="greedy")
    greedy = lm.generate(prompts, max_length=20, stop_token_ids=None)
    lm.compile(sampler=SpeculativeSampler(draft_model=draft, num_speculative_tokens=3))
    assert lm.generate(prompts, max_length=20, stop_token_ids=None) == greedy
    lm.compile(sampler=SpeculativeSampler(draft_model=lm, num_speculative_tokens=3))  # a draft that always agrees
    assert lm.generate(prompts, max_length=20, stop_token_ids=None) == greedy
    sampled = SpeculativeSampler(draft_model=draft, num_speculative_tokens=3, base_sampler=TopKSampler(k=5), seed=4)
    lm.compile(sampler=sampled)
    once = lm.generate(prompts, max_length=20, stop_token_ids=None)
    assert lm.generate(prompts, max_length=20, stop_token_ids=None) == once  # seeded rejection sampling
    assert once != greedy and all(o.startswith(p) for o, p in zip(once, prompts))
    lm.compile(sampler="speculative")
    with pytest.raises(UserError, match="needs a draft model"):
        lm.generate("Hi", max_length=8)
