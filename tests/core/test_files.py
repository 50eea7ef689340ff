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


def test_only_directories_mistral_tune_wrote_are_replaced(tmp_path):
    from mistral_tune.core.errors import UserError
    from mistral_tune.core.files import OWNER_MARKER, atomic_directory

    mine = tmp_path / "adapter"
    mine.mkdir()
    (mine / "important.txt").write_text("keep")
    with pytest.raises(UserError, match="did not write"):
        with atomic_directory(mine) as tmp:
            (tmp / "new.txt").write_text("new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"] and (mine / "important.txt").read_text() == "keep"
    (mine / "important.txt").unlink()
    (mine / "mistral_tune_adapter.json").write_text("{}")  # an adapter/ from before the marker existed
    for _ in range(2):  # the legacy sidecar, then the marker the first rewrite left
        with atomic_directory(mine) as tmp:
            (tmp / "new.txt").write_text("new")
        assert sorted(p.name for p in mine.iterdir()) == sorted([OWNER_MARKER, "new.txt"])
    link = tmp_path / "link"
    link.symlink_to(mine)
    with pytest.raises(UserError, match="is a symlink"):
        with atomic_directory(link):
            pass
