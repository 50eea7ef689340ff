import json

from mistral_tune.tracking.report import format_summary, plot_metrics


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
