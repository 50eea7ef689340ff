import os

import pytest

# Tests never reach a model hub: an unroutable local endpoint makes hub calls fail at once, the same
# way they do on an offline machine, whatever the network around CI looks like.
os.environ.setdefault("HF_ENDPOINT", "http://127.0.0.1:9")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture
def compose():
    """Compose a recipe exactly as the CLI does."""
    from mistral_tune.config.compose import compose as _compose

    return _compose


@pytest.fixture(scope="module")
def single_thread():
    """One intra-op thread for tiny-model tests: they gain nothing from more, and on a loaded shared CPU
    OpenMP barriers make every small op wait (measured ~10x slower generation with 2 threads under load)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ---- the tiny-model harness (plain helpers are in tests/helpers.py) ------------------------------------


@pytest.fixture(scope="module")
def lm():
    """The tiny preset as a MistralCausalLM (random init, seeded)."""
    from mistral_tune import MistralCausalLM

    return MistralCausalLM.from_preset("mistral_tiny")


@pytest.fixture(scope="module")
def chat_tokenizer():
    """The v1 tokenizer with the v1 chat template."""
    from mistral_tune.models.tokenizer import MistralTokenizer

    return MistralTokenizer.from_version("v1", chat_template="v1")


@pytest.fixture(scope="module")
def plain_tokenizer():
    """The v1 tokenizer, no chat template."""
    from mistral_tune.models.tokenizer import MistralTokenizer

    return MistralTokenizer.from_version("v1")


@pytest.fixture(scope="module")
def tiny_tokenizer():
    """The tokenizer of the mistral_tiny preset, loaded the way training loads it."""
    from mistral_tune.models.sources import resolve_source
    from mistral_tune.models.tokenizer import load_tokenizer

    return load_tokenizer(resolve_source("mistral_tiny"))
