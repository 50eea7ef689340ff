"""Checkpoint layout rules: completeness markers, rotation, leftovers, resume resolution, disk estimate."""

from __future__ import annotations

import pytest

from mistral_tune.core.errors import UserError
from mistral_tune.train import checkpoints
from tests.helpers import fake_checkpoint


def test_marker_lists_files_and_detects_damage(tmp_path):
    ckpt = fake_checkpoint(tmp_path, 5)
    assert checkpoints.completeness_problem(ckpt) is None
    assert checkpoints.read_marker(ckpt)["files"]["optimizer.pt"] == 200
    (ckpt / "optimizer.pt").write_bytes(b"o" * 50)  # e.g. a partial copy
    assert "optimizer.pt is 50 bytes, expected 200" in checkpoints.completeness_problem(ckpt)
    (ckpt / "optimizer.pt").unlink()
    assert "missing optimizer.pt" in checkpoints.completeness_problem(ckpt)
    assert "interrupted" in checkpoints.completeness_problem(fake_checkpoint(tmp_path, 6, complete=False))


def test_latest_complete_skips_incomplete_and_staging(tmp_path):
    fake_checkpoint(tmp_path, 4)
    fake_checkpoint(tmp_path, 8, complete=False)  # written in place by something that was killed
    staging = tmp_path / ".staging-checkpoint-12" / "checkpoint-12"
    staging.mkdir(parents=True)  # mistral-tune's own interrupted write
    assert checkpoints.latest_complete(tmp_path) == tmp_path / "checkpoint-4"
    assert checkpoints.remove_leftovers(tmp_path) == [tmp_path / ".staging-checkpoint-12"]
    assert not (tmp_path / ".staging-checkpoint-12").exists()


def test_rotate_keeps_last_k_complete(tmp_path):
    for step in (2, 4, 6, 8):
        fake_checkpoint(tmp_path, step)
    fake_checkpoint(tmp_path, 10, complete=False)
    deleted = checkpoints.rotate(tmp_path, 2)
    assert [p.name for p in deleted] == ["checkpoint-2", "checkpoint-4"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-10", "checkpoint-6", "checkpoint-8"]
    assert checkpoints.rotate(tmp_path, None) == []


def test_disk_estimate_and_refusal(tmp_path):
    # LoRA on a 7B base in bf16: 3.4M trainable weights -> 13.6 MB adapter + 27 MB AdamW moments + 4 MiB files.
    ckpt = checkpoints.estimate_checkpoint_bytes(3_407_872, 7_241_732_096, full_model=False, param_bytes=2)
    assert ckpt == 3_407_872 * 2 + 2 * 3_407_872 * 4 + 4 * 2**20
    # Full fine-tune: the whole model plus both moments.
    full = checkpoints.estimate_checkpoint_bytes(7_241_732_096, 7_241_732_096, full_model=True, param_bytes=2)
    assert full > 7_241_732_096 * 10
    need = checkpoints.required_disk_bytes(checkpoint_bytes=full, num_checkpoints=10**6, final_bytes=0, merged_bytes=0)
    with pytest.raises(UserError, match=r"GiB free but this run needs about .*save_total_limit"):
        checkpoints.check_disk_space(tmp_path, need, "test")
    assert checkpoints.check_disk_space(tmp_path, 1, "test") > 1
