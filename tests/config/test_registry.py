"""config/registry.py is the one list of options per config group: each entry must import, each shipped
conf/<group>/*.yaml must name a registered option, and validation and dispatch must read that list."""

import inspect
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from mistral_tune.config import registry
from mistral_tune.config.compose import config_dir
from mistral_tune.core.errors import UserError

LAUNCH_CONFIGS = Path(registry.__file__).resolve().parents[1] / "launch" / "configs"


def conf_names(group: str) -> list[str]:
    """The ``name:`` each conf/<group>/*.yaml sets."""
    return [OmegaConf.load(p).name for p in sorted(config_dir("conf").joinpath(group).glob("*.yaml"))]


@pytest.mark.parametrize("name", sorted(registry.TRAINERS))
def test_each_trainer_module_imports_and_has_the_interface(name):
    from mistral_tune.train.base import get_trainer

    module = get_trainer(name)
    assert module is registry.load(registry.TRAINERS[name])
    for attr in ("TASK_TYPE", "prepare_data", "build_trainer", "finish", "samples"):
        assert hasattr(module, attr), f"{module.__name__} lacks {attr}"


@pytest.mark.parametrize("name", sorted(registry.TRACKERS))
def test_each_tracker_builder_imports(name):
    target = registry.TRACKERS[name]
    if target is None:
        return
    start = registry.load(target)
    assert list(inspect.signature(start).parameters)[:4] == ["tracking_cfg", "run_dir", "config", "config_yaml"]


@pytest.mark.parametrize("group,registered", [("trainer", registry.TRAINERS), ("tracking", registry.TRACKERS),
                                              ("adapter", registry.ADAPTERS), ("launcher", registry.LAUNCHERS)])  # fmt: skip
def test_every_conf_file_names_a_registered_option(group, registered):
    names = conf_names(group)
    assert set(names) <= set(registered), f"conf/{group}/ names {set(names) - set(registered)}, not registered"


def test_every_registered_trainer_tracker_and_launcher_has_a_conf_file():
    for group, registered in (("trainer", registry.TRAINERS), ("tracking", registry.TRACKERS)):
        assert sorted(conf_names(group)) == sorted(registered), group
    stems = sorted(p.stem for p in config_dir("conf").joinpath("launcher").glob("*.yaml"))
    assert stems == sorted(registry.LAUNCHERS) == sorted(conf_names("launcher"))


def test_launchers_agree_with_launch_configs():
    shipped = {p.name for p in LAUNCH_CONFIGS.iterdir() if p.suffix in (".yaml", ".json")}
    wanted = {f for f in registry.LAUNCHERS.values() if f}
    wanted |= {f"{name}.json" for name in registry.LAUNCHERS if name.startswith("deepspeed")}
    assert shipped == wanted


def test_launcher_dispatch_reads_the_registry():
    from mistral_tune.config.schema import LauncherConfig
    from mistral_tune.launch.accelerate import accelerate_config_path

    for name, file in registry.LAUNCHERS.items():
        if file:
            assert accelerate_config_path(LauncherConfig(name=name)) == (LAUNCH_CONFIGS / file).resolve()


def test_attention_and_loss_lists_are_the_registry():
    from mistral_tune.models import attention
    from mistral_tune.train import lm_head_loss

    assert attention.ATTN_IMPLEMENTATIONS is registry.ATTN_IMPLEMENTATIONS
    assert lm_head_loss.LOSS_IMPLEMENTATIONS is registry.LOSS_IMPLEMENTATIONS
    for impl in registry.LOSS_IMPLEMENTATIONS:
        if impl != "liger":  # liger needs CUDA
            assert lm_head_loss.resolve_impl(impl, __import__("torch").device("cpu")) in registry.LOSS_IMPLEMENTATIONS
    with pytest.raises(UserError, match="flash_attention_2, flex_attention"):
        attention.pick_attn_implementation("flash")


def test_dtype_list_is_shared():
    from mistral_tune.export import hf_files

    assert hf_files.DTYPES is registry.DTYPES
    assert registry.DTYPE_CHOICES == ("auto", *registry.DTYPES)


@pytest.mark.parametrize(
    "override,key",
    [
        ("trainer.loss=fast", "trainer.loss"),
        ("model.attn_implementation=flash", "model.attn_implementation"),
        ("model.dtype=int8", "model.dtype"),
        ("export.dtype=int8", "export.dtype"),
        ("tracking.name=mlflow", "tracking.name"),
        ("launcher.name=slurm", "launcher.name"),
    ],
)
def test_validation_rejects_what_the_registry_lacks(compose, override, key):
    with pytest.raises(UserError, match=rf"{key}=.* is not one of"):
        compose("sft_lora", [override])


def test_a_registered_tracker_is_dispatched(tmp_path):
    from mistral_tune.config.schema import TrackingConfig
    from mistral_tune.tracking.trackers import start_tracking

    tracking = start_tracking(OmegaConf.structured(TrackingConfig(name="tensorboard")), tmp_path, {}, "a: 1\n")
    assert tracking.info["name"] == "tensorboard" and len(tracking.callbacks) == 1
    assert start_tracking(OmegaConf.structured(TrackingConfig(name="none")), tmp_path, {}, "").info == {"name": "none"}
