"""Run lm-evaluation-harness (``lm-eval[hf]``) on a run's merged model, or on base + adapter unmerged.

    mistral-tune eval preset=runs/x tasks=[mistral_tune_mc,mistral_tune_ppl]

Two calls at most, because of how lm-eval scores perplexity: its rolling log-likelihood already puts
BOS in front of each document as context, and with ``add_bos_token=True`` the tokenizer adds a second
one, whose probability is then scored as if it were text. So rolling-log-likelihood tasks run with
``add_bos_token=False`` (one BOS, never scored), and every other task with ``add_bos_token=True`` (the
prompt starts with BOS, as Mistral models were trained; off, multiple-choice scores change).
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

from mistral_tune.core.errors import UserError
from mistral_tune.core.files import save_json
from mistral_tune.evaluation.tasks import ROLLING, resolve_tasks

log = logging.getLogger(__name__)

# The metrics each local task reports (lm-eval keys them "<metric>,<filter>", e.g. "acc,none").
MAIN_METRIC = {"multiple_choice": "acc", ROLLING: "word_perplexity"}


def check_installed() -> None:
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise UserError(
            "mistral-tune eval runs lm-evaluation-harness, which is not installed: pip install 'mistral-tune[eval]'"
        ) from None


def resolve_target(preset: str, tmp: Path) -> dict[str, Any]:
    """What to evaluate: ``{"pretrained", "peft", "tokenizer", "run_dir", "label"}``.

    A run directory gives its merged/ when there is one, else its base (rebuilt from the seed for a
    random-init preset) with adapter/ on top, unmerged; any other directory is a Hugging Face model.
    """
    from mistral_tune.export.hf_files import write_tokenizer_files
    from mistral_tune.export.pipeline import materialize_base
    from mistral_tune.models.tokenizer import load_tokenizer

    path = Path(preset).expanduser()
    if (path / "resolved_config.yaml").is_file():
        from omegaconf import OmegaConf

        cfg = OmegaConf.load(path / "resolved_config.yaml")
        if (path / "merged" / "config.json").is_file():
            return {"pretrained": path / "merged", "peft": None, "tokenizer": path / "merged", "run_dir": path,
                    "label": f"{path}/merged"}  # fmt: skip
        if not (path / "adapter" / "adapter_config.json").is_file():
            raise UserError(f"{path} has neither merged/ nor adapter/ to evaluate.")
        model = {"name": cfg.model.name, "path": cfg.model.path, "seed": cfg.train.seed,
                 "load_weights": cfg.model.load_weights}  # fmt: skip
        base_dir, source = materialize_base(model, tmp / "base")
        tokenizer_dir = tmp / "tokenizer"
        write_tokenizer_files(load_tokenizer(source), tokenizer_dir)
        return {"pretrained": base_dir, "peft": path / "adapter", "tokenizer": tokenizer_dir, "run_dir": path,
                "label": f"{cfg.model.name or cfg.model.path} + {path}/adapter"}  # fmt: skip
    if (path / "config.json").is_file():
        return {"pretrained": path, "peft": None, "tokenizer": path, "run_dir": None, "label": str(path)}
    raise UserError(
        f"preset={preset} is neither a mistral-tune run directory (resolved_config.yaml) nor a Hugging Face model "
        "directory (config.json). Evaluating a GGUF is not supported (no usable lm-eval backend for it yet)."
    )


def run_lm_eval(
    target: dict[str, Any], tasks: list[Any], *, add_bos_token: bool, limit: Optional[int], batch_size: int
) -> dict[str, Any]:
    """One ``lm_eval.simple_evaluate`` call on CPU or the first GPU, in float32 on CPU."""
    import torch
    from lm_eval import simple_evaluate

    cuda = torch.cuda.is_available()
    model_args: dict[str, Any] = {
        "pretrained": str(target["pretrained"]),
        "tokenizer": str(target["tokenizer"]),
        "dtype": "auto" if cuda else "float32",
        "add_bos_token": add_bos_token,
        "device": "cuda" if cuda else "cpu",
    }
    if target["peft"] is not None:
        model_args["peft"] = str(target["peft"])
    return simple_evaluate(
        model="hf",
        model_args=model_args,
        tasks=tasks,
        batch_size=batch_size,
        limit=limit,
        log_samples=False,
        bootstrap_iters=0,
    )


def evaluate(preset: str, task_names: list[str], *, limit: Optional[int] = None, batch_size: int = 8) -> dict[str, Any]:
    """Run ``task_names`` on ``preset`` (a run directory or a model directory); for a run, write
    ``eval/results.json`` and an ``eval`` entry in its summary.json. Returns that entry.

    Example::

        evaluate("runs/sft_lora-20260101-120000", ["mistral_tune_mc", "mistral_tune_ppl"])
    """
    check_installed()
    resolved = resolve_tasks(list(task_names))
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="mistral-tune-eval-") as tmp:
        target = resolve_target(preset, Path(tmp))
        calls = {
            False: [spec for _, spec, kind in resolved if kind == ROLLING],
            True: [spec for _, spec, kind in resolved if kind != ROLLING],
        }
        raw: dict[str, Any] = {"results": {}, "configs": {}, "versions": {}, "n-samples": {}}
        timings = {}
        for add_bos, specs in calls.items():
            if not specs:
                continue
            t0 = time.time()
            out = run_lm_eval(target, specs, add_bos_token=add_bos, limit=limit, batch_size=batch_size)
            timings["perplexity" if not add_bos else "other"] = round(time.time() - t0, 1)
            for key in raw:
                raw[key].update(out.get(key) or {})
    results = {name: task_metrics(raw["results"].get(name, {})) for name, _, _ in resolved}
    entry = {
        "model": target["label"],
        "tasks": results,
        "limit": limit,
        "seconds": round(time.time() - started, 1),
        "call_seconds": timings,
        "lm_eval_version": lm_eval_version(),
    }
    if target["run_dir"] is not None:
        run_dir = Path(target["run_dir"])
        (run_dir / "eval").mkdir(exist_ok=True)
        save_json(run_dir / "eval" / "results.json", {**entry, "lm_eval": jsonable(raw)})
        entry["path"] = str(run_dir / "eval" / "results.json")
        summary_path = run_dir / "summary.json"
        if summary_path.exists():
            summary = json.loads(summary_path.read_text(encoding="utf-8"))
            summary["eval"] = entry
            save_json(summary_path, summary)
    for name, metrics in results.items():
        log.info("eval: %s %s", name, ", ".join(f"{k} {v:.4g}" for k, v in metrics.items() if isinstance(v, float)))
    return entry


def task_metrics(task_result: dict[str, Any]) -> dict[str, Any]:
    """lm-eval's "acc,none" / "acc_stderr,none" keys as "acc" / "acc_stderr"."""
    out = {}
    for key, value in task_result.items():
        metric, _, filt = key.partition(",")
        if filt in ("none", "") and isinstance(value, (int, float)) and metric != "alias":
            out[metric] = float(value)
    return out


def jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def lm_eval_version() -> str:
    from importlib.metadata import version

    return version("lm_eval")
