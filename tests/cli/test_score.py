from __future__ import annotations

from mistral_tune.cli import main


def test_score_command_usage_errors(capsys):
    assert main(["score", "text=hi"]) == 2
    assert "preset=MODEL is required" in capsys.readouterr().err
    assert main(["score", "preset=x", "text=a", "file=b"]) == 2
    assert "exactly one of" in capsys.readouterr().err
    assert main(["score", "preset=x", "text=a", "batch_size=abc"]) == 2
    assert "batch_size='abc' must be an integer" in capsys.readouterr().err
    assert main(["score", "preset=x", "text=a", "batch_size=0"]) == 2
    assert "batch_size=0 must be at least 1" in capsys.readouterr().err
    assert main(["score", "preset=x", "text=a", "colour=red"]) == 2
    assert "Unknown argument 'colour'" in capsys.readouterr().err
    assert main(["score", "--help"]) == 0
    assert "usage: mistral-tune score" in capsys.readouterr().out


def test_score_refuses_a_causal_lm_before_loading_it(tmp_path, capsys):
    """A DPO or SFT export (MistralForCausalLM) has no score head: one clear error, no made-up accuracy."""
    from mistral_tune import MistralCausalLM

    MistralCausalLM.from_preset("mistral_tiny").save_to_preset(tmp_path / "dpo_merged")
    assert main(["score", f"preset={tmp_path / 'dpo_merged'}", "file=data/preference_sample.jsonl"]) == 2
    err = " ".join(capsys.readouterr().err.split())  # the error is wrapped at 100 columns
    assert "is not a reward model (MistralForCausalLM)" in err and "accuracy:" not in err
    assert main(["score", "preset=mistral_tiny", "text=hi"]) == 2
    assert "is not a reward model (a built-in base preset)" in " ".join(capsys.readouterr().err.split())
