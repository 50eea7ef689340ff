"""transformers internals: Trainer's private checkpoint/grad-norm hooks, config and generation privates."""

from __future__ import annotations

import inspect
from typing import Any

# --- Trainer -----------------------------------------------------------------------------------------

# Our forwarding method -> the private Trainer method it calls (the canary tests check each one).
TRAINER_PRIVATES = {
    "hf_output_dir": "_get_output_dir",
    "hf_save_checkpoint": "_save_checkpoint",
    "hf_grad_norm": "_get_grad_norm",
}


class CheckpointHooks:
    """Trainer mixin: ``Trainer._get_output_dir``/``_save_checkpoint`` forwarded to public-named hooks.

    Override ``checkpoint_output_dir(trial)`` and ``write_checkpoint(model, trial)``; call
    ``hf_output_dir(trial)`` and ``hf_save_checkpoint(model, trial)`` for Trainer's own behaviour.
    """

    def hf_output_dir(self, trial: Any) -> str:
        return super()._get_output_dir(trial)

    def hf_save_checkpoint(self, model: Any, trial: Any) -> None:
        super()._save_checkpoint(model, trial)

    def checkpoint_output_dir(self, trial: Any) -> str:
        return self.hf_output_dir(trial)

    def write_checkpoint(self, model: Any, trial: Any) -> None:
        self.hf_save_checkpoint(model, trial)

    def _get_output_dir(self, trial):
        return self.checkpoint_output_dir(trial)

    def _save_checkpoint(self, model, trial):
        self.write_checkpoint(model, trial)


class GradNormHooks:
    """Trainer mixin: ``Trainer._get_grad_norm`` (clips and returns the norm) forwarded to ``grad_norm_hook``."""

    def hf_grad_norm(self, model: Any, grad_norm: Any = None) -> Any:
        return super()._get_grad_norm(model, grad_norm=grad_norm)

    def grad_norm_hook(self, model: Any, grad_norm: Any = None) -> Any:
        return self.hf_grad_norm(model, grad_norm)

    def _get_grad_norm(self, model, grad_norm=None):
        return self.grad_norm_hook(model, grad_norm=grad_norm)


CHECKPOINT_LOADER = "_load_from_checkpoint"  # Trainer's: loads a checkpoint's weights (adapter or full, sharded)


def load_checkpoint_weights(trainer: Any, checkpoint: str) -> None:
    """Load the model weights of ``checkpoint`` into ``trainer.model`` the way ``train(resume_from_checkpoint=)``
    does, without training (``Trainer._load_from_checkpoint``)."""
    getattr(trainer, CHECKPOINT_LOADER)(checkpoint)


def trainer_output_dir(trainer: Any, trial: Any = None) -> str:
    """Where the trainer writes ``checkpoint-N`` (``Trainer._get_output_dir``)."""
    return trainer._get_output_dir(trial)


# --- configs -----------------------------------------------------------------------------------------


ATTN_IMPLEMENTATION = "_attn_implementation"  # PretrainedConfig's; it has no public twin


def attn_implementation(config: Any) -> str | None:
    """The attention implementation a loaded model runs (``config._attn_implementation``)."""
    return getattr(config, ATTN_IMPLEMENTATION)


# --- attention backends ----------------------------------------------------------------------------


def register_attention(name: str, function: Any, mask: str = "sdpa") -> None:
    """Register an attention backend under ``name`` (transformers' documented ``AttentionInterface``), with the
    attention-mask builder of the existing backend ``mask`` (``AttentionMaskInterface``), so that
    ``from_pretrained(attn_implementation=name)`` runs ``function`` on the masks ``mask`` would get."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    AttentionInterface.register(name, function)
    AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[mask])


def sdpa_attention(module: Any, query: Any, key: Any, value: Any, attention_mask: Any, **kwargs: Any) -> Any:
    """transformers' own ``sdpa`` attention function (``integrations.sdpa_attention.sdpa_attention_forward``)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


# Set by from_pretrained(quantization_config=...) in older transformers; 5.24 no longer sets it (hasattr guards).
PRE_QUANTIZATION_DTYPE = "_pre_quantization_dtype"


def drop_quantization(config: Any) -> None:
    """Remove what ``from_pretrained(quantization_config=...)`` left on a config, so it builds a plain model."""
    for attr in ("quantization_config", PRE_QUANTIZATION_DTYPE):
        if hasattr(config, attr):
            delattr(config, attr)


# --- Mixtral experts ---------------------------------------------------------------------------------

# transformers 5 keeps each Mixtral layer's experts as two 3D parameters of one MixtralExperts module:
# gate_up_proj [experts, 2 x intermediate, hidden] (gate rows first, then up: the checkpoint's w1 then w3)
# and down_proj [experts, hidden, intermediate] (w2); its forward is called as
# experts(hidden_states [tokens, hidden], top_k_index [tokens, k], top_k_weights [tokens, k]).
# On disk (the hub's checkpoints and what save_pretrained writes) each expert keeps one tensor per projection.
EXPERT_PARAMETERS = ("gate_up_proj", "down_proj")
EXPERT_CHECKPOINT_TENSORS = {"gate": "w1", "up": "w3", "down": "w2"}
EXPERT_CHECKPOINT_INFIX = ".block_sparse_moe.experts."


def experts_modules(model: Any) -> list[str]:
    """Names of the Mixtral experts modules of ``model`` (one per MoE layer, e.g. ``model.layers.0.mlp.experts``)."""
    from transformers.models.mixtral.modeling_mixtral import MixtralExperts

    return [name for name, module in model.named_modules() if isinstance(module, MixtralExperts)]


def expert_weights(experts: Any) -> tuple[Any, Any]:
    """(gate_up_proj, down_proj) of a MixtralExperts module, checked against the layout above."""
    gate_up, down = (getattr(experts, name) for name in EXPERT_PARAMETERS)
    n, h, i = down.shape
    if tuple(gate_up.shape) != (n, 2 * i, h) or getattr(experts, "is_transposed", False):
        raise RuntimeError(
            f"MixtralExperts layout changed: gate_up_proj {tuple(gate_up.shape)}, down_proj {tuple(down.shape)}; "
            "mistral_tune.compat.transformers expects [E, 2I, H] and [E, H, I]."
        )
    return gate_up, down


def expert_checkpoint_name(module_name: str, expert: int, projection: str) -> str:
    """The checkpoint tensor (without ``.weight``) of one expert's gate/up/down in the MixtralExperts
    module ``module_name`` (``model.layers.0.mlp.experts`` -> ``model.layers.0.block_sparse_moe.experts.0.w1``)."""
    layer = module_name.removesuffix(".mlp.experts")
    return f"{layer}{EXPERT_CHECKPOINT_INFIX}{expert}.{EXPERT_CHECKPOINT_TENSORS[projection]}"


# --- generation --------------------------------------------------------------------------------------

# generate() hands a custom decoding method the cache under this keyword: ``cache`` from 5.24 on,
# ``past_key_values`` before (5.x up to 5.23).
CACHE_KEYWORDS = ("cache", "past_key_values")


def generation_cache(model_kwargs: dict[str, Any], model: Any = None) -> Any:
    """The cache generate() prepared for a custom decoding method.

    When it made none (transformers 5.0 leaves the cache to the model's forward) and ``model`` is
    given, a new ``DynamicCache`` for that model; else None.
    """
    for key in CACHE_KEYWORDS:
        if model_kwargs.get(key) is not None:
            return model_kwargs[key]
    if model is None:
        return None
    from transformers import DynamicCache

    return DynamicCache(config=model.config.get_text_config(decoder=True))


def cache_argument(model: Any, cache: Any) -> dict[str, Any]:
    """The keyword argument passing ``cache`` to ``model.forward`` (``cache=`` from 5.24, ``past_key_values=`` before)."""
    params = inspect.signature(model.forward).parameters
    return {"cache": cache} if "cache" in params else {"past_key_values": cache}


PAD_TOKEN_TENSOR = "_pad_token_tensor"  # GenerationConfig's, set by generate()


def generation_pad_token(generation_config: Any) -> Any:
    """The pad token tensor generate() resolved (pad, else eos): ``GenerationConfig._pad_token_tensor``."""
    return getattr(generation_config, PAD_TOKEN_TENSOR, None)


def repeat_cache(cache: Any, repeats: int) -> None:
    """Repeat every batch row of a cache ``repeats`` times, in place (``Cache.batch_repeat_interleave``)."""
    cache.batch_repeat_interleave(repeats)


def select_cache(cache: Any, indices: Any) -> None:
    """Keep only the batch rows ``indices`` of a cache, in place (``Cache.batch_select_indices``)."""
    cache.batch_select_indices(indices)


# --- tokenizers --------------------------------------------------------------------------------------


def tekken_to_tokenizers(path: Any) -> Any:
    """A Tekken tokenizer file as a ``tokenizers.Tokenizer``, by transformers' own converter.

    ``transformers.integrations.mistral.MistralConverter`` (transformers 5.x) lays the ranks out as
    mistral-common does (special tokens first) and derives the BPE merges from them. It lives in a
    submodule, not transformers' top-level API, hence here.
    """
    from transformers.integrations.mistral import MistralConverter

    return MistralConverter(vocab_file=str(path)).converted()
