"""``mistral-tune recipe=... dry_run=true``: size up a run without training or downloading anything.

Resolves the config, builds the model (and its adapter) on the meta device, where tensors have
shapes but no storage, counts parameters, and prints the memory and speed estimates of
``mistral_tune.estimate``. Built-in presets need no network: their architecture is data (models/architectures.py).
"""

from __future__ import annotations

import json
from typing import Any

from mistral_tune.core.errors import UserError
from mistral_tune.pipeline import estimate


def model_config(cfg: Any) -> tuple[dict[str, Any], str]:
    """The architecture dict of ``cfg.model`` and a label saying where it came from."""
    from mistral_tune.models.sources import fetch_hub_repo, resolve_source

    source = resolve_source(cfg.model.name, cfg.model.path)
    if source.local_dir is None and source.preset is not None and not cfg.model.path:
        return dict(source.preset.hf_config), f"built-in preset {source.preset.id}"
    directory = source.local_dir or fetch_hub_repo(source.hub_repo, cfg.model.revision, config_only=True)
    path = directory / "config.json"
    if not path.is_file():
        raise UserError(f"{directory} has no config.json, so its architecture is unknown.")
    return json.loads(path.read_text(encoding="utf-8")), str(directory)


def build_on_meta(config: dict[str, Any], adapter_cfg: Any):
    """The causal LM with its adapter, on the meta device: shapes and parameter counts, no memory."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from mistral_tune.adapters.build import is_moe_model, lora_config

    model_type = config.get("model_type", "mistral")  # keras-hub and older configs: Mistral
    known = AutoConfig.for_model(model_type).to_dict()
    arch = AutoConfig.for_model(model_type, **{k: v for k, v in config.items() if k in known and k != "model_type"})
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(arch)
        if adapter_cfg.name == "none":
            model.requires_grad_(True)
            return model
        from peft import get_peft_model

        # QLoRA's adapter has the same shapes as LoRA's; the 4-bit base is costed by the estimator.
        return get_peft_model(model, lora_config(adapter_cfg, moe=is_moe_model(model)))


def run_shape(cfg: Any) -> estimate.RunShape:
    """Per-device step shape from the config; ``auto`` choices resolve as on a bf16 GPU without flash-attn."""
    from mistral_tune.launch.accelerate import total_processes

    attn = cfg.model.attn_implementation
    return estimate.RunShape(
        batch_size=cfg.train.per_device_train_batch_size,
        seq_len=cfg.trainer.max_length,
        grad_accum=cfg.train.gradient_accumulation_steps,
        num_devices=total_processes(cfg.launcher),  # launcher.num_processes=0 -> one per visible GPU
        adapter=cfg.adapter.name,
        target_modules=tuple(cfg.adapter.target_modules),
        lora_r=cfg.adapter.r,
        lora_dropout=cfg.adapter.lora_dropout,
        gradient_checkpointing=cfg.train.gradient_checkpointing,
        compute_bytes=4 if cfg.model.dtype == "float32" else 2,
        attn="sdpa" if attn in ("auto", "flex_attention", "sdpa_packed") else attn,
        optim=cfg.train.optim,
        loss="plain" if cfg.trainer.get("loss") == "plain" else "chunked",  # sft's key; dpo/reward: chunked
    )


def dry_run(cfg: Any) -> dict[str, Any]:
    """Print sizes and estimates for ``cfg``; returns them as a dict. Trains and writes nothing."""
    from mistral_tune.adapters.build import count_parameters
    from mistral_tune.models.loading import check_max_length

    config, origin = model_config(cfg)
    check_max_length(cfg.trainer.max_length, config.get("max_position_embeddings"))
    model = build_on_meta(config, cfg.adapter)
    trainable, total = count_parameters(model)
    shape = run_shape(cfg)
    memory = estimate.estimate_memory(config, shape, trainable=trainable, total=total)
    speed = estimate.estimate_speed(config, shape, trainable=trainable, gpu=cfg.dry_run_gpu, mfu=cfg.dry_run_mfu)
    data, data_lines = data_fit(cfg)
    moe = estimate.dims(config)["experts"] > 1
    print(render(cfg, origin, trainable, total, shape, memory, speed, moe=moe) + data_lines)
    return {
        "data": data,
        "parameters": {"trainable": trainable, "total": total},
        "tokens_per_step": shape.tokens_per_step,
        "memory_bytes": {k: b for k, (b, _) in memory.terms.items()},
        "peak_memory_bytes": memory.peak_bytes,
        "peak_memory_bytes_other_checkpointing": memory.peak_bytes_other_checkpointing,
        "step_seconds": speed.step_seconds,
        "tokens_per_second": speed.tokens_per_second,
    }


def data_fit(cfg: Any) -> tuple[dict[str, Any] | None, str]:
    """How ``data.path`` fits the length limits: every row checked and tokenized with the model's tokenizer,
    exactly as the run will (kept, truncated, dropped). Skipped for a hub dataset or a tokenizer that would
    need a download; returns (the data report, the lines to print)."""
    import logging

    from mistral_tune.config.registry import PREFERENCE_TRAINERS
    from mistral_tune.data.sources import resolve_local_path, resolve_sources
    from mistral_tune.models.sources import resolve_source
    from mistral_tune.models.tokenizer import load_tokenizer

    skipped = "\n\ndata: not checked (a hub dataset or a tokenizer that needs a download)"
    source = resolve_source(cfg.model.name, cfg.model.path)
    if cfg.trainer.name in PREFERENCE_TRAINERS:
        hub_data = resolve_local_path(cfg.data.path) is None
    else:
        hub_data = any(spec.hub for spec in resolve_sources(cfg.data))
    if hub_data or (source.local_dir is None and source.preset is None):
        return None, skipped
    try:
        tokenizer = load_tokenizer(source)
    except (ValueError, OSError, UserError):  # a preset whose tokenizer file lives on the hub: nothing is fetched
        return None, skipped
    if cfg.trainer.name in PREFERENCE_TRAINERS:
        from mistral_tune.data.preference import prepare_preference_data as prepare
    else:
        from mistral_tune.data.sft import prepare_sft_data as prepare
    quiet = logging.getLogger("mistral_tune.data")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # the report below says it once
    try:
        prepared = prepare(cfg.data, cfg.trainer, tokenizer)
    finally:
        quiet.setLevel(level)
    r = prepared.report.as_dict()
    parts = f" ({', '.join(f'{k}: {n}' for k, n in r['truncated_parts'].items())})" if r["truncated_parts"] else ""
    drops = ", ".join(f"{n} {reason}" for reason, n in r["dropped"].items()) or "none"
    lines = [
        "",
        "",
        f"data: {r['read']} rows of {cfg.data.path} ({prepared.format}), checked with the model's tokenizer:",
        f"  {r['used']} for training, {r['held_out']} held out, {r['eval_used']} for evaluation; "
        f"{r['truncated']} truncated{parts} at trainer.max_length={cfg.trainer.max_length}; dropped: {drops}",
    ]
    if r["length_notice"]:
        lines.append(f"  {r['length_notice']['message']}")
    return r, "\n".join(lines)


def render(cfg, origin, trainable, total, shape, memory, speed, moe: bool = False) -> str:
    a = cfg.adapter
    adapter = "none (full fine-tuning)" if a.name == "none" else f"{a.name} r={a.r} on {', '.join(a.target_modules)}"
    gc = "on" if shape.gradient_checkpointing else "off"
    dtype = "fp32" if estimate.activation_bytes(shape) == 4 else "bf16"
    lines = [
        f"dry run of recipe {cfg.recipe}: nothing is trained or downloaded",
        f"  model        {cfg.model.name} ({origin})",
        f"  adapter      {adapter}",
        f"  parameters   {total:,} total, {trainable:,} trainable ({100 * trainable / total:.3f}%)",
        f"  tokens/step  up to {shape.tokens_per_step:,} = batch {shape.batch_size} x accumulation "
        f"{shape.grad_accum} x {shape.num_devices} device(s) x max_length {shape.seq_len}",
        "",
        f"estimated peak memory per device ({dtype} activations, {shape.attn} attention, gradient checkpointing {gc}):",
    ]
    for label, (nbytes, note) in memory.terms.items():
        lines.append(f"  {label:<30} {estimate.gib(nbytes):>10}   {note}")
    other = "off" if shape.gradient_checkpointing else "on"
    lines.append(
        f"  {'peak':<30} {estimate.gib(memory.peak_bytes):>10}   "
        f"(gradient checkpointing {other}: {estimate.gib(memory.peak_bytes_other_checkpointing)})"
    )
    fit = estimate.fits(memory.peak_bytes, cfg.dry_run_gpu)
    lines += [
        f"  fits one {speed.gpu.name}: {'yes' if fit else 'no'} ({speed.gpu.memory_gib:g} GiB usable)",
        "",
        f"estimated speed on {speed.gpu.name} at {speed.mfu:.0%} FLOPs utilization "
        f"({speed.gpu.bf16_tflops if shape.compute_bytes < 4 else speed.gpu.tf32_tflops:g} TFLOPS peak, dry_run_mfu):",
        f"  {speed.flops_per_token / 1e9:.1f} GFLOPs per token (forward, backward"
        f"{', recomputation' if shape.gradient_checkpointing else ''})",
        f"  {speed.step_seconds:.3g} s per optimizer step, {speed.tokens_per_second:,.0f} tokens/s"
        f"{' over all devices' if shape.num_devices > 1 else ''}",
    ]
    if moe and shape.adapter == "qlora":
        if not estimate.lora_on_experts(shape):
            lines.append(
                "  note: the experts (3D tensors in transformers 5, not nn.Linear) are stored in NF4 by mistral-tune, "
                "one 4-bit weight per expert projection, dequantized per routed expert (docs/memory.md#mixture-of-experts)"
            )
        else:
            lines.append(
                "  note: LoRA on the experts keeps them unquantized, in fp32 after PEFT's k-bit preparation; drop "
                "experts.* from adapter.target_modules to store them in NF4 (docs/memory.md#mixture-of-experts)"
            )
    if cfg.trainer.name != "sft":
        lines.append(f"  note: estimated as one SFT sequence per example; trainer={cfg.trainer.name} may differ")
    return "\n".join(lines)
