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
