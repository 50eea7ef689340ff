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
    """Base class: ``generate_kwargs()`` gives the transformers arguments, ``rng()`` the seeding scope."""

    name = "sampler"

    def __init__(self, temperature: float = 1.0, seed: int | None = None) -> None:
        if temperature <= 0:
            raise UserError(f"{type(self).__name__}: temperature must be > 0, got {temperature}.")
        self.temperature = float(temperature)
        self.seed = seed

    def generate_kwargs(self) -> dict[str, Any]:
        raise NotImplementedError

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

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_config().items())
        return f"{type(self).__name__}({args})"


class GreedySampler(Sampler):
    """Always the most likely token."""

    name = "greedy"

    def __init__(self) -> None:
        super().__init__()

    def generate_kwargs(self) -> dict[str, Any]:
        return {"do_sample": False, "num_beams": 1}


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


class BeamSampler(Sampler):
    """Beam search. ``length_penalty=0`` ranks beams by total log-probability, as keras-hub does."""

    name = "beam"

    def __init__(self, num_beams: int = 5, length_penalty: float = 0.0) -> None:
        super().__init__()
        if num_beams < 1:
            raise UserError(f"BeamSampler: num_beams must be >= 1, got {num_beams}.")
        self.num_beams, self.length_penalty = int(num_beams), float(length_penalty)

    def generate_kwargs(self) -> dict[str, Any]:
        return {"do_sample": False, "num_beams": self.num_beams, "length_penalty": self.length_penalty}


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


SAMPLERS: dict[str, type[Sampler]] = {
    cls.name: cls for cls in (GreedySampler, TopKSampler, TopPSampler, RandomSampler, BeamSampler, ContrastiveSampler)
}


def get_sampler(sampler: Any) -> Sampler:
    """A sampler from its name (defaults as in keras-hub) or a ``Sampler`` instance."""
    if isinstance(sampler, Sampler):
        return sampler
    if isinstance(sampler, str) and sampler in SAMPLERS:
        return SAMPLERS[sampler]()
    close = difflib.get_close_matches(str(sampler), SAMPLERS, n=1)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    raise UserError(f"Unknown sampler {sampler!r}.{hint} Known samplers: {', '.join(SAMPLERS)}, or a Sampler object.")
