"""The pieces around a run, one at a time: metrics records, progress output, plot, summary, W&B mode
choice, eval split."""

import io
import json
import logging

from mistral_tune.tracking.metrics import MetricsJsonl
from mistral_tune.tracking.progress import ProgressReporter


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
