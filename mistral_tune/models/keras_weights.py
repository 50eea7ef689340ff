"""Read a keras-hub preset's ``model.weights.h5`` (Keras 3 format) into a transformers Mistral state dict.

keras-hub's ``save_to_preset`` writes the backbone's variables with h5py under
``layers/<layer>/.../vars/<i>``: the token embedding and the separate output projection in
``reversible_embedding`` (vars 0 and 1), one ``mistral_transformer_decoder[_N]`` group per layer
and the final ``mistral_layer_normalization``. Attention kernels are ``EinsumDense`` kernels
(``[hidden, heads, head_dim]``, output ``[heads, head_dim, hidden]``), dense kernels are
``[in, out]``; transformers stores ``[out, in]``, so each is reshaped and transposed here.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from mistral_tune.core.errors import UserError

WEIGHTS_FILE = "model.weights.h5"

_DECODER = re.compile(r"^mistral_transformer_decoder(?:_(\d+))?$")

# keras-hub sublayer -> transformers parameter name inside ``model.layers.<i>``.
_ATTENTION = {"_query_dense": "q_proj", "_key_dense": "k_proj", "_value_dense": "v_proj"}
_DENSE = {
    "_feedforward_gate_dense": "mlp.gate_proj",
    "_feedforward_intermediate_dense": "mlp.up_proj",
    "_feedforward_output_dense": "mlp.down_proj",
}
_NORMS = {"_self_attention_layernorm": "input_layernorm", "_feedforward_layernorm": "post_attention_layernorm"}


def _array(dataset: Any):
    """A float32 numpy array; bfloat16 variables (stored as 2-byte opaque data) are widened exactly."""
    import numpy as np

    data = dataset[()]
    if data.dtype.kind == "V" and data.dtype.itemsize == 2:  # bfloat16: the high half of a float32
        return (data.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    return np.asarray(data, dtype=np.float32)


def _var(group: Any, path: str, index: int = 0):
    try:
        return _array(group[f"{path}/vars/{index}"])
    except KeyError:
        raise UserError(f"keras weights: no variable {path}/vars/{index} in {WEIGHTS_FILE}.") from None


def read_keras_weights(directory: Path, config: Any) -> dict[str, Any]:
    """The state dict of ``MistralForCausalLM(config)`` from ``directory/model.weights.h5``.

    Every variable of the file is used and every parameter of the model is set; a mismatch (another
    architecture, a LoRA-enabled save, a different layer count) raises ``UserError``.
    """
    try:
        import h5py
    except ImportError as exc:
        raise UserError(
            f"Reading a keras-hub preset's {WEIGHTS_FILE} needs h5py: pip install 'mistral-tune[keras]' "
            "(or pip install h5py)."
        ) from exc
    import torch

    path = Path(directory) / WEIGHTS_FILE
    if not path.is_file():
        raise UserError(f"{directory} is a keras-hub preset without {WEIGHTS_FILE}.")
    hidden, heads, kv_heads = config.hidden_size, config.num_attention_heads, config.num_key_value_heads
    head_dim = config.head_dim or hidden // heads
    out: dict[str, Any] = {}
    with h5py.File(path, "r") as f:
        if "layers" not in f:
            raise UserError(f"{path} is not a Keras 3 weights file (no 'layers' group).")
        layers = f["layers"]
        decoders = sorted((int(m.group(1) or 0), name) for name in layers if (m := _DECODER.match(name)) is not None)
        if [i for i, _ in decoders] != list(range(config.num_hidden_layers)):
            raise UserError(
                f"{path}: found {len(decoders)} decoder layers, the config says {config.num_hidden_layers}."
            )
        out["model.embed_tokens.weight"] = _var(layers, "reversible_embedding", 0)
        out["lm_head.weight"] = _var(layers, "reversible_embedding", 1).T
        out["model.norm.weight"] = _var(layers, "mistral_layer_normalization")
        for i, name in decoders:
            g, prefix = layers[name], f"model.layers.{i}."
            attn = "_self_attention_layer"
            for keras_name, hf_name in _ATTENTION.items():
                kernel = _var(g, f"{attn}/{keras_name}")  # [hidden, heads, head_dim]
                n = kv_heads if hf_name != "q_proj" else heads
                if kernel.shape != (hidden, n, head_dim):
                    raise UserError(
                        f"{path}: {name}/{keras_name} has shape {kernel.shape}, expected {(hidden, n, head_dim)}."
                    )
                out[f"{prefix}self_attn.{hf_name}.weight"] = kernel.reshape(hidden, n * head_dim).T
            kernel = _var(g, f"{attn}/_output_dense")  # [heads, head_dim, hidden]
            out[f"{prefix}self_attn.o_proj.weight"] = kernel.reshape(heads * head_dim, hidden).T
            for keras_name, hf_name in _DENSE.items():
                out[f"{prefix}{hf_name}.weight"] = _var(g, keras_name).T
            for keras_name, hf_name in _NORMS.items():
                out[f"{prefix}{hf_name}.weight"] = _var(g, keras_name)
    return {k: torch.from_numpy(v.copy()) for k, v in out.items()}


def load_keras_weights(model: Any, directory: Path) -> None:
    """Set every parameter of a transformers ``MistralForCausalLM`` from the keras preset (in its dtype)."""
    import torch

    state = read_keras_weights(directory, model.config)
    expected = {k for k in model.state_dict() if not k.endswith("rotary_emb.inv_freq")}
    if set(state) != expected:
        missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
        raise UserError(f"keras weights do not fit the model: missing {missing[:5]}, unexpected {extra[:5]}.")
    params = model.state_dict()
    for key, value in state.items():
        if tuple(params[key].shape) != tuple(value.shape):
            raise UserError(
                f"keras weights: {key} has shape {tuple(value.shape)}, the model {tuple(params[key].shape)}."
            )
    with torch.no_grad():
        model.load_state_dict(state, strict=False)
