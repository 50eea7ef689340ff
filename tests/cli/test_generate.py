"""`mistral-tune generate` and `mistral-tune chat` on a run's merged/ directory."""

from __future__ import annotations

import io

import pytest

from mistral_tune import MistralCausalLM
from mistral_tune.cli import COMMANDS, main

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def merged_dir(tmp_path_factory):
    """A run's merged/ directory, written by the run's own export step (LoRA merged, verified)."""
    from peft import LoraConfig, get_peft_model

    from mistral_tune.export.pipeline import export_merged
    from mistral_tune.export.verify import VERIFY_PROMPTS

    lm = MistralCausalLM.from_preset("mistral_tiny")
    peft_model = get_peft_model(
        lm.hf_model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    )
    out = tmp_path_factory.mktemp("run") / "merged"
    info = export_merged(peft_model, lm.tokenizer, out, dtype_name="float32", prompts=VERIFY_PROMPTS)
    assert info["verified"]
    return out


def test_commands_are_registered():
    assert {"generate", "chat", "list"} <= set(COMMANDS)


def test_generate_cli_on_merged_dir(merged_dir, capsys):
    args = [
        "generate",
        f"preset={merged_dir}",
        "prompt=The capital of France is",
        "sampler=greedy",
        "max_length=20",
        "strip_prompt=true",
    ]
    assert main(args) == 0
    printed = capsys.readouterr().out
    lm = MistralCausalLM.from_preset(str(merged_dir))
    lm.compile(sampler="greedy")
    expected = lm.generate("The capital of France is", max_length=20, strip_prompt=True)
    assert printed == expected + "\n"
    # Two prompts: one left-padded batch, printed in order, separated by a rule.
    assert main([*args, "prompt=def add(a, b):"]) == 0
    parts = capsys.readouterr().out.split("\n" + "-" * 40 + "\n")
    batch = lm.generate(["The capital of France is", "def add(a, b):"], max_length=20, strip_prompt=True)
    assert parts == [batch[0], batch[1] + "\n"]


@pytest.mark.parametrize(
    "args,message",
    [
        (["prompt=hi"], "No preset given"),
        (["preset=mistral_tiny"], "No prompt given"),
        (["preset=mistral_tiny", "prompt=hi", "colour=red"], "Unknown argument 'colour'"),
        (["preset=mistral_tiny", "prompt=hi", "sampler=greedy", "k=3"], "does not take k"),
        (["preset=mistral_tiny", "prompt=hi", "max_length=many"], "must be an integer"),
        (["preset=no/such/dir/here", "prompt=hi"], "neither a built-in preset"),
    ],
)
def test_generate_cli_errors(args, message, capsys):
    assert main(["generate", *args]) == 2
    assert message in capsys.readouterr().err


def test_chat_applies_template_and_exits_on_eof(merged_dir, capsys, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO("Hello!\n/reset\n\nHello!\n"))
    assert main(["chat", f"preset={merged_dir}", "sampler=greedy", "max_new_tokens=6", "system=Be brief."]) == 0
    out = capsys.readouterr().out
    lm = MistralCausalLM.from_preset(str(merged_dir))
    lm.compile(sampler="greedy")
    conversation = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello!"}]
    n = len(lm.tokenizer.apply_chat_template(conversation))
    reply = lm.generate(conversation, max_length=n + 6, strip_prompt=True).strip()
    # After /reset the same first turn gives the same reply again.
    assert out.count(reply + "\n") == 2 and reply
