"""MistralBackbone: keras-hub's backbone API over transformers' ``MistralModel``."""

from __future__ import annotations

from typing import Any

import torch

from mistral_tune.core.errors import UserError


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

    def enable_lora(self, rank: int, alpha: float | None = None) -> None:
        """Freeze every weight and add trainable LoRA (PEFT) of ``rank`` to the query and value projections.

        ``alpha`` defaults to ``rank`` (update scale 1, as keras-hub's LoRA layers). The adapter is
        injected in place, so the causal LM owning this backbone trains and generates with it.
        """
        from peft import LoraConfig, get_peft_model

        if self._peft is not None:
            raise UserError("LoRA is already enabled on this backbone.")
        if rank < 1:
            raise UserError(f"enable_lora: rank must be >= 1, got {rank}.")
        target = self._owner if self._owner is not None else self.model
        target.requires_grad_(False)
        config = LoraConfig(
            r=rank,
            lora_alpha=alpha or rank,
            lora_dropout=0.0,
            target_modules=["q_proj", "v_proj"],
            task_type="CAUSAL_LM" if self._owner is not None else None,
        )
        self.__dict__["_peft"] = get_peft_model(target, config)
