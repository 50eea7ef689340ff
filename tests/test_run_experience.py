"""The pieces around a run, one at a time: metrics records, progress output, plot, summary, W&B mode
choice, eval split."""

import io
import json
import logging

import pytest

from mistral_tune.tracking.metrics import MetricsJsonl
from mistral_tune.tracking.progress import ProgressReporter
from mistral_tune.tracking.report import format_summary, plot_metrics
from mistral_tune.tracking.trackers import wandb_mode


def state(step, max_steps=120):
    from transformers import TrainerState

    return TrainerState(global_step=step, max_steps=max_steps)  # is_world_process_zero defaults to True


def feed(metrics, reporter, step, logs):
    metrics.on_log(None, state(step), None, logs=dict(logs))
    reporter.on_log(None, state(step), None, logs=dict(logs))


def test_metrics_keep_eval_time_out_of_training_throughput(tmp_path):
    metrics = MetricsJsonl(tmp_path / "metrics.jsonl")
    metrics.on_train_begin(None, state(0), None)
    metrics.on_log(None, state(10), None, logs={"loss": 2.0, "learning_rate": 1e-3, "tokens_seen": 1000})
    metrics._last = (metrics._last[0] - 5.0, metrics._last[1])  # pretend 5 s of training passed ...
    metrics.on_log(None, state(10), None, logs={"eval_loss": 1.5, "eval_runtime": 100.0, "tokens_seen": 1000})
    metrics._last = (metrics._last[0] - 100.0, metrics._last[1])  # ... then 100 s of evaluation
    metrics.on_log(None, state(20), None, logs={"loss": 1.8, "learning_rate": 1e-3, "tokens_seen": 2000})
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [10, 10, 20]
    assert records[1]["tokens_per_second"] is None and records[1]["eval_loss"] == 1.5
    # 1000 tokens over ~5 s of training; without the correction it would be ~1000 / 105 s
    assert 150 < records[2]["tokens_per_second"] < 250


def test_progress_log_lines_when_not_on_a_tty(tmp_path, caplog):
    metrics = MetricsJsonl(tmp_path / "m.jsonl")
    reporter = ProgressReporter(metrics, stream=io.StringIO(), tty=False)
    reporter.on_train_begin(None, state(0), None)
    with caplog.at_level(logging.INFO, logger="mistral_tune.tracking.progress"):
        feed(metrics, reporter, 20, {"loss": 7.1, "learning_rate": 2e-4, "tokens_seen": 36000})
        feed(metrics, reporter, 20, {"eval_loss": 6.9, "eval_perplexity": 992.3, "eval_runtime": 0.1})
        feed(metrics, reporter, 20, {"train_runtime": 9.0, "tokens_seen": 36000})  # totals: no new record
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2
    assert lines[0].startswith("step 20/120  loss 7.1  lr 0.0002  tok/s ") and " eta 0:" in lines[0]
    assert lines[1] == "step 20/120  eval_loss 6.9  eval_ppl 992.3"


def test_progress_bar_on_a_tty_shows_loss_and_throughput(tmp_path):
    stream = io.StringIO()
    metrics = MetricsJsonl(tmp_path / "m.jsonl")
    reporter = ProgressReporter(metrics, stream=stream, tty=True)
    reporter.on_train_begin(None, state(0, 40), None)
    for step in range(1, 11):
        reporter.on_step_end(None, state(step, 40), None)
    feed(metrics, reporter, 10, {"loss": 3.25, "learning_rate": 1e-4, "tokens_seen": 5000})
    reporter.on_train_end(None, state(10, 40), None)
    out = stream.getvalue()
    assert "10/40" in out and "loss 3.25" in out and "tok/s " in out and "<" in out  # "<" precedes tqdm's ETA


def test_plot_draws_eval_and_reward_panels_only_when_present(tmp_path):
    import matplotlib.image

    sft = [{"step": s, "loss": 3 - s / 10, "learning_rate": 1e-3} for s in range(1, 11)]
    sft.append({"step": 10, "eval_loss": 2.5, "eval_perplexity": 12.2})
    dpo = [{**r, "rewards/accuracies": 0.5 + r["step"] / 40} for r in sft if "loss" in r]
    paths = {}
    for name, records in (("sft", sft), ("dpo", dpo)):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
        paths[name] = plot_metrics(tmp_path / f"{name}.jsonl", tmp_path / f"{name}.png")
    assert paths["sft"].read_bytes()[:4] == b"\x89PNG"
    sft_h, dpo_h = (matplotlib.image.imread(paths[n]).shape[0] for n in ("sft", "dpo"))
    assert dpo_h > sft_h * 1.3  # a third panel (reward accuracy) below loss and learning rate
    (tmp_path / "none.jsonl").write_text("")
    assert plot_metrics(tmp_path / "none.jsonl", tmp_path / "none.png") is None


def test_printed_summary_names_results_and_paths():
    text = format_summary(
        {
            "run_dir": "runs/x",
            "steps": 120,
            "wall_seconds": 60.2,
            "train_seconds": 45.0,
            "first_loss": 10.6,
            "final_loss": 2.1,
            "best_loss": 2.0,
            "tokens_seen": 27150,
            "tokens_per_second": 603.3,
            "peak_memory_bytes": 2 * 1024**3,
            "peak_memory_kind": "cuda_max_allocated",
            "adapter": "runs/x/adapter",
            "merged": {"path": "runs/x/merged"},
            "plot": "runs/x/metrics.png",
            "tracking": {"name": "wandb", "sync_command": "wandb sync runs/x/wandb/offline-run-1"},
        }
    )
    assert "120 steps in 60.2 s" in text and "10.6 -> 2.1 (best 2)" in text and "27,150 at 603 tokens/s" in text
    assert "2.00 GiB (cuda max allocated)" in text and "runs/x/merged" in text and "runs/x/summary.json" in text
    assert "wandb sync runs/x/wandb/offline-run-1" in text


def test_wandb_mode(tmp_path):
    netrc = tmp_path / "netrc"
    assert wandb_mode("auto", {"WANDB_API_KEY": "k" * 40})[0] == "online"
    assert wandb_mode("auto", {"NETRC": str(netrc)}) == ("offline", "not logged in to W&B and WANDB_API_KEY is not set")
    netrc.write_text("machine api.wandb.ai\n  login user\n  password " + "k" * 40 + "\n")
    assert wandb_mode("auto", {"NETRC": str(netrc)})[0] == "online"  # `wandb login` writes this entry
    assert wandb_mode("auto", {"NETRC": str(netrc), "WANDB_MODE": "offline"})[0] == "offline"
    assert wandb_mode("offline", {"WANDB_API_KEY": "k" * 40})[0] == "offline"


@pytest.mark.parametrize("split,expected", [("0.1", 0.1), ("data/eval.jsonl", None), (None, None)])
def test_eval_split_is_a_fraction_or_a_file(split, expected):
    from mistral_tune.config.schema import eval_fraction

    assert eval_fraction(split) == expected


def test_eval_split_from_a_file(tmp_path, compose):
    import mistral_tune.data.sft as data
    from mistral_tune.models.sources import resolve_source
    from mistral_tune.models.tokenizer import load_tokenizer

    rows = [{"instruction": f"say {i}", "output": f"{i}"} for i in range(5)]
    (tmp_path / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = compose("sft_lora", [f"data.eval_split={tmp_path / 'eval.jsonl'}"])
    prepared = data.prepare_sft_data(cfg.data, cfg.trainer, load_tokenizer(resolve_source("mistral_tiny")))
    assert len(prepared.eval) == 5 and prepared.report.eval_read == 5 and prepared.format == "messages"
    assert len(prepared.train) == 396  # the file does not take rows from training


def test_eval_fraction_must_be_between_0_and_1(compose):
    from mistral_tune.core.errors import UserError

    with pytest.raises(UserError, match="data.eval_split=1.5 must be a fraction between 0 and 1, or a file"):
        compose("sft_lora", ["data.eval_split=1.5"])


@pytest.mark.slow
def test_gradient_checkpointing_is_on_during_training_only_when_asked(tmp_path, compose):
    """train.gradient_checkpointing reaches the model (transformers 5.2x calls it activation_checkpointing)."""
    from transformers import TrainerCallback

    from mistral_tune.pipeline.run import run

    seen = []

    class Probe(TrainerCallback):
        def on_step_begin(self, args, state, control, model=None, **kwargs):
            seen.append(model.get_base_model().is_activation_checkpointing)

    for flag in (True, False):
        overrides = [f"train.gradient_checkpointing={flag}", "train.max_steps=1", "export.merged=false",
                     "export.num_samples=0", f"output_dir={tmp_path / str(flag)}"]  # fmt: skip
        run(compose("sft_lora", overrides), callbacks=[Probe()])
    assert seen == [True, False]
