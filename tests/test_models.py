"""Presets, source resolution, offline behaviour and the embedded tiny preset."""

import time

import pytest

import mistral_tune.models.loading as models
from mistral_tune.core.errors import UserError
from mistral_tune.models.attention import pick_attn_implementation
from mistral_tune.models.presets import PRESETS, parameter_count
from mistral_tune.models.sources import check_weight_files, fetch_hub_repo, resolve_source


def test_builtin_ids_resolve_to_their_hub_repos():
    src = resolve_source("mistral_7b_en")
    assert src.hub_repo == "mistralai/Mistral-7B-v0.1" and src.local_dir is None
    assert resolve_source("mistral_0.3_instruct_7b_en").hub_repo == "mistralai/Mistral-7B-Instruct-v0.3"


def test_local_dir_and_path_override(tmp_path):
    src = resolve_source("mistral_7b_en", str(tmp_path))
    assert src.local_dir == tmp_path.resolve() and src.preset.id == "mistral_7b_en"


@pytest.mark.parametrize(
    "bad", ["../../no-such-preset", "/nonexistent/dir", "a/b/c", "hf://../x", "org/../x", "mistral_7b_en/../../etc"]
)
def test_bad_ids_are_refused(bad):
    with pytest.raises(UserError):
        resolve_source(bad)


def test_offline_hub_fails_fast_naming_the_repo():
    start = time.monotonic()
    with pytest.raises(UserError) as err:
        fetch_hub_repo("mistralai/Mistral-7B-v0.1")
    assert time.monotonic() - start < 30
    assert "mistralai/Mistral-7B-v0.1" in str(err.value) and "model.path=" in str(err.value)


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


def test_tiny_preset_is_mistral_with_window_shorter_than_training_length(compose):
    c = PRESETS["mistral_tiny"].config
    assert c["num_key_value_heads"] < c["num_attention_heads"]  # GQA
    assert c["vocab_size"] == 32000
    cfg = compose("sft_lora", [])
    assert c["sliding_window"] < cfg.trainer.max_length


def test_tiny_model_is_reproducible_for_a_seed(compose):
    import torch

    cfg = compose("sft_lora", [])
    src = resolve_source("mistral_tiny")
    a = models.load_model(cfg.model, src, seed=3)
    b = models.load_model(cfg.model, src, seed=3)
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))
    assert a.config.sliding_window == 32 and a.config.model_type == "mistral"


def test_flash_attention_without_cuda_is_a_clear_error():
    with pytest.raises(UserError, match="flash-attn"):
        pick_attn_implementation("flash_attention_2")


def test_pickle_weights_refused_unless_allowed(tmp_path):
    (tmp_path / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(UserError, match="allow_pickle"):
        check_weight_files(tmp_path, allow_pickle=False)
    check_weight_files(tmp_path, allow_pickle=True)
