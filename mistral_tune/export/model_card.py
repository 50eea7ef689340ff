"""README.md model card for a published adapter: base, recipe, data and metrics of the run."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional


def base_label(model_cfg: Any) -> str:
    """What the adapter was trained on: a local path, a hub repo or a built-in preset id."""
    from mistral_tune.models.presets import PRESETS

    if model_cfg.path:
        return str(model_cfg.path)
    preset = PRESETS.get(model_cfg.name)
    if preset is not None and preset.hf_repo and model_cfg.load_weights:
        return preset.hf_repo
    return str(model_cfg.name)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "n/a" if value is None else str(value)


def model_card(cfg: Any, summary: dict[str, Any]) -> str:
    """The card's Markdown: YAML front matter for the hub, then base, recipe, data, metrics, usage."""
    a, base = cfg.adapter, base_label(cfg.model)
    kind = {"lora": "LoRA", "qlora": "QLoRA (4-bit NF4 base)", "dora": "DoRA"}.get(a.name, a.name)
    data = summary.get("data") or {}
    merged = summary.get("merged") or {}
    targets = ", ".join(map(str, a.target_modules))
    lines = [
        "---",
        f"base_model: {base}",
        "library_name: peft",
        "tags: [mistral-tune, mistral, " + a.name + ", " + cfg.trainer.name + "]",
        "---",
        "",
        f"# {kind} adapter for {base}",
        "",
        f"Trained with mistral-tune recipe `{cfg.recipe}` ({cfg.trainer.name}).",
        "",
        "## Base model",
        f"- `{base}` (preset `{cfg.model.name}`, dtype {cfg.model.dtype})",
        "",
        "## Recipe",
        f"- adapter: {a.name}, r={a.r}, lora_alpha={a.lora_alpha}, lora_dropout={a.lora_dropout}, "
        f"use_rslora={a.use_rslora}, init_lora_weights={a.init_lora_weights}",
        f"- target modules: {targets}"
        + (f"; modules_to_save: {', '.join(a.modules_to_save)}" if a.modules_to_save else ""),
        f"- steps: {summary.get('steps')}, batch {cfg.train.per_device_train_batch_size} x "
        f"{cfg.train.gradient_accumulation_steps} accumulation, learning rate {cfg.train.learning_rate}, "
        f"{cfg.train.lr_scheduler_type} schedule, optimizer {cfg.train.optim}, seed {cfg.train.seed}",
        f"- trainable parameters: {_fmt((summary.get('parameters') or {}).get('trainable'))} of "
        f"{_fmt((summary.get('parameters') or {}).get('total'))}",
        "",
        "## Data",
        f"- `{cfg.data.path}` (format {cfg.data.format}), max_length {cfg.trainer.max_length}",
        f"- examples read {_fmt(data.get('read'))}, used {_fmt(data.get('used'))}, held out "
        f"{_fmt(data.get('held_out'))}, truncated {_fmt(data.get('truncated'))}, dropped {_fmt(data.get('dropped_total'))}",
        "",
        "## Metrics",
        f"- loss: first {_fmt(summary.get('first_loss'))}, final {_fmt(summary.get('final_loss'))}, "
        f"best {_fmt(summary.get('best_loss'))}",
        f"- tokens seen {_fmt(summary.get('tokens_seen'))}, train time {_fmt(summary.get('train_seconds'))} s",
    ]
    if merged.get("max_abs_logit_diff") is not None:
        lines.append(
            f"- merged export verified: max |logit diff| {_fmt(merged['max_abs_logit_diff'])} "
            f"({merged.get('dtype')}, against the {merged.get('reference')})"
        )
    lines += gguf_lines(summary.get("gguf"))
    lines += [
        "",
        "## Use",
    ]
    if base == cfg.model.name:  # an embedded random-init preset: there is nothing to download
        lines.append(f"`{base}` is built by mistral-tune from seed {cfg.train.seed}; merge with the command below.")
    else:
        lines += [
            "```python",
            "from peft import PeftModel",
            "from transformers import AutoModelForCausalLM",
            "",
            f'base = AutoModelForCausalLM.from_pretrained("{base}")',
            'model = PeftModel.from_pretrained(base, "PATH/TO/THIS/DIRECTORY")',
            "```",
        ]
    lines += [
        "Merge it into the base (streamed shard by shard, verified):",
        "```",
        f"mistral-tune export adapter=PATH/TO/THIS/DIRECTORY base={cfg.model.path or cfg.model.name} out=merged"
        + (f" seed={cfg.train.seed}" if base == cfg.model.name else ""),  # a random-init base: its seed
        "```",
        "",
    ]
    return "\n".join(lines)


def gguf_lines(gguf: Optional[dict[str, Any]]) -> list[str]:
    """The model card's GGUF section: the files, how each was verified, and the sliding-window caveat."""
    if not gguf:
        return []
    lines = ["", "## GGUF (llama.cpp)"]
    for f in gguf.get("files", []):
        check = f.get("verification")
        status = (
            f"verified in llama.cpp: max |top-{check['top_k']} log-prob diff| {_fmt(check['max_abs_logprob_diff'])}, "
            f"{check['greedy_tokens']}/{check['greedy_tokens_expected']} greedy tokens equal"
            if check
            else "not verified (" + str(gguf.get("unverified_reason") or "verify=false") + ")"
        )
        lines.append(f"- `{Path(f['path']).name}` ({f['type']}, {_fmt(f['bytes'])} bytes): {status}")
    if gguf.get("sliding_window_honoured") is False:
        lines.append(f"- Sliding window: {gguf['sliding_window_note']}.")
    if any(f.get("architecture") == "granite_swa" for f in gguf.get("files", [])):
        lines.append(
            "- Architecture: written as llama.cpp's `granite_swa` (its Granite scales and attention sinks set to "
            "no-ops), the llama.cpp graph that applies Ministral's per-layer sliding windows; a llama.cpp build "
            "without `granite_swa` refuses the file."
        )
    return lines


def write_model_card(adapter_dir: Path, cfg: Any, summary: dict[str, Any]) -> Optional[Path]:
    """Write ``adapter_dir/README.md`` (replacing PEFT's empty template); None when there is no adapter."""
    adapter_dir = Path(adapter_dir)
    if not (adapter_dir / "adapter_config.json").exists():
        return None
    path = adapter_dir / "README.md"
    path.write_text(model_card(cfg, summary), encoding="utf-8")
    return path
