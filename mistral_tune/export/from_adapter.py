"""``mistral-tune export``: merge a saved adapter into its base, streamed shard by shard, and verify it.

    mistral-tune export run_dir=runs/x formats=[merged,preset]
    mistral-tune export adapter=runs/x/adapter base=mistral_7b_en out=merged-7b dtype=bfloat16

Verification loads the base with the adapter (unmerged) once to compute reference logits, frees it,
streams the merge, then reloads the result; so it needs the model in memory once, while the merge
itself needs about one shard. ``verify=false`` skips it (the summary then says so).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Optional

from mistral_tune.adapters.build import read_sidecar
from mistral_tune.config.schema import upgrade_renamed_keys
from mistral_tune.core.errors import UserError

FORMATS = ("merged", "preset", "adapter")


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


def materialize_base(model: dict[str, Any], tmp: Path) -> tuple[Path, Any]:
    """A directory of safetensors for the base; random-init presets (the embedded ones, or any with
    ``load_weights=false``) are rebuilt from their seed and saved."""
    from types import SimpleNamespace

    import mistral_tune.models.loading as models
    from mistral_tune.models.sources import check_weight_files, fetch_hub_repo, resolve_source

    source = resolve_source(model["name"] or model["path"], model["path"])
    if source.local_dir is not None:
        check_weight_files(source.local_dir, allow_pickle=False)
        return source.local_dir, source
    if source.preset is not None and (source.preset.hf_repo is None or not model.get("load_weights", True)):
        model_cfg = SimpleNamespace(
            attn_implementation="sdpa",
            dtype="float32",
            load_weights=False,
            path=None,
            revision=None,
            trust_remote_code=False,
            allow_pickle=False,
        )
        base = models.load_model(model_cfg, source, seed=model["seed"])
        base.save_pretrained(tmp, max_shard_size="2GB")
        return tmp, source
    return fetch_hub_repo(source.hub_repo), source


def reference(base_dir: Path, adapter: Optional[Path], quant: Optional[dict], tokenizer: Any, prompts):
    """Logits of base + adapter (unmerged) in memory, and how far the adapter moves them from the base.

    For QLoRA the reference is the dequantized 4-bit base + adapter, as in the training run.
    """
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from mistral_tune.adapters.quantization import keep_cpu_4bit_numerics
    from mistral_tune.export.merged import dequantized_copy
    from mistral_tune.export.verify import fine_tune_shift, reference_logits

    # The reference runs in float32 whatever the export dtype: it stands for the exact fine-tuned model.
    dtype = torch.float32
    kwargs: dict[str, Any] = {"dtype": dtype}
    if quant:
        base_dtype = getattr(torch, quant["base_dtype"])
        kwargs = {
            "dtype": base_dtype,
            "quantization_config": BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_quant_type=quant["quant_type"],
                bnb_4bit_use_double_quant=quant["double_quant"],
                bnb_4bit_compute_dtype=base_dtype,
            ),
        }
    model = AutoModelForCausalLM.from_pretrained(base_dir, **kwargs)
    if quant:
        keep_cpu_4bit_numerics(model)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter)
    if quant:
        model = dequantized_copy(model, dtype)
    expected = reference_logits(model, tokenizer, prompts)
    return expected, fine_tune_shift(model, tokenizer, prompts, expected)


def export_formats(p: dict[str, Any], opts: dict[str, Any]) -> dict[str, Any]:
    """Run the plan: merged/preset via one streamed, verified merge (the second format links its files),
    adapter via its model card."""
    import mistral_tune.adapters.build as adapters
    import mistral_tune.export.stream_merge as merge
    from mistral_tune.core.files import atomic_directory
    from mistral_tune.export.hf_files import write_tokenizer_files
    from mistral_tune.export.verify import VERIFY_PROMPTS, verify_export, warn_if_indistinguishable
    from mistral_tune.models.tokenizer import load_tokenizer

    results: dict[str, Any] = {}
    with ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="mistral-tune-export-")))
        sidecar = adapters.read_sidecar(p["adapter"]) if p["adapter"] is not None else {}
        quant = sidecar.get("quantization")
        weights = {f: o for f, o in p["outs"].items() if f in ("merged", "preset")}
        if weights:
            base_dir, source = materialize_base(p["model"], tmp / "base")
            tokenizer = load_tokenizer(source)
            expected = shift = None
            if opts["verify"]:
                expected, shift = reference(base_dir, p["adapter"], quant, tokenizer, VERIFY_PROMPTS)
            first = None  # merged and preset hold the same weights: merge and verify once, link the second
            for fmt, out in weights.items():
                with atomic_directory(out) as staging:
                    if first is None:
                        info = merge.stream_merge(
                            base_dir,
                            p["adapter"],
                            staging,
                            dtype_name=opts["dtype"],
                            max_shard_size=opts["max_shard_size"],
                            quantization=quant,
                        )
                        write_tokenizer_files(tokenizer, staging)
                        copy_generation_config(base_dir, staging, tokenizer)
                        diff = tol = None
                        if opts["verify"]:
                            diff, tol = verify_export(
                                staging, tokenizer, VERIFY_PROMPTS, expected, info["dtype"], opts["tolerance"]
                            )
                            warn_if_indistinguishable(shift, tol, info["dtype"])
                    else:
                        shutil.rmtree(staging)
                        shutil.copytree(first, staging, copy_function=link_or_copy, ignore=ignore_metadata)
                    if fmt == "preset":
                        write_metadata(staging, p, tokenizer)
                first = out
                results[fmt] = {
                    "path": str(out),
                    "max_abs_logit_diff": diff,
                    "tolerance": tol,
                    "fine_tune_max_abs_logit_shift": shift,
                    "dtype": info["dtype"],
                    "verified": opts["verify"],
                    "reference": "dequantized 4-bit base + adapter" if quant else "base + adapter (unmerged)",
                    "method": "streamed",
                    "shards": len(info["shards"]),
                }
        if "adapter" in p["outs"]:
            results["adapter"] = {"path": str(write_card(p))}
    if p["run_dir"] is not None:
        record_in_summary(p["run_dir"], results)
    return results


def link_or_copy(src: str, dst: str) -> None:
    """Hard-link a file of the first export into the second (a copy across filesystems)."""
    import os

    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def ignore_metadata(directory: str, names: list[str]) -> list[str]:
    return [n for n in names if n == "metadata.json"]  # preset/ writes its own


def copy_generation_config(base_dir: Path, out: Path, tokenizer: Any) -> None:
    src = base_dir / "generation_config.json"
    if src.exists():
        shutil.copyfile(src, out / "generation_config.json")
        return
    from transformers import GenerationConfig

    GenerationConfig(
        bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id, max_new_tokens=256
    ).save_pretrained(out)


def write_metadata(directory: Path, p: dict[str, Any], tokenizer: Any) -> None:
    """metadata.json for a preset written by the streamed path (same fields as ``export.write_preset``)."""
    from mistral_tune.export.preset import PRESET_METADATA, preset_metadata
    from mistral_tune.models.presets import parameter_count

    config = json.loads((directory / "config.json").read_text(encoding="utf-8"))
    provenance: dict[str, Any] = {"adapter": str(p["adapter"]) if p["adapter"] else None, "base": p["model"]}
    if p["cfg"] is not None:
        from mistral_tune.export.preset import provenance as run_provenance

        provenance.update(run_provenance(p["cfg"]))
    meta = preset_metadata(
        parameter_count=parameter_count(config),
        base_preset=p["model"]["name"] or p["model"]["path"],
        provenance=provenance,
        chat_template=tokenizer.chat_template,
        dtype=config.get("dtype"),
    )
    (directory / PRESET_METADATA).write_text(json.dumps(meta, indent=2, default=str) + "\n", encoding="utf-8")


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
    summary.update({k: v for k, v in results.items() if k in ("merged", "preset")})
    save_json(path, summary)
