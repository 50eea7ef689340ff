"""``mistral-tune export``: merge a saved adapter into its base, streamed shard by shard, and verify it.

    mistral-tune export run_dir=runs/x formats=[merged,preset]
    mistral-tune export adapter=runs/x/adapter base=mistral_7b_en out=merged-7b dtype=bfloat16

Verification loads the base with the adapter (unmerged) once to compute reference logits, frees it,
streams the merge, then reloads the result; so it needs the model in memory once, while the merge
itself needs about one tensor (a 7B merge: under 1 GiB of RSS). ``verify=false`` skips it (the summary then says so).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from mistral_tune.adapters.build import read_sidecar
from mistral_tune.config.registry import EXPORT_FORMATS
from mistral_tune.config.schema import upgrade_renamed_keys
from mistral_tune.core.errors import UserError

FORMATS = (*EXPORT_FORMATS, "adapter")


def plan(opts: dict[str, Any]) -> dict[str, Any]:
    """Resolve what to merge into what, and where each format goes."""
    from omegaconf import OmegaConf

    if opts.get("run_dir"):
        run_dir = Path(opts["run_dir"])
        resolved = run_dir / "resolved_config.yaml"
        if not resolved.exists():
            raise UserError(f"run_dir={run_dir} has no resolved_config.yaml; is it a mistral-tune run directory?")
        cfg = upgrade_renamed_keys(OmegaConf.load(resolved))  # runs saved before a key was renamed
        formats = opts["formats"] or ["merged"]
        adapter = run_dir / "adapter" if cfg.adapter.name != "none" else None
        if adapter is not None and (adapter / "adapter_config.json").is_file():
            check_causal_lm_adapter(adapter)
        model = {
            "name": cfg.model.name,
            "path": cfg.model.path,
            "seed": cfg.train.seed,
            "load_weights": cfg.model.load_weights,
        }
        if adapter is None:
            if not (run_dir / "merged" / "config.json").exists():
                raise UserError(f"{run_dir} is a full fine-tune without merged/; its weights were not saved.")
            model = {"name": None, "path": str(run_dir / "merged"), "seed": None}
        outs = {f: run_dir / ("adapter" if f == "adapter" else f) for f in formats}
        return {"adapter": adapter, "model": model, "outs": outs, "run_dir": run_dir, "cfg": cfg}
    if not (opts.get("adapter") and opts.get("base") and opts.get("out")):
        raise UserError(
            "mistral-tune export needs run_dir=PATH, or adapter=PATH base=PRESET_OR_DIR out=DIR. See `mistral-tune export --help`."
        )
    formats = opts["formats"] or ["merged"]
    if "adapter" in formats:
        raise UserError("formats=adapter needs run_dir=PATH (the model card is written from the run's summary).")
    out = Path(opts["out"])
    outs = {formats[0]: out} if len(formats) == 1 else {f: out / f for f in formats}
    base = opts["base"]
    is_dir = Path(base).expanduser().is_dir()
    adapter = Path(opts["adapter"])
    if not (adapter / "adapter_config.json").is_file():
        raise UserError(f"adapter={adapter} is not an adapter directory (no adapter_config.json).")
    check_causal_lm_adapter(adapter)
    # A random-init base is rebuilt from the seed it was trained on: the one the adapter's sidecar records
    # when it names this base, else the recipes' train.seed (42).
    trained_on = read_sidecar(adapter).get("base") or {}
    same_base = not is_dir and trained_on.get("name") == base
    seed = opts["seed"] if opts.get("seed") is not None else (trained_on.get("seed", 42) if same_base else 42)
    model = {"name": None if is_dir else base, "path": base if is_dir else None, "seed": seed}
    if same_base and "load_weights" in trained_on:
        model["load_weights"] = trained_on["load_weights"]
    return {"adapter": adapter, "model": model, "outs": outs, "run_dir": None, "cfg": None}


def check_causal_lm_adapter(adapter: Path) -> None:
    """Refuse a reward-model (sequence-classification) adapter before any weights are read."""
    task = json.loads((adapter / "adapter_config.json").read_text(encoding="utf-8")).get("task_type")
    if task == "SEQ_CLS":
        raise UserError(
            f"{adapter} is a reward-model adapter (task_type SEQ_CLS); mistral-tune export merges causal-LM "
            "adapters. A reward run's merged/ (written when it trains) is the merged reward model."
        )


def export_formats(p: dict[str, Any], opts: dict[str, Any]) -> dict[str, Any]:
    """Run the plan: merged/preset through the export pipeline (one streamed merge, one verification;
    the second format links the first's files), adapter via its model card."""
    import mistral_tune.adapters.build as adapters
    from mistral_tune.export.pipeline import export_checkpoint, materialize_base
    from mistral_tune.models.tokenizer import load_tokenizer

    results: dict[str, Any] = {}
    weights = {f: o for f, o in p["outs"].items() if f in EXPORT_FORMATS}
    if weights:
        with tempfile.TemporaryDirectory(prefix="mistral-tune-export-") as tmp:
            sidecar = adapters.read_sidecar(p["adapter"]) if p["adapter"] is not None else {}
            base_dir, source = materialize_base(p["model"], Path(tmp) / "base")
            tokenizer = load_tokenizer(source)
            results.update(
                export_checkpoint(
                    base_dir,
                    p["adapter"],
                    weights,
                    tokenizer=tokenizer,
                    verify=opts["verify"],
                    dtype_name=opts["dtype"],
                    max_shard_size=opts["max_shard_size"],
                    tolerance=opts["tolerance"],
                    quantization=sidecar.get("quantization"),
                    base_preset=p["model"]["name"] or p["model"]["path"],
                    provenance=preset_provenance(p),
                    gguf_types=opts.get("gguf_types") or ["q8_0"],
                    gguf_tolerance=opts.get("gguf_tolerance"),
                    gguf_name=gguf_name(p) if "gguf" in p["outs"] else "model",  # unused without gguf/
                )
            )
    if "adapter" in p["outs"]:
        results["adapter"] = {"path": str(write_card(p))}
    if p["run_dir"] is not None:
        record_in_summary(p["run_dir"], results)
    return results


def gguf_name(p: dict[str, Any]) -> str:
    """The GGUF files' name: the run directory's, else the export directory's."""
    if p["run_dir"] is not None:
        return Path(p["run_dir"]).resolve().name
    out = Path(p["outs"]["gguf"])
    return (out.parent if out.name == "gguf" and len(p["outs"]) > 1 else out).resolve().name


def preset_provenance(p: dict[str, Any]) -> dict[str, Any]:
    """metadata.json's provenance for a standalone export: adapter, base, and the run's settings."""
    provenance: dict[str, Any] = {"adapter": str(p["adapter"]) if p["adapter"] else None, "base": p["model"]}
    if p["cfg"] is not None:
        from mistral_tune.export.preset import provenance as run_provenance

        provenance.update(run_provenance(p["cfg"]))
    return provenance


def write_card(p: dict[str, Any]) -> Path:
    from mistral_tune.export.model_card import write_model_card

    summary_path = p["run_dir"] / "summary.json"
    summary = json.loads(summary_path.read_text(encoding="utf-8")) if summary_path.exists() else {}
    path = write_model_card(p["run_dir"] / "adapter", p["cfg"], summary)
    if path is None:
        raise UserError(f"{p['run_dir']} has no adapter/ to publish (adapter=none trains every weight).")
    return path


def record_in_summary(run_dir: Path, results: dict[str, Any]) -> None:
    from mistral_tune.core.files import save_json

    path = run_dir / "summary.json"
    if not path.exists():
        return
    summary = json.loads(path.read_text(encoding="utf-8"))
    summary.update({k: v for k, v in results.items() if k in EXPORT_FORMATS})
    save_json(path, summary)
