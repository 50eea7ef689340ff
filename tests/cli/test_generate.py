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


@pytest.fixture(scope="module")
def sft_run_merged(merged_dir, tmp_path_factory):
    """The same weights as a merged/ inside an SFT run directory (its resolved_config.yaml and summary.json)."""
    import json
    import shutil

    run = tmp_path_factory.mktemp("sft_run")
    shutil.copytree(merged_dir, run / "merged")
    (run / "resolved_config.yaml").write_text("recipe: sft_lora\ntrainer:\n  name: sft\ndata:\n  format: auto\n")
    (run / "summary.json").write_text(json.dumps({"recipe": "sft_lora", "data_format": "messages"}))
    return run / "merged"


def greedy_lm(path):
    lm = MistralCausalLM.from_preset(str(path))
    lm.compile(sampler="greedy")
    return lm


def test_generate_uses_the_chat_template_for_a_run_chat_model(sft_run_merged, capsys):
    args = ["generate", f"preset={sft_run_merged}", "prompt=Give three tips.", "sampler=greedy", "max_length=24",
            "strip_prompt=true"]  # fmt: skip
    lm = greedy_lm(sft_run_merged)
    chat = lm.generate([{"role": "user", "content": "Give three tips."}], max_length=24, strip_prompt=True)
    raw = lm.generate("Give three tips.", max_length=24, strip_prompt=True)
    assert chat != raw and chat.strip()
    assert main(args) == 0
    captured = capsys.readouterr()
    assert captured.out == chat + "\n" and "chat template (trained by sft_lora on messages data" in captured.err
    assert main([*args, "chat=false"]) == 0  # raw completion on request
    assert capsys.readouterr().out == raw + "\n"


def test_generate_stays_raw_for_a_model_without_chat_metadata(merged_dir, capsys):
    args = ["generate", f"preset={merged_dir}", "prompt=Hello", "sampler=greedy", "max_length=16", "strip_prompt=true"]
    assert main(args) == 0
    assert capsys.readouterr().out == greedy_lm(merged_dir).generate("Hello", max_length=16, strip_prompt=True) + "\n"
    assert main([*args, "chat=maybe"]) == 2
    assert "chat='maybe' must be auto, true or false" in capsys.readouterr().err


def test_an_empty_generation_is_reported_with_its_reason(merged_dir, capsys):
    from mistral_tune.inference.generation import generate_ids

    lm = greedy_lm(merged_dir)
    prompt_ids = [lm.tokenizer.encode("Hello")]
    first = generate_ids(lm.hf_model, lm.tokenizer, prompt_ids, sampler=lm.sampler, max_length=4, stop_ids=None)[0][0]
    # The model's first greedy token made a stop token: the answer is empty, as with EOS on a chat model.
    args = ["generate", f"preset={merged_dir}", "prompt=Hello", "sampler=greedy", "max_length=16",
            "strip_prompt=true", f"stop_token_ids={first}"]  # fmt: skip
    assert main(args) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert f"empty answer to prompt 1 ('Hello'): the model's first new token was stop token {first}" in (captured.err)


class TerminalInput(io.StringIO):
    def isatty(self):
        return True


@pytest.mark.parametrize("terminal", [True, False])
def test_chat_prompt_goes_to_stderr_not_stdout(merged_dir, capsys, monkeypatch, terminal):
    monkeypatch.setattr("sys.stdin", (TerminalInput if terminal else io.StringIO)("Hello!\n"))
    assert main(["chat", f"preset={merged_dir}", "sampler=greedy", "max_new_tokens=4"]) == 0
    captured = capsys.readouterr()
    assert "> " not in captured.out  # piped output holds the answers only
    assert ("> " in captured.err) == terminal


def test_chat_model_reason_reads_metadata_and_instruct_presets(tmp_path):
    from mistral_tune.inference.generation import chat_model_reason

    preset_meta = {"provenance": {"recipe": "dpo_lora", "trainer": "dpo", "data_format": "hh"}}
    assert "trained by dpo_lora on hh data" in chat_model_reason(None, preset_meta, "mistral_tiny")
    text_sft = {"provenance": {"recipe": "sft_lora", "trainer": "sft", "data_format": "text"}}
    assert chat_model_reason(None, text_sft, "mistral_tiny") is None  # plain-text SFT stays a language model
    assert chat_model_reason(None, {}, "mistral_instruct_7b_en") == "mistral_instruct_7b_en is an instruct model"
    assert chat_model_reason(None, {}, "mistral_7b_en") is None
    assert chat_model_reason(None, {}, "runs/instruct-test/merged") is None  # a path is not a preset id
