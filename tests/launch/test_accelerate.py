"""Multi-process launches on CPU: the launcher group, accelerate/DeepSpeed configs, DDP parity, ZeRO-2/3
(and ZeRO-3 offload) training + saving + merged export, rank-0-only writes, whole-job failure, DPO under
DDP and ZeRO-2, a reward model under ZeRO-3, and resuming DDP/ZeRO-2 runs.

The slow tests start real 2-process jobs (gloo on CPU) through ``accelerate launch`` and
``mistral-tune launcher=...``, and compare them with a 1-process run of the same global batch:
2 processes x 2 sequences x 1 accumulation step = 1 process x 2 sequences x 2 accumulation steps.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import mistral_tune.launch.accelerate as launch
from mistral_tune.config.compose import compose
from mistral_tune.core.errors import UserError
from mistral_tune.core.process import shared_run_dir


def test_multi_node_settings_reach_accelerate():
    from accelerate.commands.launch import launch_command_parser

    overrides = [
        "launcher=deepspeed_zero3", "launcher.num_processes=16", "launcher.num_machines=2",
        "launcher.machine_rank=1", "launcher.main_process_ip=10.0.0.1", "launcher.main_process_port=29501",
        "output_dir=/shared/old", "train.max_steps=7",
    ]  # fmt: skip
    cfg = compose("sft_lora", overrides)
    argv = launch.accelerate_argv(cfg, "sft_lora", overrides, Path("/shared/run one"))
    args = launch_command_parser().parse_args(argv)
    assert (args.num_processes, args.num_machines, args.machine_rank) == (16, 2, 1)
    assert (args.main_process_ip, args.main_process_port) == ("10.0.0.1", 29501)
    assert args.module and args.training_script == "mistral_tune"
    assert Path(args.deepspeed_config_file).is_file() and Path(args.config_file).is_file()
    worker = args.training_script_args
    assert worker[0] == "recipe=sft_lora" and "train.max_steps=7" in worker and "launcher=deepspeed_zero3" in worker
    # The output_dir is pinned (quoted for Hydra), and the worker composes the same config from it.
    assert [w for w in worker if w.startswith("output_dir=")] == ["output_dir='/shared/run one'"]
    assert compose("sft_lora", worker[1:]).output_dir == "/shared/run one"


def test_processes_of_one_machine_share_the_default_run_dir(monkeypatch):
    import psutil

    named = []

    def default_dir(when):
        named.append(when)
        return Path("runs") / when.strftime("%Y%m%d-%H%M%S")

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    shared_run_dir(None, default_dir)
    assert named[0].timestamp() == pytest.approx(psutil.Process(os.getppid()).create_time(), abs=1e-3)
    assert shared_run_dir("/given", default_dir) == Path("/given")
    monkeypatch.setenv("WORLD_SIZE", "4")  # two machines of two processes
    with pytest.raises(UserError, match="output_dir"):
        shared_run_dir(None, default_dir)


def test_zero_gpus_with_automatic_process_count_is_a_clear_error():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has GPUs")
    cfg = compose("sft_lora", ["launcher=ddp"])
    with pytest.raises(UserError, match="no GPU is visible"):
        launch.total_processes(cfg.launcher)


def test_dry_run_counts_the_launcher_processes(capsys):
    import torch

    from mistral_tune.cli import main

    assert main(["recipe=sft_lora", "launcher=ddp", "launcher.num_processes=8", "dry_run=true"]) == 0
    assert "x 8 device(s)" in capsys.readouterr().out
    if not torch.cuda.is_available():  # 0 = one per GPU, and there is none: said plainly, no ZeroDivisionError
        assert main(["recipe=sft_lora", "launcher=ddp", "dry_run=true"]) == 2
        assert "no GPU is visible" in capsys.readouterr().err


def test_ddp_of_one_process_is_refused():
    cfg = compose("sft_lora", ["launcher=ddp", "launcher.num_processes=1"])
    with pytest.raises(UserError, match="launcher=local"):
        launch.total_processes(cfg.launcher)


def test_resume_through_the_launcher_needs_an_output_dir(capsys):
    from mistral_tune.cli import main

    assert main(["recipe=sft_lora", "launcher=ddp", "launcher.num_processes=2", "resume=auto"]) == 2
    assert "no output_dir was given" in capsys.readouterr().err


def test_an_accelerate_config_accelerate_refuses_is_one_clear_error(tmp_path, capsys):
    from mistral_tune.cli import main

    bad = tmp_path / "bad.yaml"
    shipped = (launch.CONFIG_DIR / "ddp.yaml").read_text()
    bad.write_text(shipped.replace("mixed_precision: 'no'", "mixed_precision: fp7"))
    code = main(["recipe=sft_lora", "launcher=ddp", "launcher.num_processes=2", f"launcher.accelerate_config={bad}",
                 f"output_dir={tmp_path / 'run'}"])  # fmt: skip
    assert code == 2
    assert "accelerate launch refused this launch" in capsys.readouterr().err
    assert not (tmp_path / "run" / "summary.json").exists()


def test_bad_data_fails_before_any_process_is_launched(tmp_path, capsys, monkeypatch):
    from mistral_tune.cli import main

    monkeypatch.setattr(launch, "launch", lambda *a, **k: pytest.fail("processes were launched"))
    bad = tmp_path / "qa.jsonl"
    bad.write_text('{"question": "q", "answer": "a"}\n')
    args = ["recipe=sft_lora", "launcher=ddp", "launcher.num_processes=2", f"data.path={bad}",
            f"output_dir={tmp_path / 'r'}"]  # fmt: skip
    assert main(args) == 2
    assert "Could not detect the data format" in capsys.readouterr().err
