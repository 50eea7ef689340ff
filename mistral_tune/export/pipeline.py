"""The one export pipeline: merged/ and preset/ from a base checkpoint's files and an adapter's files.

Every export, whether a run writes it, ``mistral-tune export`` writes it later, or
``MistralCausalLM.save_to_preset`` writes it, goes through ``export_checkpoint``:

1. the reference logits: the model the export must reproduce (the trained model in memory, or base
   + adapter loaded from disk); for QLoRA, the dequantized 4-bit base + adapter;
2. one streamed merge (``stream_merge``: shard by shard, about one shard of memory) into a hidden
   sibling of the first format's directory, plus the tokenizer files and the generation config;
3. one verification (reload with plain transformers, compare logits), then the rename into place;
4. the second format hard-links the first's files; preset/ adds ``metadata.json``;
5. gguf/ is written from that verified directory (a hidden temporary one when gguf is the only
   format), one file per type, each verified in llama.cpp (``export_gguf``).

A trained model with no adapter files to stream from (a full fine-tune, a reward model's adapter
with its new score head, the Python API's in-place LoRA) goes through the same steps after
``export_in_memory`` writes its weights (LoRA folded in, see ``merged_state_dict``) to a hidden
temporary directory, which then plays the base.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Optional, Sequence

from mistral_tune.config.registry import EXPORT_FORMATS
from mistral_tune.core.files import atomic_directory, save_json

log = logging.getLogger(__name__)


# Formats in Hugging Face layout, written by the streamed merge; gguf is written from the first of them.
WEIGHT_FORMATS = tuple(f for f in EXPORT_FORMATS if f != "gguf")

PRESET_METADATA = "metadata.json"


def preset_metadata(
    *, parameter_count: int, base_preset: Any, provenance: Any, chat_template: Optional[str], dtype: Optional[str]
) -> dict[str, Any]:
    """``metadata.json`` of a preset directory (keras-hub's fields plus our provenance)."""
    from mistral_tune import __version__

    return {
        "mistral_tune_version": __version__,
        "parameter_count": int(parameter_count),
        "date_saved": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "tasks": ["CausalLM"],
        "base_preset": base_preset,
        "chat_template": chat_template,
        "dtype": dtype,
        "provenance": provenance,
    }


def write_generation_config(out_dir: Path, tokenizer: Any) -> None:
    """``generation_config.json``: the tokenizer's BOS/EOS/pad ids and a default length."""
    from transformers import GenerationConfig

    GenerationConfig(
        bos_token_id=tokenizer.bos_id,
        eos_token_id=tokenizer.eos_id,
        pad_token_id=tokenizer.pad_id,
        max_new_tokens=256,
    ).save_pretrained(out_dir)


def can_generate(out_dir: Path) -> bool:
    """False for a reward model (sequence classification): it has no generation settings."""
    config = json.loads((Path(out_dir) / "config.json").read_text(encoding="utf-8"))
    return not any(a.endswith("ForSequenceClassification") for a in config.get("architectures") or [])


def shard_parameter_count(out_dir: Path) -> int:
    """Parameters stored in the safetensors shards of ``out_dir`` (read from the headers only)."""
    from safetensors import safe_open

    from mistral_tune.export.stream_merge import base_shards

    total = 0
    for shard in base_shards(Path(out_dir)):
        with safe_open(str(shard), framework="pt") as f:
            for name in f.keys():
                shape = f.get_slice(name).get_shape()
                n = 1
                for d in shape:
                    n *= d
                total += n
    return total


def write_preset_metadata(directory: Path, tokenizer: Any, *, base_preset: Any, provenance: Any) -> dict[str, Any]:
    """``metadata.json`` of a preset directory whose weights and config.json are already written."""
    config = json.loads((Path(directory) / "config.json").read_text(encoding="utf-8"))
    meta = preset_metadata(
        parameter_count=shard_parameter_count(directory),
        base_preset=base_preset,
        provenance=provenance,
        chat_template=tokenizer.chat_template,
        dtype=config.get("dtype"),
    )
    save_json(Path(directory) / PRESET_METADATA, meta)
    return meta


def link_or_copy(src: str, dst: str) -> None:
    """Hard-link a file of the first export into the second (a copy across filesystems)."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _ignore_metadata(directory: str, names: list[str]) -> list[str]:
    return [n for n in names if n == "metadata.json"]  # preset/ writes its own


# -- references ---------------------------------------------------------------------------------------


def no_reference(label: str) -> dict[str, Any]:
    """What the summary says about an export that was not verified."""
    return {"logits": None, "info": {"reference": label, "fine_tune_max_abs_logit_shift": None}}


def in_memory_reference(model: Any, tokenizer: Any, prompts: Sequence[str]) -> dict[str, Any]:
    """Reference logits of the trained model in memory (QLoRA: its dequantized copy, see docs/export.md)."""
    import torch

    from mistral_tune.adapters.quantization import is_4bit_linear
    from mistral_tune.export.merged import dequantized_copy
    from mistral_tune.export.verify import fine_tune_shift, reference_logits

    if any(is_4bit_linear(m) for m in model.modules()):
        plain = dequantized_copy(model, torch.float32)
        expected = reference_logits(plain, tokenizer, prompts)
        info = {
            "reference": "dequantized 4-bit base + adapter",
            "fine_tune_max_abs_logit_shift": fine_tune_shift(plain, tokenizer, prompts, expected),
        }
        del plain
        quantized = reference_logits(model, tokenizer, prompts)
        # How far the dequantized reference is from the 4-bit model as trained (informational).
        info["dequantized_vs_4bit_max_abs_logit_diff"] = float((quantized - expected).abs().max())
        return {"logits": expected, "info": info}
    expected = reference_logits(model, tokenizer, prompts)
    info = {
        "reference": "in-memory fine-tuned model",
        "fine_tune_max_abs_logit_shift": fine_tune_shift(model, tokenizer, prompts, expected),
    }
    return {"logits": expected, "info": info}


def reference_from_files(
    base_dir: Path, adapter_dir: Optional[Path], quantization: Optional[dict], tokenizer: Any, prompts: Sequence[str]
) -> dict[str, Any]:
    """Reference logits of base + adapter (unmerged) loaded from disk, in float32; freed before returning.

    For QLoRA the base is loaded in 4-bit as the run loaded it, then dequantized (``dequantized_copy``).
    """
    import torch
    from transformers import AutoModelForCausalLM

    from mistral_tune.adapters.experts4bit import quantize_experts
    from mistral_tune.adapters.quantization import experts_were_4bit, keep_cpu_4bit_numerics, quantization_config
    from mistral_tune.export.merged import dequantized_copy
    from mistral_tune.export.verify import fine_tune_shift, reference_logits

    kwargs: dict[str, Any] = {"dtype": torch.float32}
    if quantization:
        base_dtype = getattr(torch, quantization["base_dtype"])
        record = SimpleNamespace(
            name="qlora",
            load_in_4bit=True,
            bnb_4bit_quant_type=quantization["quant_type"],
            bnb_4bit_use_double_quant=quantization["double_quant"],
            bnb_4bit_compute_dtype="auto",
        )
        kwargs = {"dtype": base_dtype, "quantization_config": quantization_config(record, base_dtype)}
    model = AutoModelForCausalLM.from_pretrained(base_dir, **kwargs)
    if quantization:
        if experts_were_4bit(quantization):
            quantize_experts(model)  # as the run stored Mixtral's experts (adapters.experts4bit)
        keep_cpu_4bit_numerics(model)
    if adapter_dir is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter_dir)
    if quantization:
        model = dequantized_copy(model, torch.float32)
    expected = reference_logits(model, tokenizer, prompts)
    info = {
        "reference": "dequantized 4-bit base + adapter" if quantization else "base + adapter (unmerged)",
        "fine_tune_max_abs_logit_shift": fine_tune_shift(model, tokenizer, prompts, expected),
    }
    return {"logits": expected, "info": info}


# -- the pipeline ---------------------------------------------------------------------------------------


def export_checkpoint(
    base_dir: Path,
    adapter_dir: Optional[Path],
    outs: dict[str, Path],
    *,
    tokenizer: Any,
    reference: Optional[dict[str, Any]] = None,
    verify: bool = True,
    prompts: Optional[Sequence[str]] = None,
    dtype_name: str = "auto",
    max_shard_size: str = "2GB",
    tolerance: Optional[float] = None,
    quantization: Optional[dict[str, Any]] = None,
    base_preset: Any = None,
    provenance: Any = None,
    gguf_types: Sequence[str] = ("q8_0",),
    gguf_tolerance: Optional[float] = None,
    gguf_name: str = "model",
) -> dict[str, dict[str, Any]]:
    """Merge ``adapter_dir`` into ``base_dir`` once (streamed), verify once, write ``outs``.

    ``outs`` maps "merged"/"preset"/"gguf" to directories; each is written atomically (complete or
    absent). gguf/ holds ``<gguf_name>-<type>.gguf`` for each of ``gguf_types``.
    ``reference`` is ``{"logits", "info"}`` from ``in_memory_reference``/``reference_from_files``
    (computed from the files when None and ``verify``). ``quantization`` is the QLoRA record of the
    adapter's sidecar. Returns, per format, what summary.json records.
    """
    from mistral_tune.export.verify import VERIFY_PROMPTS

    prompts = VERIFY_PROMPTS if prompts is None else prompts
    if reference is None:
        reference = (
            reference_from_files(base_dir, adapter_dir, quantization, tokenizer, prompts)
            if verify
            else no_reference("dequantized 4-bit base + adapter" if quantization else "base + adapter (unmerged)")
        )
    results: dict[str, dict[str, Any]] = {}
    hidden = None
    hf_outs = {f: Path(o) for f, o in outs.items() if f in WEIGHT_FORMATS}
    if "gguf" in outs and not hf_outs:  # GGUF alone: its merged source goes to a hidden directory
        Path(outs["gguf"]).parent.mkdir(parents=True, exist_ok=True)
        hidden = tempfile.TemporaryDirectory(
            prefix=f".{Path(outs['gguf']).name}.merged-", dir=Path(outs["gguf"]).parent
        )
        hf_outs = {"merged": Path(hidden.name) / "merged"}
    try:
        _write_hf_formats(hf_outs, results, base_dir, adapter_dir, tokenizer, reference, verify, prompts,
                          dtype_name, max_shard_size, tolerance, quantization, base_preset, provenance)  # fmt: skip
        if "gguf" in outs:
            source = next(Path(r["path"]) for r in results.values())
            results["gguf"] = export_gguf(
                source,
                Path(outs["gguf"]),
                tokenizer,
                gguf_types,
                name=gguf_name,
                verify=verify,
                tolerance=gguf_tolerance,
            )
    finally:
        if hidden is not None:
            hidden.cleanup()
            results.pop("merged", None)
    return results


def _write_hf_formats(
    outs: dict[str, Path],
    results: dict[str, dict[str, Any]],
    base_dir: Path,
    adapter_dir: Optional[Path],
    tokenizer: Any,
    reference: dict[str, Any],
    verify: bool,
    prompts: Sequence[str],
    dtype_name: str,
    max_shard_size: str,
    tolerance: Optional[float],
    quantization: Optional[dict[str, Any]],
    base_preset: Any,
    provenance: Any,
) -> None:
    """merged/ and preset/: one streamed merge, one verification; the second links the first's files."""
    import mistral_tune.export.stream_merge as merge
    from mistral_tune.export.hf_files import write_tokenizer_files
    from mistral_tune.export.verify import verify_export, warn_if_indistinguishable

    first: Optional[Path] = None
    for fmt in (f for f in WEIGHT_FORMATS if f in outs):
        out = Path(outs[fmt])
        with atomic_directory(out) as staging:
            if first is None:
                info = merge.stream_merge(
                    base_dir,
                    adapter_dir,
                    staging,
                    dtype_name=dtype_name,
                    max_shard_size=max_shard_size,
                    quantization=quantization,
                )
                write_tokenizer_files(tokenizer, staging)
                if can_generate(staging):
                    write_generation_config(staging, tokenizer)
                diff = tol = None
                if verify:
                    diff, tol = verify_export(
                        staging, tokenizer, prompts, reference["logits"], info["dtype"], tolerance
                    )
                    warn_if_indistinguishable(
                        reference["info"].get("fine_tune_max_abs_logit_shift"), tol, info["dtype"]
                    )
            else:  # the same weights: link the verified first export's files
                shutil.rmtree(staging)
                shutil.copytree(first, staging, copy_function=link_or_copy, ignore=_ignore_metadata)
            if fmt == "preset":
                write_preset_metadata(staging, tokenizer, base_preset=base_preset, provenance=provenance)
        first = out
        results[fmt] = {
            "path": str(out),
            "max_abs_logit_diff": diff,
            "tolerance": tol,
            "dtype": info["dtype"],
            "verified": verify,
            **reference["info"],
            "method": "streamed",
            "shards": len(info["shards"]),
        }
        log.info("export: %s model written to %s (%s, max |logit diff| %s)", fmt, out, info["dtype"], diff)


def export_gguf(
    merged_dir: Path,
    out_dir: Path,
    tokenizer: Any,
    gguf_types: Sequence[str],
    *,
    name: str,
    verify: bool = True,
    tolerance: Optional[float] = None,
) -> dict[str, Any]:
    """gguf/<name>-<type>.gguf from a verified merged checkpoint, each file verified in llama.cpp
    (``gguf_verify``) before the directory is renamed into place. Without xllamacpp the files are
    written and the summary says they are unverified.
    """
    import time

    from mistral_tune.export.gguf_file import gguf_filename, sliding_window_note, write_gguf
    from mistral_tune.export.gguf_verify import verify_gguf, xllamacpp_available

    can_verify = verify and xllamacpp_available()
    reason = None
    if verify and not can_verify:
        reason = "xllamacpp is not installed: pip install 'mistral-tune[gguf]'"
        log.warning("export: GGUF files are written but NOT verified in llama.cpp (%s)", reason)
    files = []
    window = None
    with atomic_directory(Path(out_dir)) as staging:
        for gguf_type in dict.fromkeys(gguf_types):
            started = time.time()
            info = write_gguf(merged_dir, staging / gguf_filename(name, gguf_type), tokenizer, gguf_type, name=name)
            info["seconds"] = round(time.time() - started, 2)
            window = info.pop("sliding_window")
            info["verification"] = (
                verify_gguf(
                    staging / gguf_filename(name, gguf_type), merged_dir, tokenizer, gguf_type, tolerance=tolerance
                )
                if can_verify
                else None
            )
            info["path"] = str(Path(out_dir) / gguf_filename(name, gguf_type))
            files.append(info)
            check = info["verification"]
            log.info(
                "export: GGUF %s written (%s bytes, %.1f s)%s",
                info["path"],
                f"{info['bytes']:,}",
                info["seconds"],
                f", llama.cpp vs transformers max |top-k log-prob diff| {check['max_abs_logprob_diff']:.2e}"
                if check
                else "",
            )
    result: dict[str, Any] = {
        "path": str(out_dir),
        "files": files,
        "verified": can_verify,
        "unverified_reason": reason,
        "sliding_window_honoured": window is None,
    }
    if window is not None:
        result["sliding_window"] = window
        result["sliding_window_note"] = sliding_window_note(window)
        log.warning("export: GGUF: %s", result["sliding_window_note"])
    return result


def export_in_memory(
    model: Any,
    tokenizer: Any,
    outs: dict[str, Path],
    *,
    reference: Optional[dict[str, Any]] = None,
    verify: bool = True,
    prompts: Optional[Sequence[str]] = None,
    dtype_name: str = "auto",
    **kwargs: Any,
) -> dict[str, dict[str, Any]]:
    """``export_checkpoint`` for a model that exists only in memory (no adapter files to stream from).

    Its weights, LoRA folded in without touching ``model``, are saved once to a hidden temporary
    directory next to the first output, which then serves as the base. ``dtype_name=auto`` is the
    model's base dtype (for a 4-bit base: the dtype it was quantized from).
    """
    import torch

    from mistral_tune.adapters.quantization import is_4bit_linear
    from mistral_tune.export.hf_files import merged_state_dict, resolve_export_dtype
    from mistral_tune.export.merged import dequantized_copy
    from mistral_tune.export.verify import VERIFY_PROMPTS

    prompts = VERIFY_PROMPTS if prompts is None else prompts
    if reference is None:
        reference = (
            in_memory_reference(model, tokenizer, prompts) if verify else no_reference("in-memory fine-tuned model")
        )
    dtype_name = resolve_export_dtype(dtype_name, model)
    first = Path(outs[next(f for f in EXPORT_FORMATS if f in outs)])
    first.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{first.name}.source-", dir=first.parent) as tmp:
        if any(is_4bit_linear(m) for m in model.modules()):  # never save (or merge into) 4-bit weights
            model = dequantized_copy(model, torch.float32)  # merged in float32, cast by the writer
        base, state = merged_state_dict(model)
        # Training turns the KV cache off (TRL, gradient checkpointing); an exported model is for inference.
        if getattr(base.config, "use_cache", True) is False:
            base.config.use_cache = True
        base.save_pretrained(tmp, safe_serialization=True, state_dict=dict(state))
        del state
        return export_checkpoint(
            Path(tmp),
            None,
            outs,
            tokenizer=tokenizer,
            reference=reference,
            verify=verify,
            prompts=prompts,
            dtype_name=dtype_name,
            **kwargs,
        )


def streamable(model: Any) -> bool:
    """True when the trained model is a causal LM with a PEFT adapter that ``stream_merge`` folds
    from its saved files (LoRA, rsLoRA, DoRA, QLoRA, modules_to_save, converted PiSSA/OLoRA)."""
    from peft import PeftModel

    return isinstance(model, PeftModel) and str(model.peft_config["default"].task_type) == "CAUSAL_LM"


def materialize_base(model: dict[str, Any], tmp: Path, source: Any = None) -> tuple[Path, Any]:
    """A directory of safetensors for the base; random-init presets (the embedded ones, or any with
    ``load_weights=false``) are rebuilt from their seed and saved. ``source``: an already resolved
    (downloaded) ``ModelSource``, else resolved from ``model``."""
    import mistral_tune.models.loading as models
    from mistral_tune.models.sources import check_weight_files, fetch_hub_repo, resolve_source

    if source is None:
        source = resolve_source(model["name"] or model["path"], model["path"])
    if source.local_dir is not None:
        check_weight_files(source.local_dir, allow_pickle=False)
        return Path(source.local_dir), source
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
        import torch

        from mistral_tune.models.random_init import build_meta, replayable, save_random_checkpoint

        config = models.load_config(source)
        if replayable(build_meta(config)):
            # The same tensors as load_model + save_pretrained, written one at a time (a 7B base
            # never sits in memory).
            save_random_checkpoint(config, Path(tmp), seed=model["seed"], dtype=torch.float32, max_shard_size="2GB")
            return Path(tmp), source
        base = models.load_model(model_cfg, source, seed=model["seed"])
        base.save_pretrained(tmp, max_shard_size="2GB")
        return Path(tmp), source
    return fetch_hub_repo(source.hub_repo), source


def export_trained(
    model: Any,
    tokenizer: Any,
    outs: dict[str, Path],
    *,
    adapter_dir: Optional[Path],
    base: dict[str, Any],
    source: Any = None,
    verify: bool = True,
    dtype_name: str = "auto",
    **kwargs: Any,
) -> dict[str, dict[str, Any]]:
    """The export at the end of a run: the adapter is already saved to ``adapter_dir``; the reference
    is the trained model in memory; the merge streams from the base's files and the adapter's, exactly
    as ``mistral-tune export run_dir=...`` does, so both write the same merged/.

    ``base`` is the base's {name, path, seed, load_weights}. A run without a streamable adapter (full
    fine-tune, reward model) or whose base has no safetensors to stream (``model.allow_pickle=true``)
    exports its in-memory weights through ``export_in_memory``.
    """
    import mistral_tune.adapters.build as adapters
    from mistral_tune.export.hf_files import resolve_export_dtype
    from mistral_tune.export.verify import VERIFY_PROMPTS

    reference = (
        in_memory_reference(model, tokenizer, VERIFY_PROMPTS) if verify else no_reference("in-memory fine-tuned model")
    )
    dtype_name = resolve_export_dtype(dtype_name, model)  # the run's base dtype, not necessarily the files'
    pickled_base = (
        source is not None and source.local_dir is not None and not any(source.local_dir.glob("*.safetensors"))
    )
    if adapter_dir is None or not streamable(model) or pickled_base:
        return export_in_memory(
            model, tokenizer, outs, reference=reference, verify=verify, dtype_name=dtype_name, **kwargs
        )
    quantization = adapters.read_sidecar(adapter_dir).get("quantization")
    with tempfile.TemporaryDirectory(prefix="mistral-tune-export-") as tmp:
        base_dir, _ = materialize_base(base, Path(tmp) / "base", source)
        return export_checkpoint(
            base_dir,
            adapter_dir,
            outs,
            tokenizer=tokenizer,
            reference=reference,
            verify=verify,
            dtype_name=dtype_name,
            quantization=quantization,
            **kwargs,
        )


def export_model(
    model: Any,
    tokenizer: Any,
    *,
    prompts: Sequence[str],
    dtype_name: str = "auto",
    merged_dir: Optional[Path] = None,
    preset_dir: Optional[Path] = None,
    max_shard_size: str = "2GB",
    verify: bool = True,
    tolerance: Optional[float] = None,
    base_preset: Optional[str] = None,
    provenance: Optional[dict] = None,
) -> dict[str, Any]:
    """Write ``merged_dir`` and/or ``preset_dir`` from a model in memory, merged and verified once
    (``export.pipeline.export_in_memory``). ``model`` is left as it is.

    Returns ``{"merged": {...}, "preset": {...}}`` for the formats written, each with the path, dtype,
    the measured max |logit diff| and what it was measured against (this goes into summary.json).
    """
    outs = {k: Path(v) for k, v in (("merged", merged_dir), ("preset", preset_dir)) if v is not None}
    if not outs:
        return {}
    return export_in_memory(
        model,
        tokenizer,
        outs,
        verify=verify,
        prompts=prompts,
        dtype_name=dtype_name,
        max_shard_size=max_shard_size,
        tolerance=tolerance,
        base_preset=base_preset,
        provenance=provenance or {},
    )


def export_merged(
    model: Any,
    tokenizer: Any,
    out_dir: Path,
    *,
    dtype_name: str,
    prompts: Sequence[str],
    max_shard_size: str = "2GB",
    verify: bool = True,
) -> dict[str, Any]:
    """Merge and write one verified ``merged/`` directory (``export_model`` with the merged format only)."""
    return export_model(
        model,
        tokenizer,
        prompts=prompts,
        dtype_name=dtype_name,
        merged_dir=out_dir,
        max_shard_size=max_shard_size,
        verify=verify,
    )["merged"]
