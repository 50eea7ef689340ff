from __future__ import annotations

import pytest

from mistral_tune.config.compose import compose
from mistral_tune.core.errors import UserError


def test_reward_model_is_not_exported_as_a_causal_lm_preset():
    with pytest.raises(UserError, match="a reward model exports as merged/ only"):
        compose("reward_lora", ["export.preset=true"])
