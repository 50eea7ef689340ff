"""Safetensors read with plain file reads and written with the header first, tensor by tensor."""

import pytest
import torch
from safetensors.torch import load_file, save_file

from mistral_tune.models.shards import PlannedShardWriter, ShardReader, plan_shards, safetensors_dtype


def test_reader_reads_rows_and_whole_tensors_like_safetensors(tmp_path):
    data = {
        "a": torch.randn(7, 5),
        "b": torch.randn(3, 4).to(torch.bfloat16),
        "c": torch.arange(6, dtype=torch.int64),
        "s": torch.tensor(2.5),
    }
    save_file(data, str(tmp_path / "x.safetensors"))
    with ShardReader(tmp_path / "x.safetensors") as f:
        assert set(f.keys()) == set(data)
        for name, value in data.items():
            view = f.get_slice(name)
            assert view.get_shape() == list(value.shape)
            assert torch.equal(view[:], value)
        assert torch.equal(f.get_slice("a")[2:5], data["a"][2:5])
        assert f.get_slice("b").get_dtype() == "BF16"


def test_planned_writer_writes_files_safetensors_reads(tmp_path):
    data = {f"t{i}": torch.randn(100, 10 + i) for i in range(5)}
    plan = plan_shards(((n, list(t.shape), safetensors_dtype(t.dtype)) for n, t in data.items()), 10_000)
    assert len(plan) > 1
    writer = PlannedShardWriter(tmp_path, plan)
    for name, value in data.items():
        writer.add(name, value)
    names = writer.finish()
    assert len(names) == len(plan) and (tmp_path / "model.safetensors.index.json").is_file()
    back = {}
    for n in names:
        back.update(load_file(str(tmp_path / n)))
    assert all(torch.equal(back[k], v) for k, v in data.items())


def test_planned_writer_refuses_what_the_plan_does_not_say(tmp_path):
    writer = PlannedShardWriter(tmp_path, plan_shards([("w", [2, 2], "F32")], 1000))
    with pytest.raises(ValueError, match="expected w"):
        writer.add("w", torch.zeros(2, 3))
    with pytest.raises(ValueError, match="only 0 of 1"):
        writer.finish()
