"""Canary for mistral_tune/compat/deepspeed.py: a ZeRO-3 partitioned parameter carries ``ds_id``."""

from __future__ import annotations

import inspect

import pytest

from mistral_tune.compat import broken
from mistral_tune.compat import deepspeed as compat


def test_zero3_marks_partitioned_parameters_with_ds_id():
    import torch

    partition = pytest.importorskip("deepspeed.runtime.zero.partition_parameters")
    source = inspect.getsource(partition.Init._convert_to_deepspeed_param)
    assert "param.ds_id =" in source, broken(
        "deepspeed", "zero.Init._convert_to_deepspeed_param", "no longer sets param.ds_id on a ZeRO-3 parameter"
    )
    plain = torch.nn.Parameter(torch.zeros(2))
    assert not compat.is_zero3_param(plain)
    plain.ds_id = 0  # what the conversion above sets
    assert compat.is_zero3_param(plain)
