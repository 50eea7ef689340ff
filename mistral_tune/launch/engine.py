"""What each process of a multi-process run does differently: rank-0-only writes, one shared run
directory, the engine's needs, gathering sharded weights to save them, and world-wide numbers.

It reads the environment that torchrun, ``accelerate launch`` and the DeepSpeed launcher set
(RANK, WORLD_SIZE, LOCAL_RANK, ACCELERATE_USE_DEEPSPEED, ACCELERATE_USE_FSDP), so a run behaves the same
whether ``mistral-tune launcher=...`` started the processes or the user ran ``accelerate launch`` itself.
Outside any launch every function answers for a single process. No torch import at module level.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from mistral_tune.core.errors import UserError
from mistral_tune.core.process import (
    FAIL_HOW_ENV,
    FAIL_RANK_ENV,
    FAIL_STEP_ENV,
    engine_from_env,
    num_machines,
    rank,
    world_size,
)

log = logging.getLogger(__name__)


FSDP_NEEDS_GPUS = (
    "FSDP needs GPUs: accelerate only shards with FSDP on accelerator devices, and on CPU it would quietly "
    "run plain DDP instead. On CPU use launcher=ddp, deepspeed_zero2 or deepspeed_zero3."
)


def prepare_process(cfg: Any) -> None:
    """Settle the device and backend of this process before any model or trainer is built.

    - On GPUs, each process takes the GPU of its local rank now, so that loading (a 4-bit model is
      placed while it loads) lands on that GPU and not all on GPU 0.
    - On CPU, accelerate only forms a multi-process group when told it runs on CPU (DDP), and
      DeepSpeed needs the gloo backend named; without these both would train ``world_size`` unsynced
      copies that each think they are rank 0.
    """
    if world_size() == 1:
        return
    import torch

    engine = engine_from_env()
    expected = cfg.launcher.name.split("_")[0]  # ddp | fsdp | deepspeed
    if cfg.launcher.name != "local" and expected != engine:
        log.warning(
            "launcher=%s is ignored inside a launch already started as %s; the engine comes from how the "
            "processes were started (the accelerate config)",
            cfg.launcher.name,
            engine,
        )
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
        return
    if engine == "fsdp":
        raise UserError(FSDP_NEEDS_GPUS)
    if cfg.train.ddp_backend is None:
        cfg.train.ddp_backend = "gloo"
    if engine != "deepspeed":
        os.environ["ACCELERATE_USE_CPU"] = "true"


def start_cpu_process_group(cfg: Any) -> None:
    """Form the gloo group of a CPU DDP launch now, with ``train.ddp_timeout``.

    transformers hands the timeout to accelerate on GPUs and under DeepSpeed, but not in accelerate's CPU
    mode, where gloo would wait 30 minutes for a lost process; accelerate keeps a group that already
    exists. Call after :func:`prepare_process`; a no-op anywhere else.
    """
    if world_size() == 1 or os.environ.get("ACCELERATE_USE_CPU") != "true":
        return
    import torch.distributed as dist

    if not dist.is_initialized():
        from datetime import timedelta

        dist.init_process_group(backend=cfg.train.ddp_backend, timeout=timedelta(seconds=cfg.train.ddp_timeout))


def quantization_for_engine(quant: Any) -> Any:
    """QLoRA under FSDP: store the 4-bit weights in the compute dtype so FSDP can shard them with the
    other parameters (and transformers then sets FSDP's mixed precision to that dtype)."""
    if quant is not None and engine_from_env() == "fsdp" and getattr(quant, "load_in_4bit", False):
        quant.bnb_4bit_quant_storage = quant.bnb_4bit_compute_dtype
        log.info("fsdp: 4-bit weights stored as %s (bnb_4bit_quant_storage)", quant.bnb_4bit_quant_storage)
    return quant


def zero_stage(trainer: Any) -> int:
    """DeepSpeed ZeRO stage of a built trainer, 0 when DeepSpeed is not in use."""
    if not getattr(trainer, "is_deepspeed_enabled", False):
        return 0
    return int(trainer.accelerator.state.deepspeed_plugin.zero_stage)


def params_sharded(trainer: Any) -> bool:
    """True when no single process holds the whole trained model (ZeRO-3, FSDP)."""
    return zero_stage(trainer) == 3 or getattr(trainer, "is_fsdp_enabled", False)


def save_trained(trainer: Any, out_dir: Path) -> None:
    """Save the adapter (or the full model) of a trained, possibly sharded model; rank 0 writes.

    A collective under ZeRO-3 and FSDP: every process must call it. ZeRO-3 gathers only the trainable
    (adapter) parameters; FSDP and full fine-tunes under ZeRO-3 gather one full state dict on rank 0.
    """
    from peft import PeftModel

    accelerator = trainer.accelerator
    model = accelerator.unwrap_model(trainer.model)
    main = accelerator.is_main_process
    if zero_stage(trainer) == 3 and isinstance(model, PeftModel):
        import deepspeed

        trainable = [p for p in model.parameters() if p.requires_grad]
        with deepspeed.zero.GatheredParameters(trainable, modifier_rank=None):
            if main:
                model.save_pretrained(out_dir)
    elif params_sharded(trainer):
        state = accelerator.get_state_dict(trainer.deepspeed if trainer.is_deepspeed_enabled else trainer.model)
        if main:
            model.save_pretrained(out_dir, state_dict=state)
    elif main:
        model.save_pretrained(out_dir)
    accelerator.wait_for_everyone()


def load_trained(
    cfg: Any, source: Any, quant: Any, saved_dir: Path, pad_token_id: int | None = None, task: str = "CAUSAL_LM"
):
    """Rank 0 rebuilds the whole trained model (base + saved adapter, or the saved full model) for
    samples and export, when its own copy is only a shard (ZeRO-3, FSDP). ``task`` is the trainer's
    TASK_TYPE (a reward model is rebuilt with its score head, ``SEQ_CLS``). A reward model gets
    ``pad_token_id`` back, as training set it: its score is read at the last non-pad token."""
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    import mistral_tune.models.loading as models

    # Transformers would otherwise build the model as ZeRO-3 partitions, waiting for ranks that are gone.
    unset_hf_deepspeed_config()
    log.info("rebuilding the trained model from %s for samples and export", saved_dir)
    if cfg.adapter.name == "none":
        from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

        auto_class = AutoModelForSequenceClassification if task == "SEQ_CLS" else AutoModelForCausalLM
        model = auto_class.from_pretrained(saved_dir, dtype=models.resolve_dtype(cfg.model.dtype))
    else:
        from peft import PeftModel

        base = models.load_model(cfg.model, source, seed=cfg.train.seed, quantization_config=quant, task=task)
        model = PeftModel.from_pretrained(base, saved_dir)
    if task == "SEQ_CLS":
        model.config.pad_token_id = pad_token_id
    return model


def run_facts(trainer: Any, launcher_name: str) -> dict[str, Any]:
    """World size, effective global batch and engine, for summary.json.

    global batch = per-device batch x gradient accumulation x processes, e.g. 8 x 2 x 16 = 256 sequences.
    """
    args = trainer.args
    world = int(args.world_size)
    stage = zero_stage(trainer)
    if stage:
        engine = f"deepspeed_zero{stage}"
    elif getattr(trainer, "is_fsdp_enabled", False):  # what the trainer does, not what was asked for
        engine = f"fsdp{trainer.accelerator.state.fsdp_plugin.fsdp_version}"
    else:
        engine = "ddp" if world > 1 else "single"
    facts = {
        "launcher": launcher_name,
        "engine": engine,
        "world_size": world,
        "num_machines": num_machines(),
        "global_batch_size": args.per_device_train_batch_size * args.gradient_accumulation_steps * world,
    }
    if stage and getattr(trainer, "deepspeed", None) is not None:
        facts["offload"] = deepspeed_offload(trainer.deepspeed)
    return facts


def deepspeed_offload(engine: Any) -> dict[str, str]:
    """Where the running DeepSpeed engine keeps parameters and optimizer states: ``{"param": "cpu", ...}``
    (``none`` = on the accelerator)."""

    def device(offload: Any) -> str:
        value = getattr(offload, "device", None) if offload is not None else None
        return str(getattr(value, "value", value) or "none")

    return {"param": device(engine.zero_offload_param()), "optimizer": device(engine.zero_offload_optimizer())}


def fault_drill_callbacks() -> list:
    """A callback that fails this process on purpose when MISTRAL_TUNE_FAIL_RANK names its rank.

    It fires at the end of step MISTRAL_TUNE_FAIL_STEP (default 1), before that step's checkpoint is
    saved; MISTRAL_TUNE_FAIL_HOW=hang stops the process (SIGSTOP) instead of raising.
    """
    target = os.environ.get(FAIL_RANK_ENV)
    if target is None or int(target) != rank():
        return []
    step = int(os.environ.get(FAIL_STEP_ENV, "1"))
    how = os.environ.get(FAIL_HOW_ENV, "raise")
    if how not in ("raise", "hang"):
        raise UserError(f"{FAIL_HOW_ENV}={how}: use raise or hang.")
    from transformers import TrainerCallback

    class FailOnPurpose(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step < step:
                return
            if how == "hang":
                import signal

                log.warning("failure drill: rank %d stops (SIGSTOP) at step %d", rank(), state.global_step)
                os.kill(os.getpid(), signal.SIGSTOP)
                return
            raise RuntimeError(
                f"failure drill: rank {rank()} fails on purpose at step {state.global_step} ({FAIL_RANK_ENV})"
            )

    return [FailOnPurpose()]
