"""Presets, source resolution, offline behaviour and the embedded tiny preset."""

from __future__ import annotations

import time

import pytest

from mistral_tune.core.errors import UserError
from mistral_tune.models.sources import check_weight_files, fetch_hub_repo, resolve_source


def test_builtin_ids_resolve_to_their_hub_repos():
    src = resolve_source("mistral_7b_en")
    assert src.hub_repo == "mistralai/Mistral-7B-v0.1" and src.local_dir is None
    assert resolve_source("mistral_0.3_instruct_7b_en").hub_repo == "mistralai/Mistral-7B-Instruct-v0.3"


def test_local_dir_and_path_override(tmp_path):
    src = resolve_source("mistral_7b_en", str(tmp_path))
    assert src.local_dir == tmp_path.resolve() and src.preset.id == "mistral_7b_en"


@pytest.mark.parametrize(
    "bad", ["../../no-such-preset", "/nonexistent/dir", "a/b/c", "hf://../x", "org/../x", "mistral_7b_en/../../etc"]
)
def test_bad_ids_are_refused(bad):
    with pytest.raises(UserError):
        resolve_source(bad)


def test_offline_hub_fails_fast_naming_the_repo():
    start = time.monotonic()
    with pytest.raises(UserError) as err:
        fetch_hub_repo("mistralai/Mistral-7B-v0.1")
    assert time.monotonic() - start < 30
    assert "mistralai/Mistral-7B-v0.1" in str(err.value) and "model.path=" in str(err.value)


def test_pickle_weights_refused_unless_allowed(tmp_path):
    (tmp_path / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(UserError, match="allow_pickle"):
        check_weight_files(tmp_path, allow_pickle=False)
    check_weight_files(tmp_path, allow_pickle=True)


@pytest.mark.parametrize("name", ["../../etc", "/etc", "~/models", "..", "org/../../etc", "hf://../etc", "a/b/c"])
def test_model_name_never_becomes_a_path(name):
    with pytest.raises(UserError, match="never read as filesystem paths"):
        resolve_source(name)


def test_model_name_hub_id_and_preset_resolve_without_filesystem(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "org" / "name").mkdir(parents=True)  # a local dir named like the id must not be picked
    source = resolve_source("org/name")
    assert source.hub_repo == "org/name" and source.local_dir is None
    assert resolve_source("hf://org/name").hub_repo == "org/name"
    assert resolve_source("mistral_tiny").local_dir is None
