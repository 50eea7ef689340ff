from __future__ import annotations

import os
from pathlib import Path

import pytest

import mistral_tune.launch.accelerate as launch
import mistral_tune.launch.engine as distributed
from mistral_tune.config.compose import compose
from mistral_tune.core.errors import UserError
from mistral_tune.core.process import engine_from_env, in_launched_process, is_main_process


def _engine_env(name: str) -> dict[str, str]:
    """The environment accelerate gives each process for the shipped config of launcher ``name``."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

    cfg = compose("sft_lora", [f"launcher={name}", "launcher.num_processes=2", "launcher.main_process_port=0"])
    args = launch_command_parser().parse_args(launch.accelerate_argv(cfg, "sft_lora", [], Path("/tmp/r")))
    args, defaults, _ = _validate_launch_command(args)  # accelerate's own reading of our YAML
    if args.use_deepspeed:
        args.deepspeed_fields_from_accelerate_config = ",".join(defaults.deepspeed_config)
        env = prepare_deepspeed_cmd_env(args)[1]
    else:
        env = prepare_multi_gpu_env(args)
    return {k: v for k, v in env.items() if k.startswith(("ACCELERATE_", "FSDP_"))}


@pytest.mark.parametrize(
    "name, stage", [("deepspeed_zero2", 2), ("deepspeed_zero3", 3), ("deepspeed_zero3_offload", 3)]
)
def test_shipped_deepspeed_configs_build_the_plugin(name, stage, monkeypatch):
    from accelerate.utils import DeepSpeedPlugin

    for key, value in _engine_env(name).items():
        monkeypatch.setenv(key, value)
    plugin = DeepSpeedPlugin()  # what transformers builds in each worker from that environment
    zero = plugin.hf_ds_config.config["zero_optimization"]
    assert plugin.zero_stage == stage
    if stage == 3:  # saving gathers the shards into one state dict
        assert zero["stage3_gather_16bit_weights_on_model_save"] is True
    assert ("offload_param" in zero) == name.endswith("offload")


def test_shipped_fsdp_config_is_fsdp2_per_decoder_layer(monkeypatch):
    from accelerate.utils import FullyShardedDataParallelPlugin

    env = _engine_env("fsdp")
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    plugin = FullyShardedDataParallelPlugin()
    assert plugin.fsdp_version == 2
    assert plugin.transformer_cls_names_to_wrap == ["MistralDecoderLayer"]
    assert "FULL_STATE_DICT" in str(plugin.state_dict_type)
    assert engine_from_env() == "fsdp"


def test_fsdp2_shards_each_decoder_layer_with_its_lora_weights(monkeypatch):
    """The units accelerate's FSDP2 path would fully_shard on our LoRA model, from the shipped config."""
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.fsdp_utils import fsdp2_prepare_auto_wrap_policy

    import mistral_tune.adapters.build as adapters
    import mistral_tune.models.loading as models
    from mistral_tune.models.sources import resolve_source

    for key, value in _engine_env("fsdp").items():
        monkeypatch.setenv(key, value)
    cfg = compose("sft_lora", [])
    model = models.load_model(cfg.model, resolve_source(cfg.model.name), seed=0)
    model = adapters.apply_adapter(model, cfg.adapter)
    plugin = FullyShardedDataParallelPlugin()
    plugin.set_auto_wrap_policy(model)
    policy = fsdp2_prepare_auto_wrap_policy(plugin, model)
    units = [module for module in model.modules() if policy(module)]
    assert len(units) == model.config.num_hidden_layers
    assert all(type(u).__name__ == "MistralDecoderLayer" for u in units)
    lora_in_units = {id(p) for u in units for n, p in u.named_parameters() if "lora_" in n}
    assert lora_in_units == {id(p) for n, p in model.named_parameters() if "lora_" in n}


def test_qlora_under_fsdp_stores_4bit_weights_in_compute_dtype(monkeypatch):
    import torch
    from transformers import BitsAndBytesConfig

    def quant():
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.bfloat16)

    assert distributed.quantization_for_engine(quant()).bnb_4bit_quant_storage == torch.uint8
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    assert distributed.quantization_for_engine(quant()).bnb_4bit_quant_storage == torch.bfloat16
    assert distributed.quantization_for_engine(None) is None


@pytest.mark.parametrize("engine_env, use_cpu", [({}, "true"), ({"ACCELERATE_USE_DEEPSPEED": "true"}, None)])
def test_cpu_processes_form_a_real_group(engine_env, use_cpu, monkeypatch):
    """Without these settings accelerate on CPU gives every process world size 1 and rank 0 (no sync)."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("CPU-only behaviour")
    monkeypatch.setenv("ACCELERATE_USE_CPU", "x")  # records the original state, so teardown restores it
    monkeypatch.delenv("ACCELERATE_USE_CPU")
    for key, value in {"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1", **engine_env}.items():
        monkeypatch.setenv(key, value)
    cfg = compose("sft_lora", [])
    distributed.prepare_process(cfg)
    assert cfg.train.ddp_backend == "gloo"
    assert os.environ.get("ACCELERATE_USE_CPU") == use_cpu  # DeepSpeed refuses accelerate's CPU mode
    assert not is_main_process() and in_launched_process()


def test_fsdp_on_cpu_is_refused_instead_of_quietly_running_ddp(monkeypatch, capsys, tmp_path):
    import torch

    from mistral_tune.cli import main

    if torch.cuda.is_available():
        pytest.skip("CPU-only behaviour")
    out = tmp_path / "run"
    assert main(["recipe=sft_lora", "launcher=fsdp", "launcher.num_processes=2", f"output_dir={out}"]) == 2
    assert "FSDP needs GPUs" in capsys.readouterr().err
    # the same check inside a process started by `accelerate launch --config_file fsdp.yaml` by hand
    for key, value in {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0", **_engine_env("fsdp")}.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(UserError, match="FSDP needs GPUs"):
        distributed.prepare_process(compose("sft_lora", []))


GROUP_CHILD = """
import sys, time
import torch, torch.distributed as dist
import mistral_tune.launch.engine as distributed
from mistral_tune.config.compose import compose

cfg = compose("sft_lora", ["train.ddp_timeout=3"])
distributed.prepare_process(cfg)
rank = int(sys.argv[1])
open(f"ready-{rank}", "w").close()  # both processes imported: the 3 s are not spent waiting for an import
while not __import__("os").path.exists(f"ready-{1 - rank}"):
    time.sleep(0.05)
distributed.start_cpu_process_group(cfg)
if dist.get_rank() == 1:
    time.sleep(60)  # joined the group, then never answers: a hung peer
started = time.monotonic()
try:
    dist.all_reduce(torch.ones(1))
except Exception as exc:
    print(f"gave up after {time.monotonic() - started:.1f} s: {type(exc).__name__}", flush=True)
    # Leave without the interpreter's teardown: with the peer still hung, gloo's threads can abort it
    # ("terminate called without an active exception", SIGABRT) about one time in three on a quiet machine.
    # That is teardown after the timeout, not the timeout this test checks.
    __import__("os")._exit(3)
"""


def test_a_cpu_group_waits_for_a_hung_peer_only_train_ddp_timeout(tmp_path):
    """Gloo's own default is 30 minutes; accelerate's CPU mode passes no timeout, so mistral-tune forms the group."""
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    repo = Path(__file__).resolve().parents[2]
    procs = []
    for rank in (0, 1):
        env = {**os.environ, "PYTHONPATH": str(repo), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
               "WORLD_SIZE": "2", "RANK": str(rank), "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": "2"}  # fmt: skip
        env.pop("ACCELERATE_USE_CPU", None)
        procs.append(subprocess.Popen([sys.executable, "-c", GROUP_CHILD, str(rank)], env=env, cwd=tmp_path, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE))  # fmt: skip
    try:
        out, err = procs[0].communicate(timeout=120)
    finally:
        procs[1].kill()
        procs[1].communicate()
    assert procs[0].returncode == 3, out + err[-3000:]
    waited = float(out.split("gave up after ")[1].split(" s")[0])
    assert 2.5 < waited < 20
