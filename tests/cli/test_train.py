"""Mistakes a user can make end in one clear paragraph and exit status 2, never a traceback wall."""

import subprocess
import sys

from mistral_tune import cli
from tests.helpers import write_jsonl


def fails_cleanly(capsys, args) -> str:
    """Run the CLI in-process; assert exit 2 and a one-paragraph message; return it unwrapped."""
    rc = cli.main(args)
    err = capsys.readouterr().err
    assert rc == 2, err
    assert err.startswith("error: ") and "Traceback" not in err, err
    assert "\n\n" not in err.strip(), "one paragraph"
    return " ".join(line.strip() for line in err.splitlines())


def test_unknown_recipe_suggests_the_closest_in_a_real_process():
    proc = subprocess.run([sys.executable, "-m", "mistral_tune", "recipe=sft_lroa"], capture_output=True, text=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("error: Unknown recipe 'sft_lroa'. Did you mean recipe=sft_lora? Available: ")


def test_unknown_override_key(capsys):
    msg = fails_cleanly(capsys, ["recipe=sft_lora", "train.max_stpes=10"])
    assert "Unknown config key 'train.max_stpes' (from command-line override 'train.max_stpes=10')" in msg
    assert "Did you mean 'train.max_steps'?" in msg
    for noise in ("full_key", "reference_type", "object_type", "Could not override"):
        assert noise not in msg


def test_appended_unknown_key_is_refused_too(capsys):
    msg = fails_cleanly(capsys, ["recipe=sft_lora", "+train.warmup=3"])
    assert "Unknown config key 'train.warmup' (from command-line override '+train.warmup=3')" in msg


def test_unknown_group_option_without_search_path_dump(capsys):
    msg = fails_cleanly(capsys, ["recipe=sft_lora", "tracking=wandbb"])
    assert msg.startswith("error: Unknown tracking option 'wandbb' (from command-line override 'tracking=wandbb').")
    assert "Did you mean tracking=wandb?" in msg and "Config search path" not in msg and "provider=" not in msg


def test_missing_data_file_fails_before_the_model_loads(capsys, tmp_path):
    msg = fails_cleanly(capsys, ["recipe=sft_lora", "data.path=nowhere.jsonl", f"output_dir={tmp_path / 'r'}"])
    assert "data.path=nowhere.jsonl: no such file" in msg
    assert not (tmp_path / "r" / "train.log").exists()


def test_columns_fitting_no_format_are_named(capsys, tmp_path):
    data = write_jsonl(tmp_path / "qa.jsonl", [{"question": "q", "answer": "a", "id": i} for i in range(6)])
    msg = fails_cleanly(capsys, ["recipe=sft_lora", f"data.path={data}", f"output_dir={tmp_path / 'r'}"])
    assert "columns found are ['answer', 'id', 'question']" in msg
    assert "messages: a 'messages' list" in msg and "alpaca: 'instruction'" in msg and "text: a 'text' string" in msg


def test_dataset_empty_after_filtering(capsys, tmp_path):
    rows = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": " "}]}] * 5
    data = write_jsonl(tmp_path / "empty.jsonl", rows)
    args = ["recipe=sft_lora", f"data.path={data}", "data.holdout=1", f"output_dir={tmp_path / 'r'}"]
    msg = " ".join(fails_cleanly(capsys, args).split())
    # The data check, before the model: the count, the first row and the field that failed.
    assert "none of its 5 rows can be used as messages data" in msg
    assert "(dropped: 5 empty_field (first: row 1: messages[1].content is empty))" in msg
    assert not (tmp_path / "r" / "adapter").exists()


def test_max_length_beyond_the_model(capsys, tmp_path):
    msg = fails_cleanly(capsys, ["recipe=sft_lora", "trainer.max_length=4096", f"output_dir={tmp_path / 'r'}"])
    assert "trainer.max_length=4096 is beyond the model's max_position_embeddings=2048" in msg


def test_qlora_without_bitsandbytes(capsys, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # `import bitsandbytes` now raises ImportError
    msg = fails_cleanly(capsys, ["recipe=sft_lora", "adapter.name=qlora", f"output_dir={tmp_path / 'r'}"])
    assert "adapter=qlora needs bitsandbytes" in msg and "pip install 'mistral-tune[qlora]'" in msg


def test_flash_attention_without_flash_attn_or_cuda(capsys, tmp_path):
    args = ["recipe=sft_lora", "model.attn_implementation=flash_attention_2", f"output_dir={tmp_path / 'r'}"]
    msg = fails_cleanly(capsys, args)
    assert "flash_attention_2 needs a CUDA GPU and flash-attn >= 2.3" in msg and "attn_implementation=sdpa" in msg


def test_flex_attention_training_on_cpu_is_refused_before_loading(capsys, tmp_path):
    args = ["recipe=sft_lora", "model.attn_implementation=flex_attention", f"output_dir={tmp_path / 'r'}"]
    msg = fails_cleanly(capsys, args)
    assert "flex_attention cannot train without a CUDA GPU" in msg and "attn_implementation=sdpa" in msg
    assert not (tmp_path / "r" / "metrics.jsonl").exists()


def test_output_dir_not_writable(capsys, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    msg = fails_cleanly(capsys, ["recipe=sft_lora", f"output_dir={blocker / 'run'}"])
    assert f"output_dir={blocker / 'run'} is not writable" in msg and "Choose another output_dir" in msg
