from __future__ import annotations

import pytest

import mistral_tune.models.loading as models
from mistral_tune import MistralCausalLM
from mistral_tune.models.presets import PRESETS, parameter_count

SEVEN_B = [p for p in PRESETS if p != "mistral_tiny"]


@pytest.mark.usefixtures("single_thread")
def test_presets_listing():
    presets = MistralCausalLM.presets
    assert set(presets) == set(PRESETS)
    for pid in SEVEN_B:
        meta = presets[pid]["metadata"]
        assert meta["params_human"] == "7.24B" and meta["params"] == PRESETS[pid].parameter_count
        assert meta["description"] and presets[pid]["handle"].startswith("hf://mistralai/")
    assert presets["mistral_7b_en"]["metadata"]["params"] == 7_241_732_096  # keras-hub's count


@pytest.mark.parametrize("preset", list(PRESETS))
def test_parameter_count_matches_meta_model(preset):
    import torch
    from transformers import MistralForCausalLM

    with torch.device("meta"):
        model = MistralForCausalLM(models.mistral_config(PRESETS[preset]))
    assert sum(p.numel() for p in model.parameters()) == parameter_count(PRESETS[preset].config)


def test_7b_presets_are_7_24b():
    for p in PRESETS.values():
        if p.hf_repo:
            assert 7.24e9 <= p.parameter_count < 7.26e9
