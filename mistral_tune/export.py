"""Merged checkpoints and presets in Hugging Face layout, verified against the fine-tuned model.

Every export is written to a hidden sibling directory, reloaded with plain ``transformers`` and
compared logit for logit with the model it came from, and only then renamed into place: a failed
or interrupted export never leaves a directory that looks complete.

QLoRA is never merged into 4-bit rounding: the 4-bit base is first dequantized (exactly as the
forward pass dequantizes it) into a 16/32-bit copy, the adapter is attached to that copy, and the
merge and the verification both use it. See docs/export.md.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import shutil
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

from .adapters import is_4bit_linear
from .errors import UserError

log = logging.getLogger(__name__)

# Largest |logit difference| accepted between the reloaded export and the model it came from.
# float32: absolute; merges differ only by summation order (measured 6e-6..2e-5 on mistral_tiny).
# 16-bit: relative to the largest |logit| of the reference, twice the noise that rounding alone
# causes (casting the mistral_tiny base to bf16 moves its logits by 1.9% of max |logit|, fp16 by 0.22%).
TOLERANCE = {"float32": 1e-4}
RELATIVE_TOLERANCE = {"bfloat16": 0.04, "float16": 0.005}
DTYPES = ("float32", "bfloat16", "float16")
PRESET_METADATA = "metadata.json"


class ExportMismatch(RuntimeError):
    """The written checkpoint does not reproduce the fine-tuned model."""


@contextlib.contextmanager
def atomic_directory(out_dir: Path) -> Iterator[Path]:
    """Yield a temporary sibling of ``out_dir`` to fill; rename it to ``out_dir`` only if the block succeeds.

    An interrupted or failed write leaves at most a hidden ``.NAME.tmp-PID`` directory, never an
    ``out_dir`` that looks complete. An existing ``out_dir`` is replaced only after the new one is written.
    """
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out_dir.exists():
        old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
        out_dir.rename(old)
        tmp.rename(out_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(out_dir)


def verification_inputs(tokenizer: Any, prompts: Sequence[str]):
    import torch

    ids = [tokenizer.encode(p) for p in prompts]
    width = max(len(i) for i in ids)
    input_ids = torch.tensor([i + [tokenizer.pad_id] * (width - len(i)) for i in ids])
    attention_mask = torch.tensor([[1] * len(i) + [0] * (width - len(i)) for i in ids])
    return input_ids, attention_mask


def reference_logits(model: Any, tokenizer: Any, prompts: Sequence[str]):
    """Logits of ``model`` on ``prompts``, masked to real tokens, in fp32 on CPU."""
    import torch

    input_ids, attention_mask = verification_inputs(tokenizer, prompts)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device)).logits
    model.train(was_training)
    if logits.dim() == 2:  # a reward model: one score per text, read at its last real token
        return logits.float().cpu()
    return logits.float().cpu() * attention_mask[..., None]


def write_hf_checkpoint(
    model: Any, tokenizer: Any, out_dir: Path, max_shard_size: str = "2GB", state_dict: Optional[dict] = None
) -> None:
    """Weights as safetensors shards (+ index), config, tokenizer with chat template, generation config."""
    from transformers import GenerationConfig

    # Training turns the KV cache off (TRL, gradient checkpointing); an exported model is for inference.
    if getattr(model.config, "use_cache", True) is False:
        model.config.use_cache = True
    kwargs = {} if state_dict is None else {"state_dict": dict(state_dict)}  # save_pretrained consumes it
    model.save_pretrained(out_dir, safe_serialization=True, max_shard_size=max_shard_size, **kwargs)
    write_tokenizer_files(tokenizer, out_dir)
    if not model.can_generate():
        return  # a reward model (sequence classification) has no generation settings
    GenerationConfig(
        bos_token_id=tokenizer.bos_id,
        eos_token_id=tokenizer.eos_id,
        pad_token_id=tokenizer.pad_id,
        max_new_tokens=256,
    ).save_pretrained(out_dir)


def write_tokenizer_files(tokenizer: Any, out_dir: Path) -> None:
    """Tokenizer files; the chat template also goes into tokenizer_config.json.

    transformers >= 4.50 reads ``chat_template.jinja``, but older readers (and tools that parse
    tokenizer_config.json themselves) only look in tokenizer_config.json, so we write both.
    """
    tokenizer.save_pretrained(out_dir)
    config_path = Path(out_dir) / "tokenizer_config.json"
    template = getattr(tokenizer, "jinja_chat_template", None)
    if template and config_path.exists():
        data = json.loads(config_path.read_text(encoding="utf-8"))
        data.setdefault("chat_template", template)
        config_path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def base_dtype_name(model: Any) -> str:
    """The dtype of the base weights (for a 4-bit base: the dtype it was quantized from)."""
    for module in model.modules():
        if is_4bit_linear(module):
            return str(module.weight.quant_state.dtype).removeprefix("torch.")
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    name = str(base.get_input_embeddings().weight.dtype).removeprefix("torch.")
    return name if name in DTYPES else "float32"


def dequantized_copy(model: Any, dtype: Any):
    """A 16/32-bit copy of a 4-bit (PEFT) model, on CPU, with the same adapter attached.

    Each 4-bit weight is dequantized with bitsandbytes exactly as the forward pass does, so the copy
    computes what the trained model computed; merging into it never rounds to 4-bit again.
    """
    import torch
    from peft import PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
    from transformers import AutoModelForCausalLM

    is_peft = isinstance(model, PeftModel)
    base = model.get_base_model() if is_peft else model
    tensors = {}
    for name, p in base.named_parameters():
        if ".lora_" in name or ".modules_to_save." in name:
            continue  # adapter weights come back through the PEFT state dict below
        clean = name.replace(".base_layer.", ".").replace(".original_module.", ".")
        if p.__class__.__name__ == "Params4bit":
            import bitsandbytes as bnb

            value = bnb.functional.dequantize_4bit(p.data, p.quant_state)
        else:
            value = p.data
        tensors[clean] = value.detach().to("cpu", dtype)
    buffers = {n.replace(".base_layer.", "."): b.detach().to("cpu") for n, b in base.named_buffers()}
    config = copy.deepcopy(base.config)
    for attr in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(config, attr):
            delattr(config, attr)
    with torch.device("meta"):
        fresh = AutoModelForCausalLM.from_config(config, dtype=dtype)
    fresh.load_state_dict(tensors, strict=True, assign=True)
    for name, buf in buffers.items():
        owner, _, leaf = name.rpartition(".")
        fresh.get_submodule(owner).register_buffer(leaf, buf, persistent=False)
    fresh.eval()
    if not is_peft:
        return fresh
    peft_config = copy.deepcopy(model.peft_config["default"])
    peft_config.init_lora_weights = True  # values are overwritten with the trained ones just below
    attached = get_peft_model(fresh, peft_config)
    result = set_peft_model_state_dict(attached, get_peft_model_state_dict(model))
    if result.unexpected_keys:
        raise RuntimeError(f"adapter weights not placed in the dequantized copy: {result.unexpected_keys[:5]}")
    return attached


def merge_adapter(model: Any, dtype: Any):
    """Fold the adapter into the base weights and cast to ``dtype``; a full fine-tune is only cast.

    A 16-bit base exported as float32 is upcast first, so the merge itself happens in float32.
    """
    import torch
    from peft import PeftModel

    if dtype == torch.float32:
        model = model.to(dtype)
    if isinstance(model, PeftModel):
        model = model.merge_and_unload()
    return model.to(dtype)


def tolerance_for(dtype_name: str, expected: Any) -> float:
    """The accepted max |logit diff| for an export in ``dtype_name`` (see TOLERANCE)."""
    if dtype_name in TOLERANCE:
        return TOLERANCE[dtype_name]
    return RELATIVE_TOLERANCE[dtype_name] * max(1.0, float(expected.abs().max()))


def verify_export(
    out_dir: Path,
    tokenizer: Any,
    prompts: Sequence[str],
    expected: Any,
    dtype_name: str,
    tolerance: Optional[float] = None,
) -> tuple[float, float]:
    """Reload ``out_dir`` with plain transformers and compare its logits (a reward model's scores);
    returns (max |diff|, tolerance)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    architectures = AutoConfig.from_pretrained(out_dir).architectures or []
    reward = any(a.endswith("ForSequenceClassification") for a in architectures)
    reloaded = (AutoModelForSequenceClassification if reward else AutoModelForCausalLM).from_pretrained(
        out_dir, dtype=torch.float32
    )
    got = reference_logits(reloaded, tokenizer, prompts)
    del reloaded
    diff = float((got - expected).abs().max())
    tol = tolerance if tolerance is not None else tolerance_for(dtype_name, expected)
    if not diff <= tol:  # also catches NaN
        raise ExportMismatch(
            f"The export in {out_dir.name} does not reproduce the fine-tuned model: max |logit diff| "
            f"{diff:.3g} > {tol:.3g} allowed for {dtype_name}. It was not kept."
        )
    return diff, tol


def fine_tune_shift(model: Any, tokenizer: Any, prompts: Sequence[str], expected: Any) -> Optional[float]:
    """Max |logit change| the adapter makes over its base (None without an adapter).

    Printed next to the export's own difference: a verification can only tell a lost fine-tune
    apart when this is well above the tolerance.
    """
    if not hasattr(model, "disable_adapter"):
        return None
    with model.disable_adapter():
        base = reference_logits(model, tokenizer, prompts)
    return float((expected - base).abs().max())


def warn_if_indistinguishable(shift: Optional[float], tol: Optional[float], dtype_name: str) -> None:
    """Say so when the fine-tune is too small for the check to tell the export from the base."""
    if shift is not None and tol is not None and shift < 2 * tol:
        log.warning(
            "export: the adapter moves logits by at most %.3g, within reach of the %.3g tolerance of a %s "
            "export, so verification cannot tell it from the base model; export.dtype=float32 checks strictly",
            shift,
            tol,
            dtype_name,
        )


def preset_metadata(
    *, parameter_count: int, base_preset: Any, provenance: Any, chat_template: Optional[str], dtype: Optional[str]
) -> dict[str, Any]:
    """``metadata.json`` of a preset directory (keras-hub's fields plus our provenance)."""
    from . import __version__

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


def merged_state_dict(model: Any):
    """(plain transformers model, its state dict with any LoRA folded in), leaving ``model`` unchanged.

    Plain LoRA layers are folded as W + delta, computed out of place, so a model still being trained
    keeps its adapter. Other PEFT wrappers (DoRA, modules_to_save) are merged on a copy.
    """

    from peft import PeftModel
    from peft.tuners.lora import Linear as LoraLinear
    from peft.tuners.lora import LoraLayer

    base = model.get_base_model() if isinstance(model, PeftModel) else model
    layers = {name: m for name, m in base.named_modules() if isinstance(m, LoraLayer)}
    state = base.state_dict()
    if not layers:
        return base, state
    plain = all(type(m) is LoraLinear and not any(m.use_dora.values()) for m in layers.values())
    if not plain or any("modules_to_save" in k or "original_module" in k for k in state):
        unloaded = copy.deepcopy(model)
        if not isinstance(unloaded, PeftModel):
            raise ExportMismatch("LoRA layers injected outside PEFT's PeftModel cannot be merged here.")
        unloaded = unloaded.merge_and_unload()
        return unloaded, unloaded.state_dict()
    merged = {k.replace(".base_layer.", "."): v for k, v in state.items() if ".lora_" not in k}
    for name, layer in layers.items():
        weight = layer.get_base_layer().weight
        if not layer.merged:  # a merged layer already holds W + delta in its base weight
            for adapter in layer.active_adapters:
                if adapter in layer.lora_A:
                    weight = weight + layer.get_delta_weight(adapter).to(weight.dtype)
        merged[f"{name}.weight"] = weight.detach()
    return base, merged


def write_preset_files(
    model: Any, tokenizer: Any, directory: Path, *, base_preset: Any, provenance: Any, max_shard_size: str = "2GB"
) -> dict[str, Any]:
    """The files of a preset directory, written into ``directory`` as it is (not atomically).

    LoRA is folded in without touching ``model`` (see ``merged_state_dict``). Returns the metadata.
    """
    base, state = merged_state_dict(model)
    # Shared (tied) tensors count once. Counted now: save_pretrained consumes the dict it is given.
    parameter_count = sum({(v.data_ptr(), v.shape): v.numel() for v in state.values()}.values())
    dtype = next((str(v.dtype).removeprefix("torch.") for v in state.values() if v.is_floating_point()), None)
    write_hf_checkpoint(base, tokenizer, directory, max_shard_size, state_dict=state)
    metadata = preset_metadata(
        parameter_count=parameter_count,
        base_preset=base_preset,
        provenance=provenance,
        chat_template=tokenizer.chat_template,
        dtype=dtype,
    )
    save_json(Path(directory) / PRESET_METADATA, metadata)
    return metadata


def write_preset(
    model: Any,
    tokenizer: Any,
    out_dir: Path,
    *,
    base_preset: Any,
    provenance: Any = None,
    max_shard_size: str = "2GB",
) -> Path:
    """Write a preset directory: Hugging Face layout (safetensors, config, tokenizer with chat
    template, generation config) plus ``metadata.json`` (mistral_tune version, parameter_count,
    date_saved, tasks, base preset, training provenance). LoRA is folded in (see ``merged_state_dict``).

    Written to a temporary sibling and renamed into place, so ``out_dir`` is complete or absent.
    Both ``MistralCausalLM.from_preset(out_dir)`` and ``AutoModelForCausalLM.from_pretrained(out_dir)``
    load it.

    Example:
        >>> write_preset(model, tokenizer, "presets/my_tune", base_preset="mistral_tiny",
        ...              provenance={"recipe": "sft_lora", "run_dir": "runs/x"})  # doctest: +SKIP
    """
    out_dir = Path(out_dir)
    if out_dir.is_file() or (out_dir.is_dir() and any(out_dir.iterdir()) and not (out_dir / PRESET_METADATA).is_file()):
        # Only an earlier preset (or an empty directory) is replaced; anything else could be someone's data.
        raise UserError(f"{out_dir} exists and is not a mistral-tune preset directory; choose a new path.")
    check_writable(out_dir.parent)
    with atomic_directory(out_dir) as tmp:
        meta = write_preset_files(
            model, tokenizer, tmp, base_preset=base_preset, provenance=provenance, max_shard_size=max_shard_size
        )
    log.info("export: preset written to %s (%s parameters)", out_dir, f"{meta['parameter_count']:,}")
    return out_dir


def resolve_export_dtype(dtype_name: str, model: Any) -> str:
    return base_dtype_name(model) if dtype_name == "auto" else dtype_name


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
    """Merge the trained ``model`` once and write ``merged_dir`` and/or ``preset_dir``, each verified.

    Returns ``{"merged": {...}, "preset": {...}}`` for the formats written, each with the path, dtype,
    the measured max |logit diff| and what it was measured against (this goes into summary.json).
    ``model`` is merged in place: call this after everything that needs the adapter.
    """
    import torch

    dtype_name = resolve_export_dtype(dtype_name, model)
    dtype = getattr(torch, dtype_name)
    common: dict[str, Any] = {"dtype": dtype_name, "verified": verify}
    expected = None
    if any(is_4bit_linear(m) for m in model.modules()):
        base_dtype = getattr(torch, base_dtype_name(model))
        plain = dequantized_copy(model, torch.float32 if dtype == torch.float32 else base_dtype)
        common["reference"] = "dequantized 4-bit base + adapter"
        if verify:
            expected = reference_logits(plain, tokenizer, prompts)
            common["fine_tune_max_abs_logit_shift"] = fine_tune_shift(plain, tokenizer, prompts, expected)
            quantized = reference_logits(model, tokenizer, prompts)
            # How far the dequantized reference is from the 4-bit model as trained (informational).
            common["dequantized_vs_4bit_max_abs_logit_diff"] = float((quantized - expected).abs().max())
        model = plain
    else:
        common["reference"] = "in-memory fine-tuned model"
        if verify:
            expected = reference_logits(model, tokenizer, prompts)
            common["fine_tune_max_abs_logit_shift"] = fine_tune_shift(model, tokenizer, prompts, expected)
    merged = merge_adapter(model, dtype)
    info: dict[str, Any] = {}
    for kind, out_dir in (("merged", merged_dir), ("preset", preset_dir)):
        if out_dir is None:
            continue
        out_dir = Path(out_dir)
        with atomic_directory(out_dir) as tmp:
            if kind == "preset":
                write_preset_files(
                    merged,
                    tokenizer,
                    tmp,
                    base_preset=base_preset,
                    provenance=provenance or {},
                    max_shard_size=max_shard_size,
                )
            else:
                write_hf_checkpoint(merged, tokenizer, tmp, max_shard_size)
            diff, tol = (
                verify_export(tmp, tokenizer, prompts, expected, dtype_name, tolerance) if verify else (None, None)
            )
        info[kind] = {"path": str(out_dir), "max_abs_logit_diff": diff, "tolerance": tol, **common}
        warn_if_indistinguishable(common.get("fine_tune_max_abs_logit_shift"), tol, dtype_name)
        log.info("export: %s model written to %s (%s, max |logit diff| %s)", kind, out_dir, dtype_name, diff)
    return info


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


def save_json(path: Path, data: Any) -> None:
    tmp = Path(path).with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n", encoding="utf-8")
    tmp.replace(path)


def check_writable(path: Path) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as exc:
        raise UserError(f"output_dir={path} is not writable ({exc.strerror}). Choose another output_dir.") from exc
