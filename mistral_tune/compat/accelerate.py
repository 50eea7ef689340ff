"""accelerate internals: the ``accelerate launch`` command's parser and entry point, called in-process."""

from __future__ import annotations

from typing import Any


def parse_launch_args(argv: list[str]) -> Any:
    """``accelerate launch ARGV`` parsed as its CLI would (``accelerate.commands.launch.launch_command_parser``)."""
    from accelerate.commands.launch import launch_command_parser

    return launch_command_parser().parse_args(argv)


def run_launch(args: Any) -> None:
    """Start and wait for the processes, as ``accelerate launch`` does (``accelerate.commands.launch.launch_command``)."""
    from accelerate.commands.launch import launch_command

    launch_command(args)
