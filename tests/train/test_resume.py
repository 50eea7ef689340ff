from __future__ import annotations

import json

import pytest

from mistral_tune.core.errors import UserError
from mistral_tune.train import checkpoints, resume
from tests.helpers import fake_checkpoint


def test_resolve_resume_auto_and_path(tmp_path):
    run = tmp_path / "run"
    root = run / "checkpoints"
    assert resume.resolve_resume("auto", run, output_dir_given=True) is None  # nothing yet: start at step 0
    fake_checkpoint(root, 3)
    fake_checkpoint(root, 6, complete=False)
    assert resume.resolve_resume("auto", run, output_dir_given=True) == root / "checkpoint-3"
    assert resume.resolve_resume(str(run), tmp_path / "other", output_dir_given=True) == root / "checkpoint-3"
    assert resume.resolve_resume(str(root / "checkpoint-3"), run, output_dir_given=True) == root / "checkpoint-3"
    with pytest.raises(UserError, match="not a complete checkpoint"):
        resume.resolve_resume(str(root / "checkpoint-6"), run, output_dir_given=True)
    with pytest.raises(UserError, match="no such directory"):
        resume.resolve_resume(str(tmp_path / "nope"), run, output_dir_given=True)
    with pytest.raises(UserError, match="no output_dir was given"):
        resume.resolve_resume("auto", run, output_dir_given=False)
    with pytest.raises(UserError, match="already holds an earlier run.*checkpoint-3.*resume=auto"):
        resume.resolve_resume(None, run, output_dir_given=True)


def test_trim_metrics_drops_steps_after_checkpoint(tmp_path):
    path = tmp_path / "metrics.jsonl"
    lines = [json.dumps({"step": s, "loss": 1.0}) for s in range(1, 8)] + ['{"step": 8, "lo']  # cut by a kill
    path.write_text("\n".join(lines) + "\n")
    kept = resume.trim_metrics(path, 4)
    assert [r["step"] for r in kept] == [1, 2, 3, 4]
    assert [json.loads(x)["step"] for x in path.read_text().splitlines()] == [1, 2, 3, 4]


def test_check_compatible_refuses_changed_data_or_batches(tmp_path):
    geometry = {"per_device_train_batch_size": 2, "gradient_accumulation_steps": 1, "world_size": 1, "data_seed": 42}
    ckpt = tmp_path / "checkpoint-2"
    ckpt.mkdir()
    checkpoints.write_marker(ckpt, {"step": 2, "data_fingerprint": "abc", "batch_geometry": geometry})
    assert resume.check_compatible(ckpt, "abc", geometry)["step"] == 2
    with pytest.raises(UserError, match="training data differ"):
        resume.check_compatible(ckpt, "xyz", geometry)
    with pytest.raises(UserError, match="per_device_train_batch_size: 2 -> 4"):
        resume.check_compatible(ckpt, "abc", {**geometry, "per_device_train_batch_size": 4})
