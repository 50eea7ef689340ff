from __future__ import annotations

import pytest

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
