"""Data errors come before the model: the run's first step checks every row, and tokenizing comes before the
model is built. The model loader is spied on, never mocked away: a call fails the test."""

import pytest

from mistral_tune.config.compose import compose
from mistral_tune.core.errors import UserError
from mistral_tune.pipeline.run import run
from tests.helpers import write_jsonl


def msg(role: str, content: str) -> dict:
    return {"role": role, "content": content}


def _spy_on_model_loading(monkeypatch) -> list[str]:
    """Record every download and model build; a model build fails the test at once."""
    import mistral_tune.models.loading as loading
    import mistral_tune.models.sources as sources

    calls: list[str] = []
    real_download = sources.download_source

    def download(*args, **kwargs):
        calls.append("download_source")
        return real_download(*args, **kwargs)

    def load_model(*args, **kwargs):
        calls.append("load_model")
        pytest.fail("the model was loaded before the data was checked")

    monkeypatch.setattr(sources, "download_source", download)
    monkeypatch.setattr(loading, "load_model", load_model)
    return calls


def test_bad_data_fails_before_any_model_is_built(tmp_path, monkeypatch):
    """ShareGPT rows under a 'messages' column: every row fails the data check, the run's first step."""
    calls = _spy_on_model_loading(monkeypatch)
    rows = [{"messages": [{"from": "human", "value": f"q{i}"}, {"from": "gpt", "value": f"a{i}"}]} for i in range(5)]
    path = write_jsonl(tmp_path / "renamed.jsonl", rows)
    cfg = compose("sft_lora", [f"data.path={path}", f"output_dir={tmp_path / 'run'}"])
    with pytest.raises(UserError, match=r"row 1: messages\[0\] has no 'role'; found keys from, value"):
        run(cfg)
    assert calls == []  # not even the download


def test_data_failing_only_at_tokenization_still_fails_before_the_model(tmp_path, monkeypatch):
    """Roles that do not alternate pass the tokenizer-free check; the chat template refuses them, still before
    the model is built."""
    calls = _spy_on_model_loading(monkeypatch)
    rows = [{"messages": [msg("user", "a"), msg("user", "b"), msg("assistant", "c")]} for _ in range(3)]
    cfg = compose("sft_lora", [f"data.path={write_jsonl(tmp_path / 'roles.jsonl', rows)}",
                               f"output_dir={tmp_path / 'run'}"])  # fmt: skip
    with pytest.raises(UserError, match="3 bad_roles"):
        run(cfg)
    assert calls == ["download_source"]


def test_bad_data_file_fails_within_seconds_from_the_command_line(tmp_path):
    """The whole command, from process start: config, the data check, one clear error, exit status 2."""
    import subprocess
    import sys
    import time

    path = tmp_path / "pairs.jsonl"
    path.write_text('{"question": "Q", "answer": "A"}\n', encoding="utf-8")
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "mistral_tune", "recipe=dpo_lora", f"data.path={path}", f"output_dir={tmp_path / 'r'}"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    seconds = time.perf_counter() - started
    print(f"bad data file: exit {done.returncode} after {seconds:.1f} s")
    assert done.returncode == 2 and "Could not detect the preference data format" in done.stderr
    assert "parameters:" not in done.stderr  # no model was built
    assert seconds < 60  # typically a few seconds; generous for a loaded CI machine


@pytest.mark.slow
@pytest.mark.usefixtures("single_thread")
def test_sharegpt_data_trains(tmp_path):
    """ShareGPT rows (human/gpt/system, and user/assistant) train end to end, every row used."""
    rows = [
        {"conversations": [{"from": "system", "value": "Answer briefly."},
                           {"from": "human" if i % 2 else "user", "value": f"What is {i} plus {i}?"},
                           {"from": "gpt" if i % 2 else "assistant", "value": f"{i} plus {i} is {2 * i}."}]}
        for i in range(24)
    ]  # fmt: skip
    cfg = compose("sft_lora", [f"data.path={write_jsonl(tmp_path / 'sharegpt.jsonl', rows)}", "train.max_steps=2",
                               "train.logging_steps=1", "data.holdout=0", "export=none", f"output_dir={tmp_path / 'r'}"])  # fmt: skip
    summary = run(cfg)
    assert summary["data_format"] == "sharegpt" and summary["data"]["used"] == 24 and summary["steps"] == 2
    assert summary["tokens_seen"] > 0 and summary["final_loss"] is not None
