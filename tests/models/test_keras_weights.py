"""models/keras_weights.py: keras-hub's model.weights.h5 read into a transformers Mistral.

The file is written here the way keras-hub 0.32 lays it out (the names and shapes of a real
``save_to_preset``; tests/interop/ checks the reader on files the real keras-hub writes).
"""

from __future__ import annotations

import json
import shutil

import h5py
import numpy as np
import pytest
import torch

from mistral_tune import MistralBackbone, MistralCausalLM
from mistral_tune.core.errors import UserError
from mistral_tune.models.keras_weights import _array
from mistral_tune.models.tokenizer import tokenizer_file

pytestmark = pytest.mark.usefixtures("single_thread")

ARGS = dict(
    vocabulary_size=32000,
    num_layers=2,
    num_query_heads=4,
    hidden_dim=32,
    intermediate_dim=48,
    num_key_value_heads=2,
    sliding_window=8,
    layer_norm_epsilon=1e-5,
    head_dim=None,
)


def write_keras_preset(directory, hf_model, args=ARGS, skip=None):
    """A keras-hub preset directory holding ``hf_model``'s weights in keras-hub's layout."""
    c = hf_model.config
    sd = {k: v.detach().float().numpy() for k, v in hf_model.state_dict().items()}
    hd = c.head_dim
    directory.mkdir(parents=True, exist_ok=True)
    config = {"class_name": "MistralBackbone", "config": {**args, "name": "mistral_backbone", "dtype": "float32"}}
    (directory / "config.json").write_text(json.dumps(config))
    (directory / "assets" / "tokenizer").mkdir(parents=True)
    shutil.copy(tokenizer_file("v1"), directory / "assets" / "tokenizer" / "vocabulary.spm")
    with h5py.File(directory / "model.weights.h5", "w") as f:
        f["layers/reversible_embedding/vars/0"] = sd["model.embed_tokens.weight"]
        f["layers/reversible_embedding/vars/1"] = sd["lm_head.weight"].T
        f["layers/mistral_layer_normalization/vars/0"] = sd["model.norm.weight"]
        for i in range(c.num_hidden_layers):
            g = "layers/mistral_transformer_decoder" + (f"_{i}" if i else "")
            p = f"model.layers.{i}."
            for name, hf, heads in (
                ("_query_dense", "q_proj", c.num_attention_heads),
                ("_key_dense", "k_proj", c.num_key_value_heads),
                ("_value_dense", "v_proj", c.num_key_value_heads),
            ):
                f[f"{g}/_self_attention_layer/{name}/vars/0"] = sd[f"{p}self_attn.{hf}.weight"].T.reshape(
                    c.hidden_size, heads, hd
                )
            o = sd[f"{p}self_attn.o_proj.weight"].T.reshape(c.num_attention_heads, hd, c.hidden_size)
            f[f"{g}/_self_attention_layer/_output_dense/vars/0"] = o
            f[f"{g}/_feedforward_gate_dense/vars/0"] = sd[f"{p}mlp.gate_proj.weight"].T
            f[f"{g}/_feedforward_intermediate_dense/vars/0"] = sd[f"{p}mlp.up_proj.weight"].T
            f[f"{g}/_feedforward_output_dense/vars/0"] = sd[f"{p}mlp.down_proj.weight"].T
            f[f"{g}/_self_attention_layernorm/vars/0"] = sd[f"{p}input_layernorm.weight"]
            f[f"{g}/_feedforward_layernorm/vars/0"] = sd[f"{p}post_attention_layernorm.weight"]
        if skip:
            del f[skip]
    return directory


@pytest.fixture(scope="module")
def reference():
    torch.manual_seed(3)
    backbone = MistralBackbone(**ARGS)
    lm = MistralCausalLM(backbone)
    with torch.no_grad():  # norms away from 1, so a swapped norm shows in the logits
        for name, p in lm.hf_model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return lm


def test_keras_preset_loads_with_its_weights(tmp_path, reference):
    preset = write_keras_preset(tmp_path / "k", reference.hf_model)
    loaded = MistralCausalLM.from_preset(str(preset))
    ids = [[1, 415, 5565, 302, 4843, 349, 264, 1664, 28723, 13, 1014, 2936]]
    assert torch.allclose(loaded(token_ids=ids), reference(token_ids=ids), atol=1e-6)
    assert loaded.tokenizer.encode("hello") == reference_tokens("hello")
    half = MistralCausalLM.from_preset(str(preset), dtype=torch.bfloat16)
    assert half.hf_model.dtype == torch.bfloat16
    backbone = MistralBackbone.from_preset(str(preset))
    hidden = backbone({"token_ids": ids, "padding_mask": [[1] * len(ids[0])]})
    assert torch.allclose(hidden, reference.backbone({"token_ids": ids}), atol=1e-6)


def reference_tokens(text):
    from mistral_tune.models.tokenizer import MistralTokenizer

    return MistralTokenizer.from_version("v1").encode(text)


def test_missing_or_misshapen_weights_are_refused(tmp_path, reference):
    skip = "layers/mistral_transformer_decoder_1/_feedforward_layernorm/vars/0"
    preset = write_keras_preset(tmp_path / "missing", reference.hf_model, skip=skip)
    with pytest.raises(UserError, match="_feedforward_layernorm"):
        MistralCausalLM.from_preset(str(preset))
    wrong = write_keras_preset(tmp_path / "wrong", reference.hf_model, args={**ARGS, "num_layers": 3})
    with pytest.raises(UserError, match="found 2 decoder layers, the config says 3"):
        MistralCausalLM.from_preset(str(wrong))


def test_bfloat16_variables_widen_exactly(tmp_path):
    values = torch.tensor([1.0, -2.5, 3.140625, 1e-3], dtype=torch.bfloat16)
    raw = values.view(torch.int16).numpy().view(np.uint16)
    with h5py.File(tmp_path / "w.h5", "w") as f:
        f["v"] = raw.view(np.dtype("V2"))  # how an opaque 2-byte (bfloat16) variable reads back
        got = _array(f["v"])
    assert got.dtype == np.float32 and np.array_equal(got, values.float().numpy())
