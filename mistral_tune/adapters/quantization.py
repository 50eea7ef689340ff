"""4-bit NF4 quantization (bitsandbytes) for QLoRA: the BitsAndBytesConfig, CPU numerics, adapter
dtypes, and the optimizers that need CUDA.
"""

from __future__ import annotations

from typing import Any, Optional

from mistral_tune.core.errors import UserError

# TrainingArguments optimizers whose state is paged between GPU and CPU memory (CUDA unified memory).
PAGED_OPTIMIZERS = (
    "paged_adamw_32bit",
    "paged_adamw_8bit",
    "paged_ademamix_32bit",
    "paged_ademamix_8bit",
    "paged_lion_32bit",
    "paged_lion_8bit",
)


def is_4bit(adapter_cfg: Any) -> bool:
    return adapter_cfg.name == "qlora" or bool(adapter_cfg.load_in_4bit)


def quantization_config(adapter_cfg: Any, compute_dtype: Any):
    """bitsandbytes 4-bit config for QLoRA (NF4 + double quantization by default), else None.

    ``compute_dtype`` is the dtype the dequantized weights are multiplied in: the model dtype, which
    ``model.dtype=auto`` resolves to bf16 on a bf16-capable GPU and fp32 on CPU.
    """
    if not is_4bit(adapter_cfg):
        return None
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as exc:
        raise UserError(
            "adapter=qlora needs bitsandbytes for 4-bit quantization. Install it with "
            "`pip install 'mistral-tune[qlora]'` (or `pip install bitsandbytes`), or use adapter=lora."
        ) from exc
    import torch
    from transformers import BitsAndBytesConfig

    if adapter_cfg.bnb_4bit_compute_dtype != "auto":
        compute_dtype = getattr(torch, adapter_cfg.bnb_4bit_compute_dtype)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=adapter_cfg.bnb_4bit_quant_type,
        bnb_4bit_use_double_quant=adapter_cfg.bnb_4bit_use_double_quant,
        bnb_4bit_compute_dtype=compute_dtype,
    )


def check_optimizer(optim: str) -> None:
    """Paged optimizers need CUDA; on CPU bitsandbytes would silently fall back to unpaged state.

    8-bit AdamW (``adamw_8bit``/``adamw_bnb_8bit``) has a CPU path in bitsandbytes >= 0.49 and is allowed.
    """
    import torch

    if optim in PAGED_OPTIMIZERS and not torch.cuda.is_available():
        raise UserError(
            f"train.optim={optim} pages optimizer state through CUDA unified memory, and this machine has no CUDA "
            "GPU. Use train.optim=adamw_8bit (8-bit state, works on CPU) or train.optim=adamw_torch."
        )
    if "8bit" in optim or "bnb" in optim:
        try:
            import bitsandbytes  # noqa: F401
        except ImportError as exc:
            raise UserError(f"train.optim={optim} needs bitsandbytes: `pip install bitsandbytes`.") from exc


def keep_cpu_4bit_numerics(model: Any) -> None:
    """Make eval-mode 4-bit layers on CPU compute as training does (dequantize, matmul in compute dtype).

    On CPUs with AVX512-BF16, bitsandbytes' eval path repacks each 4-bit weight on first use, rounding
    its block scales to bf16 (lossy, and permanent for the model in memory), and multiplies in bf16.
    Generating samples would then change the weights that the export dequantizes, and the 4-bit
    model's logits would no longer match what was trained.
    """
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def match_adapter_dtype(model: Any, compute_dtype: Any) -> int:
    """With an fp32 compute dtype (QLoRA on CPU), keep trainable weights in fp32; returns how many moved.

    TRL's SFTTrainer casts a quantized model's trainable weights to bf16 (the QLoRA paper's choice for
    bf16 GPUs). With fp32 compute that only loses precision: the LoRA branch would run in bf16 and
    small AdamW updates would round away. Call after building the trainer, before training.
    """
    import torch

    if compute_dtype != torch.float32:
        return 0
    moved = 0
    for param in model.parameters():
        if param.requires_grad and param.is_floating_point() and param.dtype != torch.float32:
            param.data = param.data.float()
            moved += 1
    return moved


def is_4bit_linear(module: Any) -> bool:
    """bitsandbytes' Linear4bit itself (not PEFT's LoRA wrapper of the same class name)."""
    from mistral_tune.compat.bitsandbytes import is_linear4bit

    return is_linear4bit(module)


def quantized_modules(model: Any) -> list[str]:
    """Names of the weights stored in 4-bit, as the base checkpoint names them (without ``.weight``):
    the linear layers, and each expert's w1/w2/w3 where Mixtral's experts are 4-bit (``Experts4bit``)."""
    from mistral_tune.adapters.experts4bit import PROJECTIONS, is_experts4bit
    from mistral_tune.compat.peft import base_module_name
    from mistral_tune.compat.transformers import expert_checkpoint_name

    names = []
    for name, module in model.named_modules():
        if is_4bit_linear(module):
            names.append(base_module_name(name))
        elif is_experts4bit(module):
            base = base_module_name(name)
            names.extend(expert_checkpoint_name(base, e, p) for e in range(module.num_experts) for p in PROJECTIONS)
    return names


def experts_were_4bit(record: dict[str, Any]) -> bool:
    """Whether a quantization record (below) lists Mixtral experts stored in 4-bit."""
    from mistral_tune.compat.transformers import EXPERT_CHECKPOINT_INFIX

    return any(EXPERT_CHECKPOINT_INFIX in name for name in record.get("modules", ()))


def quantization_record(model: Any) -> Optional[dict[str, Any]]:
    """How the base was quantized, read from the model itself (None for a 16/32-bit base)."""
    for module in model.modules():
        if is_4bit_linear(module):
            state = module.weight.quant_state
            return {
                "quant_type": state.quant_type,
                "double_quant": bool(state.nested),
                "blocksize": int(state.blocksize),
                "base_dtype": str(state.dtype).removeprefix("torch."),
                "modules": quantized_modules(model),
            }
    return None


QUANTIZE_MODES = ("int8", "int4")


def quantize_in_place(model: Any, mode: str = "int8", skip: tuple[str, ...] = ("lm_head",)) -> int:
    """Swap every ``nn.Linear`` of a loaded model (except ``skip``) for its bitsandbytes form, in place:
    "int8" = ``Linear8bitLt`` (LLM.int8() weights, per-row absmax), "int4" = ``Linear4bit`` (NF4).
    Both run on CPU with bitsandbytes >= 0.49 and on CUDA. Returns the number of layers swapped.
    (keras-hub's ``quantize("int8")`` is Keras' own int8; the weights differ in rounding, not in kind.)
    """
    if mode not in QUANTIZE_MODES:
        raise UserError(f"quantize: mode {mode!r} is not one of {', '.join(QUANTIZE_MODES)}.")
    try:
        import bitsandbytes as bnb
    except ImportError as exc:
        raise UserError("quantize() needs bitsandbytes: pip install 'mistral-tune[qlora]'.") from exc
    import torch

    swapped = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is not torch.nn.Linear or name in skip:
                continue
            weight = child.weight.data
            device, dtype = weight.device, weight.dtype
            has_bias = child.bias is not None
            if mode == "int8":
                new = bnb.nn.Linear8bitLt(
                    child.in_features, child.out_features, bias=has_bias, has_fp16_weights=False, threshold=0.0
                )
                new.weight = bnb.nn.Int8Params(weight.cpu().clone(), requires_grad=False, has_fp16_weights=False)
            else:
                new = bnb.nn.Linear4bit(
                    child.in_features, child.out_features, bias=has_bias, compute_dtype=dtype, quant_type="nf4"
                )
                new.weight = bnb.nn.Params4bit(weight.cpu().clone(), requires_grad=False, quant_type="nf4")
            if has_bias:
                new.bias = torch.nn.Parameter(child.bias.data.clone(), requires_grad=False)
            setattr(parent, name, new.to(device))  # moving the weight quantizes it
            swapped += 1
    return swapped
