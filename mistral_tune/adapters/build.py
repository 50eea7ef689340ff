"""Apply the configured adapter (LoRA, QLoRA, DoRA, or none for full fine-tuning) through PEFT.

``adapter=lora`` and ``adapter=dora`` wrap the base with a PEFT ``LoraConfig`` (DoRA is
``use_dora=True``); ``adapter=qlora`` is LoRA on a base loaded in 4-bit NF4 with double quantization
(bitsandbytes), prepared with ``prepare_model_for_kbit_training``; ``adapter=none`` trains every weight.
Saved adapters carry a small sidecar (``mistral_tune_adapter.json``) recording how the base was quantized,
so a later standalone export can rebuild exactly the base the adapter was trained against.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any, Optional

from mistral_tune.adapters.quantization import keep_cpu_4bit_numerics, quantization_record
from mistral_tune.core.errors import UserError

log = logging.getLogger(__name__)


SIDECAR = "mistral_tune_adapter.json"


# Mixtral's experts in transformers 5: two 3D parameters per layer, not nn.Linear modules. Named in
# adapter.target_modules, they become PEFT's target_parameters (LoRA on each expert's slice).
EXPERT_PARAMETERS = ("experts.gate_up_proj", "experts.down_proj")
ATTENTION_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj"]


def split_targets(targets: list[str], moe: bool = False) -> tuple[Any, list[str]]:
    """(PEFT target_modules, target_parameters) for ``adapter.target_modules``.

    On a mixture-of-experts model ``all-linear`` means the nn.Linear layers, i.e. attention: PEFT's
    own all-linear would also put LoRA on the router and on every expert, which changes routing and
    costs far more. The experts are opt-in by name (``experts.gate_up_proj``, ``experts.down_proj``).
    """
    params = [t for t in targets if t in EXPERT_PARAMETERS]
    modules = [t for t in targets if t not in EXPERT_PARAMETERS]
    if modules == ["all-linear"]:
        return (ATTENTION_MODULES if moe else "all-linear"), params
    if "all-linear" in modules:
        raise UserError(
            f"adapter.target_modules={targets}: all-linear already names every linear layer; list it alone "
            "(experts.gate_up_proj / experts.down_proj may be added on a Mixtral model)."
        )
    return modules, params


def lora_config(adapter_cfg: Any, task_type: str = "CAUSAL_LM", *, moe: bool = False):
    """The PEFT ``LoraConfig`` for the adapter group (DoRA is LoRA with ``use_dora``).

    ``task_type="SEQ_CLS"`` (reward models) also trains and saves the new ``score`` head in full.
    ``moe``: the base is a mixture of experts (Mixtral), see :func:`split_targets`.
    """
    from peft import LoraConfig

    modules, params = split_targets(list(adapter_cfg.target_modules), moe)
    if params and adapter_cfg.lora_dropout:
        raise UserError(
            f"adapter.target_modules names Mixtral's experts ({', '.join(params)}): PEFT's LoRA on parameters has "
            f"no dropout, and adapter.lora_dropout={adapter_cfg.lora_dropout}. Set adapter.lora_dropout=0."
        )
    init: Any = str(adapter_cfg.init_lora_weights)
    if init in ("default", "true", "True"):
        init = True
    return LoraConfig(
        r=adapter_cfg.r,
        lora_alpha=adapter_cfg.lora_alpha,
        lora_dropout=adapter_cfg.lora_dropout,
        target_modules=modules,
        target_parameters=params or None,
        modules_to_save=list(adapter_cfg.modules_to_save) or None,
        use_rslora=adapter_cfg.use_rslora,
        use_dora=adapter_cfg.name == "dora",
        init_lora_weights=init,
        task_type=task_type,
    )


def is_moe_model(model: Any) -> bool:
    """A mixture-of-experts transformers model (Mixtral: ``num_local_experts`` in its config)."""
    return bool(getattr(getattr(model, "config", None), "num_local_experts", None))


def expert_lora_targets(adapter_cfg: Any) -> list[str]:
    """The experts' parameters the adapter puts LoRA on (its saved config's, when continuing one)."""
    if adapter_cfg.resume_from:
        path = Path(adapter_cfg.resume_from) / "adapter_config.json"
        saved = json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
        return list(saved.get("target_parameters") or [])
    return split_targets(list(adapter_cfg.target_modules), moe=True)[1]


def store_experts_4bit(model: Any, adapter_cfg: Any) -> int:
    """QLoRA on Mixtral: store the experts in NF4 too (bitsandbytes only quantizes nn.Linear), unless the
    adapter puts LoRA on them: PEFT's LoRA on parameters needs them as 16-bit parameters, so then they stay."""
    from mistral_tune.adapters.experts4bit import quantize_experts

    targeted = expert_lora_targets(adapter_cfg)
    if targeted:
        log.warning(
            "QLoRA with LoRA on the experts (%s): the experts stay in 16-bit (upcast to fp32 for training), "
            "not 4-bit; drop them from adapter.target_modules to store them in NF4.",
            ", ".join(targeted),
        )
        return 0
    return quantize_experts(model)


def changes_base(adapter_cfg: Any) -> bool:
    """PiSSA/OLoRA initialize by moving part of the base weights into the adapter."""
    return (
        adapter_cfg.name != "none"
        and not adapter_cfg.resume_from
        and str(adapter_cfg.init_lora_weights).startswith(("pissa", "olora"))
    )


def apply_adapter(
    model: Any,
    adapter_cfg: Any,
    *,
    gradient_checkpointing: bool = False,
    init_dir: Optional[Path] = None,
    task_type: str = "CAUSAL_LM",
):
    """Wrap ``model`` for training; returns the model to train (a PeftModel unless adapter=none).

    ``init_dir``: where to keep the initial adapter when ``adapter.init_lora_weights`` rewrites the base (PiSSA,
    OLoRA), so :func:`save_adapter` can convert the trained adapter back to one for the original base.
    """
    if adapter_cfg.name == "none":
        model.requires_grad_(True)
        return model
    from peft import PeftModel, get_peft_model, prepare_model_for_kbit_training

    if getattr(model, "is_loaded_in_4bit", False):
        if is_moe_model(model):
            store_experts_4bit(model, adapter_cfg)
        # Freezes the base, casts 16-bit norms/embeddings to fp32 and enables input grads, so gradients
        # flow through the frozen 4-bit layers into the adapter.
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
        keep_cpu_4bit_numerics(model)
    if adapter_cfg.resume_from:
        path = Path(adapter_cfg.resume_from)
        if not (path / "adapter_config.json").exists():
            raise UserError(f"adapter.resume_from={path}: no adapter_config.json there.")
        log.info("continuing training of the adapter in %s (its own r/alpha/targets apply)", path)
        return PeftModel.from_pretrained(model, path, is_trainable=True)
    moe = is_moe_model(model)
    config = lora_config(adapter_cfg, task_type, moe=moe)
    targets = config.target_modules
    if isinstance(targets, (list, set, tuple)):  # "all-linear" and regexes are PEFT's to match
        check_target_modules(model, list(targets))
    peft_model = get_peft_model(model, config)
    if changes_base(adapter_cfg) and init_dir is not None:
        # PEFT's recipe: save the initial adapter with plain init, convert against it at save time.
        peft_model.peft_config["default"].init_lora_weights = True
        peft_model.save_pretrained(init_dir)
        peft_model.peft_config["default"].init_lora_weights = lora_config(
            adapter_cfg, task_type, moe=moe
        ).init_lora_weights
    return peft_model


def save_adapter(
    model: Any, out_dir: Path, *, base: dict[str, Any], kind: str, init_dir: Optional[Path] = None
) -> Path:
    """Save the trained adapter plus a sidecar naming its base and how that base was quantized."""
    out_dir = Path(out_dir)
    if base.get("label"):  # else PEFT records wherever the base was loaded from (maybe a temp dir)
        for peft_config in model.peft_config.values():
            peft_config.base_model_name_or_path = base["label"]
    if init_dir is not None and Path(init_dir).is_dir():
        # The converted adapter (rank 2r) applies to the original base, not PiSSA/OLoRA's residual base.
        model.save_pretrained(
            out_dir, path_initial_model_for_weight_conversion=str(init_dir), save_embedding_layers=False
        )
        shutil.rmtree(init_dir, ignore_errors=True)
    else:
        model.save_pretrained(out_dir, save_embedding_layers=False)
    sidecar = {"adapter": kind, "base": base, "quantization": quantization_record(model)}
    (out_dir / SIDECAR).write_text(json.dumps(sidecar, indent=2) + "\n", encoding="utf-8")
    return out_dir


def read_sidecar(adapter_dir: Path) -> dict[str, Any]:
    path = Path(adapter_dir) / SIDECAR
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}


def check_target_modules(model: Any, targets: list[str]) -> None:
    """One clear error when ``adapter.target_modules`` names a module the model does not have, listing the names
    it does have (PEFT raises only when none matches, with no list)."""
    names = {name.rsplit(".", 1)[-1] for name, module in model.named_modules() if name and not list(module.children())}
    unknown = [t for t in targets if t not in names and not any(n.endswith("." + t) for n, _ in model.named_modules())]
    if unknown:
        raise UserError(
            f"adapter.target_modules names {', '.join(unknown)}, which this model does not have. Its layer names are: "
            f"{', '.join(sorted(names))}. Pick from these, or use adapter.target_modules=all-linear."
        )


def adapter_shapes(model: Any) -> dict[str, list[int]]:
    """Name -> shape of the weights a PEFT model saves for its active adapter, under the names its checkpoints use."""
    from peft import get_peft_model_state_dict

    return {name: list(t.shape) for name, t in get_peft_model_state_dict(model).items()}


def count_parameters(model: Any) -> tuple[int, int]:
    """(trainable, total) parameters; 4-bit weights count as the elements of the matrix they encode."""
    from mistral_tune.compat.bitsandbytes import is_params4bit

    trainable = total = 0
    for p in model.parameters():
        n = p.numel()
        if is_params4bit(p):
            state = getattr(p, "quant_state", None)
            # Packed storage holds two 4-bit values per byte; the quant state knows the real shape.
            n = state.shape.numel() if state is not None else n * 2 * p.element_size()
        total += n
        if p.requires_grad:
            trainable += n
    return trainable, total
