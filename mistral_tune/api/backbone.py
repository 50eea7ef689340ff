"""MistralBackbone: keras-hub's backbone API over transformers' ``MistralModel``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from mistral_tune.core.errors import UserError
from mistral_tune.models.presets import preset_table


def _as_tensor(value: Any, device: torch.device) -> torch.Tensor:
    return value.to(device) if isinstance(value, torch.Tensor) else torch.as_tensor(value, device=device)


class MistralBackbone(torch.nn.Module):
    """The Mistral decoder (embeddings, decoder layers, final RMSNorm), with keras-hub's argument names.

    The arguments map onto ``transformers.MistralConfig``: ``vocabulary_size`` -> ``vocab_size``,
    ``num_layers`` -> ``num_hidden_layers``, ``num_query_heads`` -> ``num_attention_heads``,
    ``hidden_dim`` -> ``hidden_size``, ``intermediate_dim`` -> ``intermediate_size``,
    ``rope_max_wavelength`` -> RoPE theta, ``rope_scaling_factor`` -> linear RoPE scaling,
    ``layer_norm_epsilon`` -> ``rms_norm_eps``, ``dropout`` -> ``attention_dropout``. ``head_dim``
    defaults to ``hidden_dim // num_query_heads``, as in keras-hub (Mistral Nemo sets 128 apart).

    Calling it on ``{"token_ids": [batch, seq], "padding_mask": [batch, seq]}`` returns the final
    hidden states ``[batch, seq, hidden_dim]``. Position ids skip padding, so a left-padded row gives
    the same states as the row alone.

    Example:
        >>> backbone = MistralBackbone(vocabulary_size=10, num_layers=2, num_query_heads=4, hidden_dim=16,
        ...                            intermediate_dim=32, num_key_value_heads=2, sliding_window=8)
        >>> backbone({"token_ids": [[1, 5, 7]], "padding_mask": [[1, 1, 1]]}).shape
        torch.Size([1, 3, 16])
        >>> backbone.enable_lora(rank=4)  # freezes everything, trains LoRA on q_proj/v_proj
    """

    #: Built-in presets as keras-hub lists them (the same table as ``MistralCausalLM.presets``).
    presets = preset_table()

    def __init__(
        self,
        vocabulary_size: int,
        num_layers: int,
        num_query_heads: int,
        hidden_dim: int,
        intermediate_dim: int,
        num_key_value_heads: int,
        rope_max_wavelength: float = 10000,
        rope_scaling_factor: float = 1.0,
        layer_norm_epsilon: float = 1e-6,
        sliding_window: int | None = 512,
        head_dim: int | None = None,
        dropout: float = 0,
        dtype: Any = None,
        attn_implementation: str = "auto",
    ) -> None:
        from transformers import MistralConfig, MistralModel

        from mistral_tune.models.attention import pick_attn_implementation
        from mistral_tune.models.presets import config_from_keras

        if (head_dim is None and hidden_dim % num_query_heads) or num_query_heads % num_key_value_heads:
            raise UserError(
                f"hidden_dim ({hidden_dim}) must divide by num_query_heads ({num_query_heads}) unless head_dim "
                f"is given, and num_query_heads by num_key_value_heads ({num_key_value_heads})."
            )
        args = dict(
            vocabulary_size=vocabulary_size,
            num_layers=num_layers,
            num_query_heads=num_query_heads,
            hidden_dim=hidden_dim,
            intermediate_dim=intermediate_dim,
            num_key_value_heads=num_key_value_heads,
            rope_max_wavelength=rope_max_wavelength,
            rope_scaling_factor=rope_scaling_factor,
            layer_norm_epsilon=layer_norm_epsilon,
            sliding_window=sliding_window,
            head_dim=head_dim,
            dropout=dropout,
        )
        config = MistralConfig(
            **config_from_keras(args), attn_implementation=pick_attn_implementation(attn_implementation)
        )
        model = MistralModel(config)
        if dtype is not None:
            model = model.to(getattr(torch, dtype) if isinstance(dtype, str) else dtype)
        super().__init__()
        self._attach(model, owner=None)

    @classmethod
    def _wrap(cls, model: Any, owner: Any = None) -> MistralBackbone:
        """Wrap an existing ``MistralModel`` (``owner``: the causal LM that holds it, if any)."""
        self = cls.__new__(cls)
        torch.nn.Module.__init__(self)
        self._attach(model, owner)
        return self

    def _attach(self, model: Any, owner: Any) -> None:
        self.model = model
        # A plain attribute, not a submodule: the causal LM registers the backbone, not the reverse.
        self.__dict__["_owner"] = owner
        self.__dict__["_peft"] = None

    @classmethod
    def from_preset(cls, preset: str, load_weights: bool = True, **kwargs: Any) -> MistralBackbone:
        """The backbone of a preset id, ``hf://org/name``, ``kaggle://...`` or a local preset directory.

        ``load_weights=False`` builds the architecture with random weights and downloads nothing
        but a config. Keyword arguments: ``dtype``, ``attn_implementation``, ``revision``,
        ``allow_pickle``, ``seed`` (see ``MistralCausalLM.from_preset``).
        """
        from mistral_tune.models.from_preset import load_preset_model

        model, *_ = load_preset_model(preset, load_weights, **kwargs)
        return cls._wrap(model.model)

    @property
    def config(self) -> Any:
        """The transformers ``MistralConfig``."""
        return self.model.config

    @property
    def token_embedding(self) -> torch.nn.Embedding:
        """The input embedding table ``[vocabulary_size, hidden_dim]``."""
        return self.model.embed_tokens

    # keras-hub attribute names, read from the config.
    vocabulary_size = property(lambda self: self.config.vocab_size)
    num_layers = property(lambda self: self.config.num_hidden_layers)
    num_query_heads = property(lambda self: self.config.num_attention_heads)
    num_key_value_heads = property(lambda self: self.config.num_key_value_heads)
    hidden_dim = property(lambda self: self.config.hidden_size)
    intermediate_dim = property(lambda self: self.config.intermediate_size)
    sliding_window = property(lambda self: self.config.sliding_window)
    head_dim = property(lambda self: self.config.head_dim)

    def forward(self, inputs: dict | None = None, *, token_ids: Any = None, padding_mask: Any = None):
        """Hidden states for ``{"token_ids", "padding_mask"}`` (or the same as keyword arguments)."""
        from mistral_tune.inference.generation import positions_from_mask

        if inputs is not None:
            token_ids, padding_mask = inputs["token_ids"], inputs.get("padding_mask")
        device = self.token_embedding.weight.device
        token_ids = _as_tensor(token_ids, device).long()
        mask = torch.ones_like(token_ids) if padding_mask is None else _as_tensor(padding_mask, device).long()
        out = self.model(input_ids=token_ids, attention_mask=mask, position_ids=positions_from_mask(mask))
        return out.last_hidden_state

    def count_params(self) -> int:
        """Number of parameters (keras naming)."""
        return sum(p.numel() for p in self.parameters())

    @property
    def trainable_weights(self) -> list[torch.nn.Parameter]:
        """The parameters that train (keras naming): after ``enable_lora``, the LoRA factors only."""
        return [p for p in self.model.parameters() if p.requires_grad]

    @property
    def lora_enabled(self) -> bool:
        return self._peft is not None

    def enable_lora(self, rank: int, target_layer_names: Any = None, *, alpha: float | None = None) -> None:
        """Freeze every weight and add trainable LoRA (PEFT) of ``rank`` to the named projections.

        ``target_layer_names``: keras-hub's layer names (``query``, ``key``, ``value``,
        ``attention_output``, ``feedforward_gate_dense``, ``feedforward_intermediate_dense``,
        ``feedforward_output_dense``; ``query_dense``/``value_dense`` are aliases) or transformers'
        (``q_proj``, ...). Default: query and value, as in keras-hub. ``alpha`` defaults to ``rank``
        (update scale 1, as keras-hub's LoRA layers). The adapter is injected in place, so the causal
        LM owning this backbone trains and generates with it.

        The parameterization is standard LoRA, ``W + B A`` with ``A: [rank, in]`` and ``B: [out, rank]``
        per projection. keras-hub factors its ``[hidden, heads, head_dim]`` attention kernels on the
        last axis only (``A: [hidden, heads, rank]``, ``B: [rank, head_dim]``), so the same rank
        trains more parameters there (13,312 against 7,168 on mistral_tiny); docs/models.md.
        """
        from peft import LoraConfig, get_peft_model

        if self._peft is not None:
            raise UserError("LoRA is already enabled on this backbone.")
        if rank < 1:
            raise UserError(f"enable_lora: rank must be >= 1, got {rank}.")
        targets = lora_targets(target_layer_names)
        target = self._owner if self._owner is not None else self.model
        target.requires_grad_(False)
        config = LoraConfig(
            r=rank,
            lora_alpha=alpha or rank,
            lora_dropout=0.0,
            target_modules=targets,
            task_type="CAUSAL_LM" if self._owner is not None else None,
        )
        self.__dict__["_peft"] = get_peft_model(target, config)

    def save_lora_weights(self, path: str | Path) -> Path:
        """Write the LoRA factors as a PEFT adapter directory (``adapter_config.json`` +
        ``adapter_model.safetensors``); keras-hub writes one ``.lora.h5`` file instead."""
        if self._peft is None:
            raise UserError("There are no LoRA weights to save: call enable_lora(rank) first.")
        self._peft.save_pretrained(str(path))
        return Path(path)

    def load_lora_weights(self, path: str | Path) -> None:
        """Load a PEFT adapter directory: enables LoRA with its rank and targets if it is off; if it is
        on, the ranks must match (as in keras-hub)."""
        import json

        from peft import PeftModel, load_peft_weights, set_peft_model_state_dict

        config_file = Path(path) / "adapter_config.json"
        if not config_file.is_file():
            raise UserError(f"{path} is not a PEFT adapter directory (no adapter_config.json).")
        rank = json.loads(config_file.read_text(encoding="utf-8"))["r"]
        if self._peft is None:
            target = self._owner if self._owner is not None else self.model
            target.requires_grad_(False)
            self.__dict__["_peft"] = PeftModel.from_pretrained(target, str(path), is_trainable=True)
            return
        current = self._peft.peft_config["default"].r
        if current != rank:
            raise UserError(f"{path} holds rank-{rank} LoRA weights, but enable_lora(rank={current}) is on.")
        set_peft_model_state_dict(self._peft, load_peft_weights(str(path)))

    def get_config(self) -> dict[str, Any]:
        """The constructor's arguments (keras-hub's names), as ``from_config`` takes them."""
        c = self.config
        rope = getattr(c, "rope_parameters", None) or {}
        return {
            "vocabulary_size": c.vocab_size,
            "num_layers": c.num_hidden_layers,
            "num_query_heads": c.num_attention_heads,
            "hidden_dim": c.hidden_size,
            "intermediate_dim": c.intermediate_size,
            "num_key_value_heads": c.num_key_value_heads,
            "rope_max_wavelength": rope.get("rope_theta", getattr(c, "rope_theta", 10000.0)),
            "rope_scaling_factor": rope.get("factor", 1.0) if rope.get("rope_type") == "linear" else 1.0,
            "layer_norm_epsilon": c.rms_norm_eps,
            "sliding_window": c.sliding_window,
            "head_dim": c.head_dim,
            "dropout": c.attention_dropout,
            "dtype": str(self.token_embedding.weight.dtype).removeprefix("torch."),
        }

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> MistralBackbone:
        """A new, randomly initialized backbone of ``get_config()``'s arguments."""
        return cls(**config)

    def summary(self, print_fn: Any = print) -> str:
        text = summary_table(type(self).__name__, self.model)
        if print_fn is not None:
            print_fn(text)
        return text


# keras-hub's layer names in a Mistral decoder -> the transformers module names PEFT targets.
KERAS_LORA_NAMES = {
    "query": "q_proj",
    "query_dense": "q_proj",
    "key": "k_proj",
    "key_dense": "k_proj",
    "value": "v_proj",
    "value_dense": "v_proj",
    "attention_output": "o_proj",
    "output_dense": "o_proj",
    "feedforward_gate_dense": "gate_proj",
    "feedforward_intermediate_dense": "up_proj",
    "feedforward_output_dense": "down_proj",
}
HF_LORA_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def lora_targets(names: Any) -> list[str]:
    """transformers module names for keras-hub (or transformers) layer names; default query and value."""
    if names is None:
        return ["q_proj", "v_proj"]
    if isinstance(names, str):
        names = [names]
    out = []
    for name in names:
        hf = KERAS_LORA_NAMES.get(name, name if name in HF_LORA_NAMES else None)
        if hf is None:
            known = ", ".join(sorted(KERAS_LORA_NAMES) + list(HF_LORA_NAMES))
            raise UserError(f"enable_lora: unknown layer name {name!r}; known: {known}.")
        if hf not in out:
            out.append(hf)
    if not out:
        raise UserError("enable_lora: target_layer_names is empty.")
    return out


def summary_table(title: str, model: torch.nn.Module) -> str:
    """Top-level blocks (embeddings, each decoder layer, norm, head) with parameter counts."""
    base = getattr(model, "model", model)
    blocks = [(f"model.{name}", module) for name, module in base.named_children()]
    if base is not model:
        blocks += [(name, module) for name, module in model.named_children() if name != "model"]
    rows = []
    for name, module in blocks:
        children = list(module.named_children()) if isinstance(module, torch.nn.ModuleList) else [(None, module)]
        for child, sub in children:
            label = name if child is None else f"{name}.{child}"
            params = list(sub.parameters())
            rows.append(
                (
                    label,
                    type(sub).__name__,
                    sum(p.numel() for p in params),
                    sum(p.numel() for p in params if p.requires_grad),
                )
            )
    rows = [r for r in rows if r[2]]
    width = max(len(r[0]) for r in rows) + 2
    lines = [f"{title}", f"{'layer':<{width}}{'type':<28}{'params':>14}{'trainable':>14}"]
    lines += [f"{n:<{width}}{t:<28}{p:>14,}{tr:>14,}" for n, t, p, tr in rows]
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    lines.append(f"Total params: {total:,}  Trainable: {trainable:,}  Non-trainable: {total - trainable:,}")
    return "\n".join(lines)
