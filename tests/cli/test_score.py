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
