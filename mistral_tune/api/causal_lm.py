"""MistralCausalLM: keras-hub's causal LM API (from_preset, compile, generate, score) on transformers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from mistral_tune.api.backbone import MistralBackbone
from mistral_tune.api.preprocessor import MistralCausalLMPreprocessor
from mistral_tune.core.errors import UserError
from mistral_tune.models.presets import preset_table

DEFAULT_MAX_LENGTH = 1024  # keras-hub's MistralCausalLMPreprocessor sequence_length


class MistralCausalLM(torch.nn.Module):
    """A Mistral backbone with its language-model head, tokenizer and sampler.

    Wraps a ``transformers.MistralForCausalLM`` (``.hf_model``), so every transformers, PEFT and TRL
    tool applies to it directly.

    Example:
        >>> lm = MistralCausalLM.from_preset("mistral_tiny")           # or "hf://org/name", a directory
        >>> lm.compile(sampler="greedy")
        >>> lm.generate("The capital of France is", max_length=32)
        >>> lm.generate([{"role": "user", "content": "Hi!"}], strip_prompt=True)  # chat template applied
        >>> lm.backbone.enable_lora(rank=4)
        >>> lm.save_to_preset("my_preset")                            # HF layout + metadata.json
    """

    #: Built-in presets as keras-hub lists them: id -> {"metadata": {description, params, ...}, handle}.
    presets = preset_table()

    def __init__(self, backbone: MistralBackbone, tokenizer: Any = None) -> None:
        """Put a fresh (randomly initialized) language-model head on ``backbone``.

        ``tokenizer`` (a ``MistralTokenizer``) is needed for text in and out (generate, score on
        strings, perplexity, save_to_preset); without it the model still takes token ids.
        """
        from transformers import MistralForCausalLM

        super().__init__()
        config = backbone.config
        with torch.device("meta"):  # the decoder is the backbone's; only the head is new
            hf_model = MistralForCausalLM(config)
        weight = backbone.token_embedding.weight
        hf_model.model = backbone.model
        hf_model.lm_head = torch.nn.Linear(
            config.hidden_size, config.vocab_size, bias=False, device=weight.device, dtype=weight.dtype
        )
        torch.nn.init.normal_(hf_model.lm_head.weight, std=config.initializer_range)
        self._setup(hf_model, tokenizer, metadata={}, base_preset=None)

    @classmethod
    def _from_hf(cls, hf_model: Any, tokenizer: Any, metadata: dict, base_preset: str | None) -> MistralCausalLM:
        self = cls.__new__(cls)
        torch.nn.Module.__init__(self)
        self._setup(hf_model, tokenizer, metadata, base_preset)
        return self

    def _setup(self, hf_model: Any, tokenizer: Any, metadata: dict, base_preset: str | None) -> None:
        from mistral_tune.inference.samplers import get_sampler

        self.hf_model = hf_model
        self.backbone = MistralBackbone._wrap(hf_model.model, owner=hf_model)
        if tokenizer is not None and tokenizer.vocabulary_size > hf_model.config.vocab_size:
            raise UserError(
                f"The tokenizer has {tokenizer.vocabulary_size} pieces but the model only "
                f"{hf_model.config.vocab_size} embeddings; they do not belong together."
            )
        self.tokenizer = tokenizer
        self.metadata = metadata
        self.base_preset = base_preset
        self.sampler = get_sampler("top_k")
        self.preprocessor = None if tokenizer is None else MistralCausalLMPreprocessor(tokenizer, DEFAULT_MAX_LENGTH)

    @classmethod
    def from_preset(
        cls,
        preset: str,
        load_weights: bool = True,
        *,
        dtype: Any = "auto",
        attn_implementation: str = "auto",
        revision: str | None = None,
        allow_pickle: bool = False,
        seed: int = 0,
        sequence_length: int | None = None,
    ) -> MistralCausalLM:
        """Load a preset: a built-in id (see ``MistralCausalLM.presets``), ``hf://org/name``,
        ``kaggle://owner/model/framework/variation`` (needs kagglehub) or a local directory.

        Args:
            load_weights: False builds the architecture with random weights (seeded by ``seed``)
                and downloads no weights. Inside ``with torch.device("meta"):`` nothing is allocated.
            dtype: auto (bf16 on a bf16 GPU, else fp32) | float32 | bfloat16 | float16, or the
                ``torch.dtype`` itself (``torch.bfloat16``).
            attn_implementation: auto | flash_attention_2 | flex_attention | sdpa_packed | sdpa | eager.
            revision: hub branch, tag or commit.
            allow_pickle: accept .bin/.pt weights (they can run code on load).
            sequence_length: the preprocessor's ``sequence_length`` (default 1024), which is also
                ``generate``'s default ``max_length``, as in keras-hub.
        """
        from mistral_tune.models.from_preset import load_preset_model

        model, tokenizer, metadata, base = load_preset_model(
            preset,
            load_weights,
            dtype=dtype,
            attn_implementation=attn_implementation,
            revision=revision,
            allow_pickle=allow_pickle,
            seed=seed,
        )
        lm = cls._from_hf(model, tokenizer, metadata, base)
        sequence_length = sequence_length or metadata.get("sequence_length")  # a keras preprocessor.json's
        if sequence_length is not None:
            lm.preprocessor.sequence_length = int(sequence_length)
        return lm

    def _text_tokenizer(self) -> Any:
        if self.tokenizer is None:
            raise UserError(
                "This MistralCausalLM has no tokenizer; pass one (MistralCausalLM(backbone, tokenizer)) "
                "or load with from_preset."
            )
        return self.tokenizer

    def compile(self, sampler: Any = "top_k") -> None:
        """Choose the sampler ``generate`` uses: a name (greedy, top_k, top_p, random, beam,
        contrastive) with keras-hub's defaults, or a ``Sampler`` object with parameters."""
        from mistral_tune.inference.samplers import get_sampler

        self.sampler = get_sampler(sampler)

    def forward(self, inputs: dict | None = None, *, token_ids: Any = None, padding_mask: Any = None):
        """Logits ``[batch, seq, vocabulary_size]`` for ``{"token_ids", "padding_mask"}``."""
        from mistral_tune.inference.scoring import batch_logits

        if inputs is not None:
            token_ids, padding_mask = inputs["token_ids"], inputs.get("padding_mask")
        return batch_logits(self.hf_model, token_ids, padding_mask)[0]

    def generate(
        self,
        inputs: Any,
        max_length: int | None = None,
        stop_token_ids: Any = "auto",
        strip_prompt: bool = False,
    ) -> Any:
        """Generate text for a string, a conversation, or a list of them (batched, left-padded).

        Args:
            inputs: a str; a conversation (list of ``{"role", "content"}`` dicts, formatted with the
                preset's chat template, the same definition training uses); a list of those; or
                keras-hub's preprocessed ``{"token_ids", "padding_mask"}`` (right-padded), which is
                continued up to its width and returned in the same shape.
            max_length: each row's prompt + new tokens (keras-hub's meaning: in a batch every row is
                filled to it); default the preprocessor's ``sequence_length`` (1024).
            stop_token_ids: "auto" = the tokenizer's EOS, not part of the text; None = run to
                ``max_length``; a tuple of ids = stop at any of them, the stop token kept in the
                text (as keras-hub; BOS/EOS never show).
            strip_prompt: return only the new text.

        Returns a str for a single input, else a list of str (with ``BeamSampler(return_all_beams=True)``
        a list of ``num_beams`` texts, best first, in place of each str).
        """
        from mistral_tune.inference.generation import (
            encode_inputs,
            generate_ids,
            generate_token_dict,
            is_token_dict,
            normalize_inputs,
            resolve_stop_ids,
        )

        if is_token_dict(inputs):
            if stop_token_ids == "auto" and self.tokenizer is None:
                raise UserError('stop_token_ids="auto" needs a tokenizer; pass stop_token_ids=None or ids.')
            ids_tokenizer = self.tokenizer or _NoTokenizer(self.hf_model.config.vocab_size)
            return generate_token_dict(
                self.hf_model,
                ids_tokenizer,
                inputs,
                sampler=self.sampler,
                stop_ids=resolve_stop_ids(stop_token_ids, ids_tokenizer),
                strip_prompt=strip_prompt,
            )
        prompts, single = normalize_inputs(inputs)
        tokenizer = self._text_tokenizer()
        prompt_ids = encode_inputs(tokenizer, prompts)
        if max_length is None:
            default = self.preprocessor.sequence_length if self.preprocessor is not None else DEFAULT_MAX_LENGTH
            max_length = min(default, self.hf_model.config.max_position_embeddings)
        new_ids = generate_ids(
            self.hf_model,
            tokenizer,
            prompt_ids,
            sampler=self.sampler,
            max_length=int(max_length),
            stop_ids=resolve_stop_ids(stop_token_ids, tokenizer),
        )
        per_prompt = len(new_ids) // len(prompt_ids)
        texts = [
            tokenizer.decode(new if strip_prompt else prompt_ids[i // per_prompt] + new)
            for i, new in enumerate(new_ids)
        ]
        if per_prompt > 1:
            texts = [texts[i : i + per_prompt] for i in range(0, len(texts), per_prompt)]
        return texts[0] if single else texts

    def score(
        self,
        inputs: Any = None,
        padding_mask: Any = None,
        scoring_mode: str = "log_likelihood",
        layer_intercept_fn: Any = None,
        target_ids: Any = None,
        *,
        token_ids: Any = None,
    ):
        """Score sequences.

        With ``target_ids`` (keras-hub's semantics): "loss" is the per-position cross-entropy of
        ``target_ids[:, t]`` under the logits at position ``t`` (pass ids rolled left by one for
        next-token loss), "log_likelihood" its negative. Without ``target_ids`` (ours):
        "log_likelihood" ``[batch, seq]`` is log p(token_t | tokens before t), 0 at position 0
        and on padding, and "loss" its negative. "logits" gives ``[batch, seq, vocab]``.

        ``inputs`` (or ``token_ids=``) is a str, a list of str (tokenized with BOS, left-padded),
        or token ids with an optional ``padding_mask``. ``layer_intercept_fn(x, i)`` sees and may
        replace the embeddings (``i=-1``) and each decoder layer's output (``i=0..n-1``); with it,
        autograd stays on so gradients reach what it captured.
        """
        from mistral_tune.inference.scoring import score

        inputs = token_ids if inputs is None else inputs
        texts = isinstance(inputs, str) or (isinstance(inputs, (list, tuple)) and inputs and isinstance(inputs[0], str))
        tokenizer = self._text_tokenizer() if texts else self.tokenizer
        return score(
            self.hf_model,
            tokenizer,
            inputs,
            padding_mask,
            scoring_mode,
            layer_intercept_fn=layer_intercept_fn,
            target_ids=target_ids,
        )

    def perplexity(
        self, data: Any, batch_size: int = 8, max_length: int | None = None, text_field: str = "text"
    ) -> dict[str, Any]:
        """Perplexity over texts (a list of str, or a datasets.Dataset / list of dicts with ``text_field``).

        Returns {"perplexity", "loss" (mean NLL per predicted token), "tokens", "sequences",
        "truncated", "empty"}: texts longer than ``max_length`` tokens are truncated and counted.
        """
        from mistral_tune.inference.scoring import perplexity

        max_length = max_length or min(DEFAULT_MAX_LENGTH, self.hf_model.config.max_position_embeddings)
        return perplexity(self.hf_model, self._text_tokenizer(), data, batch_size, max_length, text_field)

    def count_params(self) -> int:
        """Number of parameters (keras naming), LoRA weights included when enabled."""
        return sum(p.numel() for p in self.hf_model.parameters())

    def enable_lora(self, rank: int, target_layer_names: Any = None, alpha: float | None = None) -> None:
        """Same as ``self.backbone.enable_lora`` (freeze all, LoRA on q/v projections by default)."""
        self.backbone.enable_lora(rank, target_layer_names, alpha=alpha)

    def save_to_preset(self, preset_dir: str | Path, provenance: dict | None = None) -> Path:
        """Write a preset directory: Hugging Face layout files + ``metadata.json``.

        LoRA, when enabled, is merged into the written weights (the model in memory keeps its
        adapter). ``from_preset(dir)`` and ``transformers.AutoModelForCausalLM.from_pretrained(dir)``
        both load the result.
        """
        from mistral_tune.export.preset import write_preset

        if provenance is None:
            provenance = self.metadata.get("provenance")
        return write_preset(
            self.hf_model, self._text_tokenizer(), Path(preset_dir), base_preset=self.base_preset, provenance=provenance
        )

    # ---- keras-hub's task API, in a PyTorch shape ------------------------------------------------------

    def fit(
        self,
        x: Any,
        epochs: float = 1,
        batch_size: int = 8,
        *,
        overrides: tuple[str, ...] | list[str] = (),
        output_dir: str | Path | None = None,
        callbacks: tuple = (),
    ) -> dict[str, Any]:
        """Fine-tune this model in place with mistral-tune's SFT trainer (the CLI's TRL path).

        ``x``: strings (loss on every token), conversations (loss on the assistant turns, the
        chat template of training) or dict rows of any supported format. With ``enable_lora``
        only the LoRA factors train, else every weight. ``overrides`` are recipe keys
        (``"train.learning_rate=1e-4"``); sequences are cut at ``preprocessor.sequence_length``.
        Returns the history: ``{"loss": [per logging step], "train_loss", "steps", ...}``.

        Example:
            >>> lm.backbone.enable_lora(rank=4)
            >>> lm.fit(["The sky is blue.", "Grass is green."], epochs=2, batch_size=2)
        """
        from mistral_tune.api.fitting import run_trainer

        return run_trainer(
            self,
            x,
            train=True,
            epochs=epochs,
            batch_size=batch_size,
            overrides=overrides,
            output_dir=output_dir,
            callbacks=callbacks,
        )

    def evaluate(self, x: Any, batch_size: int = 8, *, overrides: tuple[str, ...] | list[str] = ()) -> dict[str, Any]:
        """The trainer's loss on ``x`` (the examples ``fit`` takes), without training: ``{"loss", "examples"}``."""
        from mistral_tune.api.fitting import run_trainer

        return run_trainer(
            self, x, train=False, epochs=1, batch_size=batch_size, overrides=overrides, output_dir=None, callbacks=()
        )

    def predict(self, x: Any, batch_size: int = 8) -> torch.Tensor:
        """Logits ``[batch, sequence_length, vocab]`` for strings (the preprocessor's packing, right-padded)
        or ``{"token_ids", "padding_mask"}``, computed ``batch_size`` rows at a time without gradients."""
        from mistral_tune.inference.generation import is_token_dict
        from mistral_tune.inference.scoring import batch_logits

        if not is_token_dict(x):
            if self.preprocessor is None:
                raise UserError("predict() on text needs a preprocessor; pass {'token_ids', 'padding_mask'}.")
            x = self.preprocessor.generate_preprocess([x] if isinstance(x, str) else list(x))
        ids, mask = torch.as_tensor(x["token_ids"]), x.get("padding_mask")
        mask = torch.ones_like(ids) if mask is None else torch.as_tensor(mask)
        was_training = self.hf_model.training
        self.hf_model.eval()
        try:
            with torch.no_grad():
                parts = [
                    batch_logits(self.hf_model, ids[i : i + batch_size], mask[i : i + batch_size])[0]
                    for i in range(0, ids.shape[0], batch_size)
                ]
        finally:
            self.hf_model.train(was_training)
        return torch.cat(parts)

    def quantize(self, mode: str = "int8") -> None:
        """Quantize the linear layers in place: "int8" (torchao weight-only int8, CPU and GPU) or
        "int4" (torchao weight-only int4, needs a CUDA GPU). The LM head stays as it is."""
        from mistral_tune.adapters.quantization import quantize_in_place

        quantize_in_place(self.hf_model, mode)

    def save_lora_weights(self, path: str | Path) -> Path:
        """Write the LoRA adapter (PEFT's ``adapter_config.json`` + ``adapter_model.safetensors``) to a directory."""
        return self.backbone.save_lora_weights(path)

    def load_lora_weights(self, path: str | Path) -> None:
        """Load a PEFT adapter directory (ours or any PEFT LoRA on the same targets) into this model."""
        self.backbone.load_lora_weights(path)

    def export_to_transformers(self, path: str | Path) -> Path:
        """Hugging Face layout (safetensors, config, tokenizer, generation config), LoRA merged in:
        our export, the same files as ``save_to_preset`` plus its ``metadata.json``."""
        return self.save_to_preset(path)

    def summary(self, print_fn: Any = print) -> str:
        """A table of the top-level blocks with their parameter counts (total and trainable)."""
        from mistral_tune.api.backbone import summary_table

        text = summary_table(type(self).__name__, self.hf_model)
        if print_fn is not None:
            print_fn(text)
        return text

    def get_config(self) -> dict[str, Any]:
        """keras-hub's shape: the backbone's arguments and the preprocessor's settings (weights excluded)."""
        tok = self.tokenizer
        return {
            "backbone": self.backbone.get_config(),
            "preprocessor": self.preprocessor.get_config() if self.preprocessor is not None else None,
            "tokenizer": None if tok is None else {"proto": str(tok.model_file), "chat_template": tok.chat_template},
        }

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> MistralCausalLM:
        """A new, randomly initialized model of ``get_config()``'s architecture (and tokenizer, if a path)."""
        from mistral_tune.models.tokenizer import MistralTokenizer

        tok = config.get("tokenizer")
        tokenizer = MistralTokenizer(proto=tok["proto"], chat_template=tok["chat_template"]) if tok else None
        lm = cls(MistralBackbone.from_config(config["backbone"]), tokenizer)
        if lm.preprocessor is not None and config.get("preprocessor"):
            lm.preprocessor.sequence_length = config["preprocessor"]["sequence_length"]
        return lm


class _NoTokenizer:
    """What generation needs of a tokenizer when a model has none (token-id input only)."""

    def __init__(self, vocabulary_size: int) -> None:
        self.vocabulary_size = vocabulary_size
        self.pad_id = 0
        self.bos_id = None
