from __future__ import annotations

import pytest

from mistral_tune.core.files import atomic_directory


def test_atomic_directory_leaves_nothing_on_failure(tmp_path):
    out = tmp_path / "adapter"
    with atomic_directory(out) as tmp:
        (tmp / "a.txt").write_text("v1")
    with pytest.raises(RuntimeError):
        with atomic_directory(out) as tmp:
            (tmp / "a.txt").write_text("v2-partial")
            raise RuntimeError("killed mid-write")
    assert (out / "a.txt").read_text() == "v1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]
