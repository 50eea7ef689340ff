"""End-of-run results: ``metrics.png`` (training curves) and the printed summary.

The plot reads metrics.jsonl, so it also works on a finished run directory:
``python -c "from mistral_tune.report import plot_metrics; plot_metrics('runs/x/metrics.jsonl', 'x.png')"``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

# (record key, panel title); a panel is drawn only when some record has a number for its key.
PANELS = (
    (("loss", "eval_loss"), "loss"),
    (("learning_rate",), "learning rate"),
    (("rewards/accuracies", "eval_rewards/accuracies"), "DPO reward accuracy"),
)


def read_metrics(path: Path) -> list[dict[str, Any]]:
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def series(records: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of ``key``; non-finite values (stored as strings) are skipped."""
    points = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
    return [s for s, _ in points], [v for _, v in points]


def plot_metrics(metrics_path: Path, out_path: Path) -> Optional[Path]:
    """Write the loss / learning-rate (/ eval loss / reward accuracy) curves as a PNG; None if no data."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed; must precede pyplot
    import matplotlib.pyplot as plt

    records = read_metrics(metrics_path)
    panels = [(keys, title) for keys, title in PANELS if any(series(records, k)[0] for k in keys)]
    if not panels:
        return None
    fig, axes = plt.subplots(len(panels), 1, figsize=(7, 2.6 * len(panels)), sharex=True, squeeze=False)
    for ax, (keys, title) in zip(axes[:, 0], panels):
        for key in keys:
            steps, values = series(records, key)
            if steps:
                style = "o--" if key.startswith("eval_") else "-"
                ax.plot(steps, values, style, label=key.replace("eval_", "eval ").replace("_", " "), markersize=4)
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
        if len(ax.get_lines()) > 1:
            ax.legend(fontsize=8)
        if title == "learning rate":
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
    axes[-1, 0].set_xlabel("optimizer step")
    fig.tight_layout()
    out_path = Path(out_path)
    fig.savefig(out_path, dpi=110)
    plt.close(fig)
    return out_path


def _num(value: Any, fmt: str = ".4g") -> str:
    return format(value, fmt) if isinstance(value, (int, float)) else "-"


def format_summary(summary: dict[str, Any]) -> str:
    """A short, human-readable block of summary.json's main numbers and paths."""
    memory = summary.get("peak_memory_bytes")
    kind = str(summary.get("peak_memory_kind", "peak")).replace("_", " ")
    mem = f"{memory / 1024**3:.2f} GiB ({kind})" if memory else "-"
    lines = [
        f"run finished: {summary.get('steps')} steps in {_num(summary.get('wall_seconds'), '.1f')} s "
        f"({_num(summary.get('train_seconds'), '.1f')} s training)",
        f"  loss         {_num(summary.get('first_loss'))} -> {_num(summary.get('final_loss'))} "
        f"(best {_num(summary.get('best_loss'))})",
    ]
    if summary.get("final_eval_loss") is not None:
        lines.append(
            f"  eval loss    {_num(summary['final_eval_loss'])} (best {_num(summary.get('best_eval_loss'))}, "
            f"perplexity {_num(summary.get('final_eval_perplexity'))})"
        )
    if summary.get("final_accuracy") is not None:
        held_out = summary.get("final_eval_accuracy")
        lines.append(
            f"  accuracy     {_num(summary['final_accuracy'])} on training pairs, "
            + (f"{_num(held_out)} on held-out pairs" if held_out is not None else "no held-out pairs (data.eval_split)")
        )
    data = summary.get("data") or {}
    if (data.get("length_notice") or {}).get("message"):
        lines.append(f"  data         {data['length_notice']['message']}")
    for note in summary.get("notes") or []:
        lines.append(f"  note         {note}")
    for source in data.get("sources") or []:  # a weighted mixture: what training took from each source
        lines.append(
            f"  source       {source['name']} (weight {source['weight']:g}): {source.get('examples_seen', 0):,} "
            f"examples, {source.get('tokens_seen', 0):,} tokens, {source.get('epochs_seen', 0):.2f} epochs"
        )
    lines += [
        f"  tokens       {summary.get('tokens_seen', 0):,} at {_num(summary.get('tokens_per_second'), ',.0f')} tokens/s",
        f"  peak memory  {mem}",
    ]
    merged = summary.get("merged") or {}
    tracking = summary.get("tracking") or {}
    for label, value in (
        ("adapter", summary.get("adapter")),
        ("merged", merged.get("path") if isinstance(merged, dict) else merged),
        ("preset", (summary.get("preset") or {}).get("path")),
        ("plot", summary.get("plot")),
        ("tracking", tracking.get("url") or tracking.get("sync_command") or tracking.get("dir")),
        ("summary", str(Path(summary["run_dir"]) / "summary.json") if summary.get("run_dir") else None),
    ):
        if value:
            lines.append(f"  {label:<12} {value}")
    return "\n".join(lines)
