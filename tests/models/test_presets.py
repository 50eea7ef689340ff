from __future__ import annotations

import pytest

import mistral_tune.models.loading as models
from mistral_tune import MistralCausalLM
from mistral_tune.models.presets import PRESETS, format_params, parameter_count

PUBLISHED = [p for p in PRESETS if PRESETS[p].hf_repo]
TINY = [p for p in PRESETS if not PRESETS[p].hf_repo]


@pytest.mark.usefixtures("single_thread")
def test_presets_listing():
    presets = MistralCausalLM.presets
    assert set(presets) == set(PRESETS)
    for pid in PUBLISHED:
        meta = presets[pid]["metadata"]
        assert meta["params"] == PRESETS[pid].parameter_count == PRESETS[pid].published_parameters
        assert meta["params_human"] == format_params(meta["params"])
        assert meta["description"] and presets[pid]["handle"] == f"hf://{PRESETS[pid].hf_repo}"
    assert presets["mistral_7b_en"]["metadata"]["params"] == 7_241_732_096  # keras-hub's count
    assert presets["mixtral_8x7b_en"]["metadata"]["params_human"] == "46.70B"


@pytest.mark.parametrize("preset", list(PRESETS))
def test_meta_model_has_the_published_parameter_count(preset):
    """Built on the meta device (no allocation) with the class its model_type names; its size equals the
    arithmetic in presets.py and, for real checkpoints, the hub's safetensors total."""
    import torch
    from transformers import AutoModelForCausalLM

    p = PRESETS[preset]
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(models.preset_config(p))
    assert type(model).__name__ == p.architecture
    assert all(t.is_meta for t in model.parameters())
    n = sum(t.numel() for t in model.parameters())
    assert n == parameter_count(p.config)
    if p.hf_repo:
        assert n == p.published_parameters
    else:
        assert p.published_parameters is None


def test_the_load_weights_false_path_builds_the_same_class_on_meta():
    """`from_preset(..., load_weights=False)` inside a meta device context: what the issue asks to count."""
    import torch

    from mistral_tune.models.from_preset import load_preset_model

    with torch.device("meta"):
        model, *_ = load_preset_model("mixtral_8x7b_en", load_weights=False, dtype="bfloat16")
    assert type(model).__name__ == "MixtralForCausalLM"
    assert sum(t.numel() for t in model.parameters()) == 46_702_792_704


def test_architectures_are_as_published():
    nemo = PRESETS["mistral_nemo_12b_en"].config
    # NeMo's attention (32 x 128 = 4096) is narrower than its residual stream (5120)
    assert nemo["head_dim"] == 128 and nemo["hidden_size"] == 5120 and nemo["num_attention_heads"] == 32
    ministral = PRESETS["ministral_instruct_8b_en"]
    assert ministral.model_type == "ministral" and ministral.config["sliding_window"] == 32768
    types = ministral.config["layer_types"]
    assert len(types) == 36 and types[:4] == ["full_attention"] + ["sliding_attention"] * 3
    assert types.count("full_attention") == 9
    for pid in ("mixtral_8x7b_en", "mixtral_instruct_8x7b_en", "mixtral_8x22b_en", "mixtral_instruct_8x22b_en"):
        p = PRESETS[pid]
        assert p.is_moe and p.architecture == "MixtralForCausalLM"
        assert p.config["num_local_experts"] == 8 and p.config["num_experts_per_tok"] == 2
    # "12.9B active" of Mixtral 8x7B's model card: two of the eight experts per token
    assert parameter_count(PRESETS["mixtral_8x7b_en"].config, active=True) == 12_879_925_248
    assert not any(PRESETS[p].is_moe for p in PRESETS if not p.startswith("mixtral"))


def test_tiny_presets_are_small_random_and_named_tiny():
    """`*_tiny` is the rule config/schema.py's by_model uses for demo learning rates."""
    for pid, p in PRESETS.items():
        assert pid.endswith("_tiny") == (p.hf_repo is None), pid
    for pid in TINY:
        p = PRESETS[pid]
        assert p.parameter_count < 20_000_000 and p.config["hidden_size"] <= 256
    nemo = PRESETS["mistral_nemo_tiny"].config
    assert nemo["head_dim"] * nemo["num_attention_heads"] != nemo["hidden_size"]
    assert PRESETS["ministral_tiny"].config["layer_types"] == ["full_attention"] + ["sliding_attention"] * 3
    assert PRESETS["mixtral_tiny"].config["num_local_experts"] == 4
    # one per family, each with its family's tokenizer
    kinds = {(PRESETS[p].tokenizer, PRESETS[p].model_type) for p in TINY}
    assert {("v3", "mistral"), ("tekken_240718", "mistral"), ("tekken_240911", "ministral"), ("v1", "mixtral")} <= kinds


def test_tokenizer_files_and_vocabularies():
    from importlib.resources import files

    from mistral_tune.models.tokenizer import CHAT_TEMPLATES, TOKENIZER_FILES

    data = files("mistral_common") / "data"
    for pid, p in PRESETS.items():
        assert p.tokenizer_kind in ("sentencepiece", "tekken"), pid
        if p.tokenizer != "hub":  # Mistral Small 3's tekken.json comes from its own hub repo
            assert (data / p.tokenizer_file).is_file(), (pid, p.tokenizer_file)
        vocab = {"sentencepiece": (32000, 32768), "tekken": (131072,)}[p.tokenizer_kind]
        assert p.config["vocab_size"] in vocab, pid
        assert p.chat_template in CHAT_TEMPLATES, pid
        if p.tokenizer != "hub":
            entry = TOKENIZER_FILES[p.tokenizer]
            assert entry.vocabulary_size == p.config["vocab_size"], pid


def test_mistral_small_3_tokenizer_comes_from_its_hub_repo(tmp_path, monkeypatch):
    """mistral-common does not ship Mistral Small 3's tekken.json: a preset with `tokenizer: hub` fetches its
    repo's config and tokenizer files (never weights) and loads the tokenizer from there, with the preset's
    chat format. The hub is faked by a directory (tests never reach it); offline, the fetch fails naming the repo."""
    import json
    import shutil
    from importlib.resources import files

    import mistral_tune.models.sources as sources
    from mistral_tune.core.errors import UserError
    from mistral_tune.models.tokenizer import MistralTokenizer

    preset = PRESETS["mistral_small_3_instruct_24b_en"]
    with pytest.raises(UserError, match="Mistral-Small-24B-Instruct-2501"):
        MistralTokenizer.from_preset(preset.id)  # conftest's unroutable hub: offline
    snapshot = tmp_path / "snapshot"
    snapshot.mkdir()
    (snapshot / "config.json").write_text(json.dumps({**preset.hf_config, "architectures": [preset.architecture]}))
    # Stand-in file: the test checks where the tokenizer comes from, not Small 3's own vocabulary.
    shutil.copyfile(str(files("mistral_common") / "data" / "tekken_240718.json"), snapshot / "tekken.json")
    fetched = []

    def fake_fetch(repo, revision=None, config_only=False):
        fetched.append((repo, config_only))
        return snapshot

    monkeypatch.setattr(sources, "fetch_hub_repo", fake_fetch)
    tokenizer = MistralTokenizer.from_preset(preset.id)
    assert fetched == [(preset.hf_repo, True)]
    assert tokenizer.kind == "tekken" and tokenizer.chat_template == "v7" and tokenizer.vocabulary_size == 131072
