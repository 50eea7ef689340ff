from __future__ import annotations

import json
import shutil
import sys

import pytest

from mistral_tune import MistralCausalLM, MistralTokenizer
from mistral_tune.core.errors import UserError
from mistral_tune.models.tokenizer import tokenizer_file

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.mark.parametrize(
    "preset,version,template",
    [
        ("mistral_7b_en", "v1", "v1"),
        ("mistral_instruct_7b_en", "v1", "v1"),
        ("mistral_0.2_instruct_7b_en", "v1", "v1"),
        ("mistral_0.3_7b_en", "v3", "v3"),
        ("mistral_0.3_instruct_7b_en", "v3", "v3"),
    ],
)
def test_tokenizer_from_preset_is_offline_mistral_common(preset, version, template):
    tok = MistralTokenizer.from_preset(preset)
    assert tok.model_file == tokenizer_file(version) and tok.chat_template == template


def test_unknown_and_unreachable_handles_fail_clearly(monkeypatch):
    with pytest.raises(UserError, match="neither a built-in preset"):
        MistralCausalLM.from_preset("mistral_8b_en")
    with pytest.raises(UserError, match="not a valid Hugging Face repo id"):
        MistralCausalLM.from_preset("hf://a/b/c")
    # The network cannot be relied on: put the hub client in offline mode.
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(UserError, match="offline"):
        MistralCausalLM.from_preset("hf://someone/some-model", load_weights=False)
    monkeypatch.setitem(sys.modules, "kagglehub", None)  # not installed
    with pytest.raises(UserError, match="pip install 'mistral-tune\\[kaggle\\]'"):
        MistralCausalLM.from_preset("kaggle://keras/mistral/keras/mistral_7b_en")
    with pytest.raises(UserError, match="not a Kaggle model handle"):
        MistralCausalLM.from_preset("kaggle://mistral")


def test_keras_hub_layout_gives_architecture_and_tokenizer(tmp_path):
    args = dict(
        vocabulary_size=32000,
        num_layers=1,
        num_query_heads=4,
        hidden_dim=64,
        intermediate_dim=128,
        num_key_value_heads=2,
        rope_max_wavelength=10000,
        rope_scaling_factor=1.0,
        layer_norm_epsilon=1e-6,
        sliding_window=16,
        head_dim=None,  # keras-hub 0.32 writes it (None: hidden_dim // num_query_heads)
        dropout=0,
        name="mistral_backbone",
        trainable=True,
        dtype="float32",
    )
    (tmp_path / "config.json").write_text(json.dumps({"class_name": "MistralBackbone", "config": args}))
    (tmp_path / "assets" / "tokenizer").mkdir(parents=True)
    shutil.copy(tokenizer_file("v1"), tmp_path / "assets" / "tokenizer" / "vocabulary.spm")
    model = MistralCausalLM.from_preset(str(tmp_path), load_weights=False)
    c = model.hf_model.config
    assert (c.hidden_size, c.num_hidden_layers, c.sliding_window, c.head_dim) == (64, 1, 16, 16)
    assert model.tokenizer.encode("hello") == MistralTokenizer.from_version("v1").encode("hello")
    with pytest.raises(UserError, match="without model.weights.h5"):
        MistralCausalLM.from_preset(str(tmp_path))
    args["head_dim"] = 32  # set apart from hidden_dim // heads, as Mistral Nemo does
    (tmp_path / "config.json").write_text(json.dumps({"class_name": "MistralBackbone", "config": args}))
    assert MistralCausalLM.from_preset(str(tmp_path), load_weights=False).backbone.head_dim == 32
