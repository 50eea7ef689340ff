from __future__ import annotations

import pytest

from mistral_tune.config.compose import compose
from mistral_tune.config.schema import LAUNCHERS
from mistral_tune.core.errors import UserError

RECIPES = ("dpo_lora", "dpo_qlora", "dpo_full", "reward_lora")


def test_wrong_type_fails_before_anything_is_built(compose):
    with pytest.raises(UserError) as err:
        compose("sft_lora", ["train.max_steps=abc"])
    assert "train.max_steps" in str(err.value)


def test_bad_value_is_reported(compose):
    with pytest.raises(UserError, match="adapter.name='xx'"):
        compose("sft_lora", ["adapter.name=xx"])


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipes_compose(recipe):
    cfg = compose(recipe, [])
    assert cfg.trainer.name == ("reward" if recipe.startswith("reward") else "dpo")
    assert cfg.data.path == "data/preference_sample.jsonl"
    assert cfg.adapter.name == {"dpo_lora": "lora", "dpo_qlora": "qlora", "dpo_full": "none"}.get(recipe, "lora")


@pytest.mark.parametrize(
    "override,message",
    [
        ("trainer.loss_type=sigmoidd", "unknown ['sigmoidd']"),
        ("trainer.label_smoothing=0.5", "label_smoothing=0.5 must be in [0, 0.5)"),
        ("trainer.loss_type=exo_pair", "exo_pair needs trainer.label_smoothing > 0"),
        ("trainer.truncation_mode=middle", "truncation_mode='middle' is not one of keep_start, keep_end"),
        ("trainer.beta=0", "trainer.beta=0.0 must be > 0"),
        ("trainer.max_prompt_length=256", "max_prompt_length=256 must be > 1 and below trainer.max_length=256"),
        ("trainer.loss_weights=[1.0,2.0]", "one weight per loss type"),
        ("data.format=alpaca", "data.format='alpaca' is not one of auto, preference, preference_messages, hh"),
        ("trainer.name=ppo", "trainer.name='ppo' is not one of sft, dpo, reward"),
        (
            "trainer.packing=true",
            "'trainer.packing' (from command-line override 'trainer.packing=true') is a key of trainer=sft",
        ),
        (
            "trainer.loss=liger",
            "'trainer.loss' (from command-line override 'trainer.loss=liger') is a key of trainer=sft",
        ),
    ],
)
def test_bad_values_fail_at_composition(override, message):
    with pytest.raises(UserError) as err:
        compose("dpo_lora", [override])
    assert message in str(err.value)


def test_sft_keeps_its_formats():
    with pytest.raises(UserError, match="data.format='hh' is not one of auto, messages, sharegpt, alpaca, text"):
        compose("sft_lora", ["data.format=hh"])


@pytest.mark.usefixtures("single_thread")
@pytest.mark.parametrize(
    "overrides, message",
    [
        (["export.adapter_only=true"], "export.adapter_only was removed with export=adapter_only"),
        (["export=adapter_only", "adapter=none"], "export=adapter_only was removed: it wrote exactly what export=none"),
        (["adapter.init_lora_weights=svd"], "adapter.init_lora_weights='svd'"),
        (["adapter=qlora", "adapter.init_lora_weights=pissa"], "cannot be done on a 4-bit base"),
        (["adapter.lora_dropout=1.5"], "adapter.lora_dropout=1.5"),
        (["export.tolerance=0"], "export.tolerance=0"),
    ],
)
def test_bad_adapter_and_export_settings_fail_at_compose(compose, overrides, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace("[", r"\[")):
        compose("sft_lora", overrides)


@pytest.mark.usefixtures("single_thread")
def test_export_groups_and_adapter_options_compose(compose):
    cfg = compose("sft_lora", ["adapter=dora", "export=preset", "adapter.target_modules=[all-linear]"])
    assert cfg.adapter.name == "dora" and cfg.export.preset and cfg.export.merged
    cfg = compose("sft_qlora", ["export=none", "adapter.use_rslora=true", "adapter.modules_to_save=[lm_head]"])
    assert not cfg.export.merged and not cfg.export.preset and cfg.adapter.modules_to_save == ["lm_head"]


@pytest.mark.parametrize("name", LAUNCHERS)
def test_every_launcher_composes(name):
    cfg = compose("sft_lora", [f"launcher={name}", f"launcher.num_processes={1 if name == 'local' else 2}"])
    assert cfg.launcher.name == name


@pytest.mark.parametrize(
    "overrides, key",
    [
        (["launcher.num_processes=2"], "launcher=local"),
        (["launcher=ddp", "launcher.num_processes=3", "launcher.num_machines=2", "output_dir=/x",
          "launcher.main_process_ip=10.0.0.1"], "multiple of launcher.num_machines"),
        (["launcher=ddp", "launcher.num_processes=4", "launcher.num_machines=2", "launcher.machine_rank=2",
          "output_dir=/x", "launcher.main_process_ip=10.0.0.1"], "launcher.machine_rank=2"),
        (["launcher=ddp", "launcher.num_processes=4", "launcher.num_machines=2", "output_dir=/x"], "main_process_ip"),
        (["launcher=ddp", "launcher.num_processes=4", "launcher.num_machines=2",
          "launcher.main_process_ip=10.0.0.1"], "output_dir"),
        (["launcher.name=horovod"], "launcher.name='horovod'"),
        (["train.ddp_timeout=0"], "train.ddp_timeout=0 must be > 0"),
    ],
)  # fmt: skip
def test_launcher_values_are_checked(overrides, key):
    with pytest.raises(UserError, match=key.replace("(", r"\(").replace(".", r"\.")):
        compose("sft_lora", overrides)
