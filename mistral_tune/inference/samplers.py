"""keras-hub's samplers, expressed as arguments to transformers' ``generate()``.

Each sampler only translates its parameters; the decoding loops are transformers' own (greedy,
multinomial sampling, beam search). Contrastive search left transformers' core in v5, so
``ContrastiveSampler`` plugs ``mistral_tune.contrastive.contrastive_search`` in through
``generate(custom_generate=...)``.

Example:
    >>> from mistral_tune import MistralCausalLM, TopKSampler
    >>> lm = MistralCausalLM.from_preset("mistral_tiny")
    >>> lm.compile(sampler=TopKSampler(k=10, temperature=0.7, seed=1))
    >>> lm.compile(sampler="greedy")
"""

from __future__ import annotations

import contextlib
import difflib
from collections.abc import Iterator
from typing import Any

from mistral_tune.core.errors import UserError


class Sampler:
    """Base class: ``generate_kwargs()`` gives the transformers arguments, ``rng()`` the seeding scope.

    A keras-style custom sampler subclasses this and overrides ``get_next_token(probabilities)``
    (``[batch, vocab]`` probabilities from ``compute_probabilities``, a torch tensor here) to
    return the next ids ``[batch]``; transformers' loop (cache, padding, stop ids) runs it.

    Example:
        >>> class ForbidTokens(Sampler):
        ...     def __init__(self, forbidden, **kwargs):
        ...         super().__init__(**kwargs)
        ...         self.forbidden = forbidden
        ...     def get_next_token(self, probabilities):
        ...         probabilities[:, self.forbidden] = 0
        ...         return probabilities.argmax(-1)
        >>> lm.compile(sampler=ForbidTokens([415]))
    """

    name = "sampler"

    def __init__(self, temperature: float = 1.0, seed: int | None = None) -> None:
        if temperature <= 0:
            raise UserError(f"{type(self).__name__}: temperature must be > 0, got {temperature}.")
        self.temperature = float(temperature)
        self.seed = seed

    def compute_probabilities(self, logits: Any) -> Any:
        """Softmax of ``logits / temperature`` in float32."""
        import torch

        return torch.softmax(logits.float() / self.temperature, dim=-1)

    def get_next_token(self, probabilities: Any) -> Any:
        """The next ids ``[batch]`` for probabilities ``[batch, vocab]`` (override in a custom sampler)."""
        raise NotImplementedError(f"{type(self).__name__} must override get_next_token(probabilities).")

    def generate_kwargs(self) -> dict[str, Any]:
        """The transformers ``generate`` arguments of a built-in sampler."""
        raise NotImplementedError(f"{type(self).__name__} must override get_next_token(probabilities).")

    def transformers_kwargs(self) -> dict[str, Any]:
        """What ``generate`` passes to transformers: the built-in mapping, or, when a user's class
        overrides ``get_next_token`` (even of a built-in sampler), transformers' greedy loop over
        scores where only ``get_next_token``'s pick survives."""
        defining = next(c for c in type(self).__mro__ if "get_next_token" in vars(c))
        if defining is Sampler or defining.__module__ == __name__:
            return self.generate_kwargs()
        from transformers import LogitsProcessorList

        return {"do_sample": False, "num_beams": 1, "logits_processor": LogitsProcessorList([_PickedToken(self)])}

    def run(self, model: Any, **kwargs: Any) -> Any:
        """The generated ids ``[batch, prompt + new]`` (transformers' ``generate``)."""
        return model.generate(**kwargs)

    @contextlib.contextmanager
    def rng(self) -> Iterator[None]:
        """Seed torch inside the block only, so a seeded sampler repeats itself without touching global state."""
        if self.seed is None:
            yield
            return
        import torch

        devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(self.seed)
            yield

    def get_config(self) -> dict[str, Any]:
        return {k: v for k, v in vars(self).items() if not k.startswith("_")}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> Sampler:
        """A sampler of ``get_config()``'s values; keys its constructor does not take (keras-hub writes
        ``temperature`` for every sampler) are left out."""
        import inspect

        params = inspect.signature(cls.__init__).parameters
        if any(p.kind is p.VAR_KEYWORD for p in params.values()):
            return cls(**config)
        return cls(**{k: v for k, v in config.items() if k in params})

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_config().items())
        return f"{type(self).__name__}({args})"


class GreedySampler(Sampler):
    """Always the most likely token."""

    name = "greedy"

    def __init__(self, temperature: float = 1.0) -> None:
        # keras-hub accepts a temperature here too; dividing logits by it never changes the argmax.
        super().__init__(temperature)

    def generate_kwargs(self) -> dict[str, Any]:
        return {"do_sample": False, "num_beams": 1}

    def get_next_token(self, probabilities: Any) -> Any:
        return probabilities.argmax(-1)


class TopKSampler(Sampler):
    """Sample among the ``k`` most likely tokens (keras-hub's default sampler, k=5)."""

    name = "top_k"

    def __init__(self, k: int = 5, temperature: float = 1.0, seed: int | None = None) -> None:
        super().__init__(temperature, seed)
        if k < 1:
            raise UserError(f"TopKSampler: k must be >= 1, got {k}.")
        self.k = int(k)

    def generate_kwargs(self) -> dict[str, Any]:
        return {"do_sample": True, "num_beams": 1, "top_k": self.k, "top_p": 1.0, "temperature": self.temperature}

    def get_next_token(self, probabilities: Any) -> Any:
        import torch

        top, ids = probabilities.topk(min(self.k, probabilities.shape[-1]), dim=-1)
        return ids.gather(-1, torch.multinomial(top, 1)).squeeze(-1)


class TopPSampler(Sampler):
    """Nucleus sampling: the smallest set of tokens whose probability reaches ``p`` (optionally capped at ``k``)."""

    name = "top_p"

    def __init__(self, p: float = 0.1, k: int | None = None, temperature: float = 1.0, seed: int | None = None) -> None:
        super().__init__(temperature, seed)
        if not 0 < p <= 1:
            raise UserError(f"TopPSampler: p must be in (0, 1], got {p}.")
        self.p, self.k = float(p), k

    def generate_kwargs(self) -> dict[str, Any]:
        # top_k=0 switches transformers' top-k filter off (its default would be 50).
        return {
            "do_sample": True,
            "num_beams": 1,
            "top_p": self.p,
            "top_k": self.k or 0,
            "temperature": self.temperature,
        }


class RandomSampler(Sampler):
    """Sample from the whole distribution."""

    name = "random"

    def generate_kwargs(self) -> dict[str, Any]:
        return {"do_sample": True, "num_beams": 1, "top_k": 0, "top_p": 1.0, "temperature": self.temperature}

    def get_next_token(self, probabilities: Any) -> Any:
        import torch

        return torch.multinomial(probabilities, 1).squeeze(-1)


class BeamSampler(Sampler):
    """Beam search. ``length_penalty=0`` ranks beams by total log-probability, as keras-hub does.

    ``return_all_beams=True``: ``generate`` gives every prompt a list of ``num_beams`` texts, best
    first (keras-hub returns them only from a direct sampler call, with their log-probabilities).
    """

    name = "beam"

    def __init__(self, num_beams: int = 5, return_all_beams: bool = False, length_penalty: float = 0.0) -> None:
        super().__init__()
        if num_beams < 1:
            raise UserError(f"BeamSampler: num_beams must be >= 1, got {num_beams}.")
        self.num_beams, self.length_penalty = int(num_beams), float(length_penalty)
        self.return_all_beams = bool(return_all_beams)

    @property
    def sequences_per_prompt(self) -> int:
        return self.num_beams if self.return_all_beams else 1

    def generate_kwargs(self) -> dict[str, Any]:
        return {
            "do_sample": False,
            "num_beams": self.num_beams,
            "length_penalty": self.length_penalty,
            "num_return_sequences": self.sequences_per_prompt,
        }


class ContrastiveSampler(Sampler):
    """Contrastive search: among the top ``k`` tokens, trade probability against similarity to the context.

    score = (1 - alpha) * p(token) - alpha * max cosine similarity(token's hidden state, earlier ones).
    ``alpha=0`` is greedy decoding.
    """

    name = "contrastive"

    def __init__(self, k: int = 5, alpha: float = 0.6) -> None:
        super().__init__()
        if k < 1 or not 0 <= alpha <= 1:
            raise UserError(f"ContrastiveSampler: need k >= 1 and 0 <= alpha <= 1, got k={k}, alpha={alpha}.")
        self.k, self.alpha = int(k), float(alpha)

    def generate_kwargs(self) -> dict[str, Any]:
        from mistral_tune.inference.contrastive import contrastive_search

        return {
            "do_sample": False,
            "num_beams": 1,
            "custom_generate": contrastive_search,
            "contrastive_k": self.k,
            "contrastive_alpha": self.alpha,
        }


class SpeculativeSampler(Sampler):
    """Speculative decoding: a small ``draft_model`` proposes ``num_speculative_tokens`` tokens, the
    model checks them in one forward pass (transformers' assisted generation).

    Greedy acceptance (no ``base_sampler``) gives exactly the model's greedy text, faster when the
    draft agrees often; with a ``base_sampler`` (top-k/top-p/random) the target's distribution is
    sampled with rejection sampling. keras-hub wires its SpeculativeSampler to Gemma 4 and its
    assistant only; here any causal LM sharing the tokenizer is a draft (a ``MistralCausalLM`` or a
    transformers model).

    Example:
        >>> lm.compile(sampler=SpeculativeSampler(draft_model=small_lm, num_speculative_tokens=4))
    """

    name = "speculative"

    def __init__(
        self,
        draft_model: Any = None,
        num_speculative_tokens: int = 5,
        base_sampler: Any = None,
        seed: int | None = None,
        temperature: float = 1.0,
    ) -> None:
        super().__init__(temperature, seed)
        if num_speculative_tokens < 1:
            raise UserError(f"SpeculativeSampler: num_speculative_tokens must be >= 1, got {num_speculative_tokens}.")
        self.draft_model = draft_model
        self.num_speculative_tokens = int(num_speculative_tokens)
        self.base_sampler = get_sampler(base_sampler) if base_sampler is not None else None
        if self.base_sampler is not None and self.base_sampler.generate_kwargs().get("num_beams", 1) != 1:
            raise UserError("SpeculativeSampler: base_sampler must sample one sequence (not beam search).")

    def generate_kwargs(self) -> dict[str, Any]:
        if self.draft_model is None:
            raise UserError(
                "SpeculativeSampler needs a draft model: SpeculativeSampler(draft_model=small_lm), a smaller "
                "causal LM with the same tokenizer."
            )
        draft = getattr(self.draft_model, "hf_model", self.draft_model)
        base = self.base_sampler.generate_kwargs() if self.base_sampler is not None else {"do_sample": False}
        return {**base, "assistant_model": draft}

    def run(self, model: Any, **kwargs: Any) -> Any:
        """Assisted generation takes one row at a time in transformers; rows are padded back together."""
        import torch

        from mistral_tune.inference.generation import left_pad

        draft = kwargs["assistant_model"]
        saved = draft.generation_config
        draft.generation_config = type(saved)(
            num_assistant_tokens=self.num_speculative_tokens,
            num_assistant_tokens_schedule="constant",
            pad_token_id=kwargs.get("pad_token_id"),
        )
        try:
            rows = []
            ids, mask = kwargs.pop("input_ids"), kwargs.pop("attention_mask")
            for row, row_mask in zip(ids, mask):
                prompt = row[row_mask.bool()][None]
                out = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), **kwargs)
                rows.append((ids.shape[1] - prompt.shape[1], out[0].tolist()))
        finally:
            draft.generation_config = saved
        # Back to the batch's layout: the same left padding as the prompts, new tokens right-padded.
        pad = kwargs.get("pad_token_id") or 0
        width = max(lead + len(r) for lead, r in rows)
        padded = [[pad] * lead + r + [pad] * (width - lead - len(r)) for lead, r in rows]
        return left_pad(padded, pad, ids.device)[0]

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.pop("draft_model")
        config["base_sampler"] = serialize(self.base_sampler) if self.base_sampler is not None else None
        return config

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> Sampler:
        config = dict(config)
        if config.get("base_sampler") is not None:
            config["base_sampler"] = get(config["base_sampler"])
        return cls(**config)


class _PickedToken:
    """A transformers logits processor running a keras-style ``get_next_token``: every score but the
    picked token's becomes -inf, so transformers' greedy step takes that token."""

    def __init__(self, sampler: Sampler) -> None:
        self.sampler = sampler

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        import torch

        picked = self.sampler.get_next_token(self.sampler.compute_probabilities(scores))
        picked = torch.as_tensor(picked, device=scores.device).long().reshape(-1, 1)
        out = torch.full_like(scores, float("-inf"))
        return out.scatter_(-1, picked, 0.0)


SAMPLERS: dict[str, type[Sampler]] = {
    cls.name: cls
    for cls in (
        GreedySampler,
        TopKSampler,
        TopPSampler,
        RandomSampler,
        BeamSampler,
        ContrastiveSampler,
        SpeculativeSampler,
    )
}


def serialize(sampler: Sampler) -> dict[str, Any]:
    """keras's serialized shape: ``{"class_name", "config"}`` (``get`` reads it back)."""
    return {"class_name": type(sampler).__name__, "config": sampler.get_config()}


def deserialize(config: dict[str, Any], custom_objects: dict[str, type] | None = None) -> Sampler:
    """A sampler from ``serialize``'s output; ``custom_objects`` maps names of custom sampler classes."""
    classes = {cls.__name__: cls for cls in SAMPLERS.values()} | (custom_objects or {})
    name = str(config.get("class_name", "")).split(">")[-1]  # keras-hub writes "keras_hub>GreedySampler"
    if name not in classes:
        raise UserError(f"Unknown sampler class {config.get('class_name')!r}; known: {', '.join(sorted(classes))}.")
    return classes[name].from_config(config.get("config") or {})


def get(identifier: Any) -> Sampler:
    """keras-hub's ``samplers.get``: a name, a ``serialize`` dict, a Sampler class, or a Sampler."""
    if isinstance(identifier, dict):
        return deserialize(identifier)
    if isinstance(identifier, type) and issubclass(identifier, Sampler):
        return identifier()
    return get_sampler(identifier)


def get_sampler(sampler: Any) -> Sampler:
    """A sampler from its name (defaults as in keras-hub) or a ``Sampler`` instance."""
    if isinstance(sampler, Sampler):
        return sampler
    if isinstance(sampler, str) and sampler in SAMPLERS:
        return SAMPLERS[sampler]()
    close = difflib.get_close_matches(str(sampler), SAMPLERS, n=1)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    raise UserError(f"Unknown sampler {sampler!r}.{hint} Known samplers: {', '.join(SAMPLERS)}, or a Sampler object.")
