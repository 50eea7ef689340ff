"""MistralCausalLMPreprocessor: keras-hub's preprocessor for the causal LM, on torch tensors."""

from __future__ import annotations

from typing import Any

import torch

from mistral_tune.core.errors import UserError


class MistralCausalLMPreprocessor:
    """Strings -> ``{"token_ids", "padding_mask"}`` (BOS added, right-padded with ``tokenizer.pad_id``).

    As in keras-hub: calling it packs each text to ``sequence_length + 1`` tokens (BOS, text, EOS)
    and returns ``(x, y, sample_weight)`` shifted by one for next-token training;
    ``generate_preprocess`` gives a prompt without EOS, and ``generate_postprocess`` turns generated
    ids back into text. Outputs are torch tensors (keras-hub returns backend tensors).

    Example:
        >>> pre = MistralCausalLMPreprocessor(tokenizer, sequence_length=8)
        >>> x, y, w = pre(["The quick brown fox"])
        >>> x["token_ids"].shape, y.shape
        (torch.Size([1, 8]), torch.Size([1, 8]))
        >>> pre.generate_preprocess("The quick")["padding_mask"].sum()
        tensor(3)
    """

    def __init__(
        self,
        tokenizer: Any,
        sequence_length: int = 1024,
        add_start_token: bool = True,
        add_end_token: bool = True,
    ) -> None:
        if sequence_length < 1:
            raise UserError(f"sequence_length must be >= 1, got {sequence_length}.")
        self.tokenizer = tokenizer
        self.sequence_length = int(sequence_length)
        self.add_start_token = add_start_token
        self.add_end_token = add_end_token

    def _pack(self, texts: list[str], length: int, add_end: bool) -> dict[str, torch.Tensor]:
        tok = self.tokenizer
        rows = []
        for ids in tok.tokenize(texts):
            ids = ([tok.bos_id] if self.add_start_token else []) + ids + ([tok.eos_id] if add_end else [])
            rows.append(ids[:length])  # keras-hub truncates from the end, EOS included
        token_ids = torch.full((len(rows), length), tok.pad_id, dtype=torch.long)
        padding_mask = torch.zeros((len(rows), length), dtype=torch.bool)
        for i, ids in enumerate(rows):
            token_ids[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            padding_mask[i, : len(ids)] = True
        return {"token_ids": token_ids, "padding_mask": padding_mask}

    @staticmethod
    def _texts(x: Any) -> tuple[list[str], bool]:
        if isinstance(x, str):
            return [x], True
        if isinstance(x, (list, tuple)) and all(isinstance(t, str) for t in x):
            return list(x), False
        raise UserError(f"The preprocessor takes a str or a list of str; got {type(x).__name__}.")

    def __call__(self, x: Any, y: Any = None, sample_weight: Any = None, sequence_length: int | None = None):
        """``(x, y, sample_weight)``: inputs, next-token labels and the labels' mask, each ``[batch, length]``."""
        if y is not None or sample_weight is not None:
            raise UserError("A causal LM learns from its inputs: pass only x (y and sample_weight are derived).")
        texts, single = self._texts(x)
        packed = self._pack(texts, (sequence_length or self.sequence_length) + 1, self.add_end_token)
        ids, mask = packed["token_ids"], packed["padding_mask"]
        features = {"token_ids": ids[:, :-1], "padding_mask": mask[:, :-1]}
        labels, weights = ids[:, 1:], mask[:, 1:]
        if single:
            features = {k: v[0] for k, v in features.items()}
            labels, weights = labels[0], weights[0]
        return features, labels, weights

    def generate_preprocess(self, x: Any, sequence_length: int | None = None) -> dict[str, torch.Tensor]:
        """A prompt: BOS + text, no EOS, right-padded to ``sequence_length`` (default: the preprocessor's)."""
        texts, single = self._texts(x)
        packed = self._pack(texts, sequence_length or self.sequence_length, add_end=False)
        return {k: v[0] for k, v in packed.items()} if single else packed

    def generate_postprocess(self, x: dict[str, Any]) -> Any:
        """Text of ``{"token_ids", "padding_mask"}``: padding, BOS and EOS removed (keras-hub's rule)."""
        tok = self.tokenizer
        ids = torch.as_tensor(x["token_ids"])
        mask = torch.as_tensor(x["padding_mask"]).bool()
        single = ids.dim() == 1
        ids, mask = (ids[None], mask[None]) if single else (ids, mask)
        keep = mask & (ids != tok.bos_id) & (ids != tok.eos_id)
        texts = [tok.detokenize(row[m].tolist()) for row, m in zip(ids, keep)]
        return texts[0] if single else texts

    def get_config(self) -> dict[str, Any]:
        return {
            "sequence_length": self.sequence_length,
            "add_start_token": self.add_start_token,
            "add_end_token": self.add_end_token,
        }

    def __repr__(self) -> str:
        return f"MistralCausalLMPreprocessor(sequence_length={self.sequence_length})"
