"""Canaries for the accelerate internals in mistral_tune/compat/accelerate.py: ``accelerate launch`` in-process."""

from __future__ import annotations

import sys

from mistral_tune.compat import accelerate as compat
from mistral_tune.compat import broken


def test_launch_args_parse_as_the_cli_reads_them():
    args = compat.parse_launch_args(["--num_processes", "2", "--num_machines", "1", "-m", "mistral_tune", "recipe=x"])
    assert (args.num_processes, args.num_machines) == (2, 1), broken(
        "accelerate", "accelerate.commands.launch.launch_command_parser", "reads --num_processes differently"
    )
    assert args.module and args.training_script == "mistral_tune" and args.training_script_args == ["recipe=x"], broken(
        "accelerate", "accelerate.commands.launch.launch_command_parser", "reads -m MODULE ARGS differently"
    )


def test_launch_runs_the_script_and_waits(tmp_path):
    out = tmp_path / "ran.txt"
    script = tmp_path / "job.py"
    script.write_text(
        "import os, sys\n"
        f"open({str(out)!r}, 'w').write(os.environ.get('LOCAL_RANK', '?') + ' ' + ' '.join(sys.argv[1:]))\n"
    )
    args = compat.parse_launch_args(["--cpu", "--num_processes", "1", "--num_machines", "1", str(script), "a=1"])
    compat.run_launch(args)
    assert out.is_file(), broken("accelerate", "accelerate.commands.launch.launch_command", "did not run the script")
    assert out.read_text().endswith("a=1"), broken(
        "accelerate", "accelerate.commands.launch.launch_command", f"passed other arguments: {out.read_text()!r}"
    )
    assert sys.executable
