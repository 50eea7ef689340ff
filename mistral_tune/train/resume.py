"""``resume=auto|PATH``: pick the checkpoint to continue from and check that continuing is faithful.

A resumed run must see the same training examples in the same order, or it would not continue at
the same sample. The data order comes from the sampler seed (``train.data_seed``, default
``train.seed``) and the batch geometry; the examples themselves are fingerprinted. Both are stored
in each checkpoint and compared here before any compute is spent.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from array import array
from pathlib import Path
from typing import Any

from mistral_tune.core.errors import UserError
from mistral_tune.train import checkpoints

log = logging.getLogger(__name__)


def check_resume_target(resume: str | None, output_dir_given: bool) -> None:
    """``resume=auto`` needs the ``output_dir`` of the run to continue (checked before any directory is made)."""
    if resume == "auto" and not output_dir_given:
        raise UserError(
            "resume=auto continues the run in output_dir, but no output_dir was given (the default is a new "
            "timestamped directory). Pass output_dir=runs/<the run to continue>."
        )


def resolve_resume(resume: str | None, run_dir: Path, output_dir_given: bool) -> Path | None:
    """The checkpoint directory to resume from, or None to start fresh.

    Checkpoints are verified against the checksums in their marker; a damaged one is skipped (with a
    warning) in favour of the previous good one.
    """
    from mistral_tune.core.files import remove_stale_temporaries

    root = run_dir / checkpoints.CHECKPOINTS_DIR
    if not resume:
        latest = checkpoints.latest_complete(root)
        if latest is not None or (run_dir / "metrics.jsonl").exists():
            raise UserError(
                f"output_dir={run_dir} already holds an earlier run"
                + (f" (latest checkpoint {latest.name})" if latest else "")
                + ". Pass resume=auto to continue it, or choose a new output_dir; starting over there would "
                "mix two runs."
            )
        return None
    if resume == "auto":
        check_resume_target(resume, output_dir_given)
        checkpoints.remove_leftovers(root)
        for left in remove_stale_temporaries(run_dir):  # .merged.tmp-PID etc. of an export that was killed
            log.info("removing %s left by an interrupted export", left)
        latest = checkpoints.latest_complete(root, verify=True)
        if latest is None:
            log.info("resume=auto: no complete checkpoint in %s; starting from step 0", root)
        return latest
    path = Path(resume).expanduser()
    if not path.is_dir():
        raise UserError(f"resume={resume}: no such directory. Pass a checkpoint-N directory or a run directory.")
    if checkpoints.checkpoint_step(path) is None:
        latest = checkpoints.latest_complete(path / checkpoints.CHECKPOINTS_DIR, verify=True)
        if latest is None:
            raise UserError(f"resume={resume}: no complete checkpoint in {path / checkpoints.CHECKPOINTS_DIR}.")
        return latest
    problem = checkpoints.completeness_problem(path, verify=True)
    if problem:
        raise UserError(f"resume={resume} is not a complete checkpoint: {problem}. Pick an earlier checkpoint.")
    return path


def dataset_fingerprint(dataset: Any) -> str:
    """sha256 over the token columns of every example, in order (SFT: input_ids and labels; DPO: prompt,
    chosen and rejected ids)."""
    digest = hashlib.sha256()
    columns = dataset.column_names
    for batch in dataset.iter(batch_size=1024):
        for row in zip(*(batch[c] for c in columns)):
            digest.update(b"|".join(array("q", ids).tobytes() for ids in row) + b";")
    return digest.hexdigest()[:16]


def batch_geometry(args: Any) -> dict[str, int]:
    """What decides which examples make up optimizer step N (besides the data and the seed)."""
    return {
        "per_device_train_batch_size": int(args.per_device_train_batch_size),
        "gradient_accumulation_steps": int(args.gradient_accumulation_steps),
        "world_size": int(args.world_size),
        "data_seed": int(args.data_seed if args.data_seed is not None else args.seed),
    }


# Optimizer and schedule settings stored in each checkpoint. The checkpoint's optimizer.pt and scheduler.pt
# carry the old values (the scheduler's base learning rate among them), so a resume that changes one would
# silently keep training with the old one while resolved_config.yaml claimed the new one: refused instead.
OPTIMIZER_SETTINGS = (
    "learning_rate",
    "lr_scheduler_type",
    "warmup_steps",
    "warmup_ratio",
    "weight_decay",
    "optim",
    "adam_beta1",
    "adam_beta2",
    "adam_epsilon",
    "max_grad_norm",
)


def optimizer_settings(args: Any) -> dict[str, Any]:
    """The optimizer/schedule settings of TrainingArguments ``args``, JSON-able."""
    out = {}
    for name in OPTIMIZER_SETTINGS:
        value = getattr(args, name, None)
        out[name] = value if isinstance(value, (int, float, str, bool, type(None))) else str(value)
    return out


def adapter_shapes(checkpoint: Path) -> dict[str, list[int]] | None:
    """Tensor name -> shape of a checkpoint's adapter weights (read from the safetensors header); None
    when it holds no adapter file (a full fine-tune)."""
    from safetensors import safe_open

    path = Path(checkpoint) / "adapter_model.safetensors"
    if not path.is_file():
        return None
    with safe_open(str(path), framework="pt") as f:
        return {name: list(f.get_slice(name).get_shape()) for name in f.keys()}


def adapter_shape_problem(saved: dict[str, list[int]] | None, current: dict[str, list[int]] | None) -> str | None:
    """Why the current model's adapter cannot take the checkpoint's weights (None when it can)."""
    if saved is None or current is None:
        return None
    missing, extra = sorted(set(saved) - set(current)), sorted(set(current) - set(saved))
    resized = sorted(n for n in set(saved) & set(current) if list(saved[n]) != list(current[n]))
    if not (missing or extra or resized):
        return None
    parts = []
    if resized:
        n = resized[0]
        parts.append(f"{len(resized)} weight(s) changed shape (e.g. {n}: {saved[n]} -> {current[n]}; adapter.r?)")
    if missing or extra:
        example = (missing or extra)[0]
        parts.append(
            f"{len(missing)} weight(s) of the checkpoint are not in the new adapter and {len(extra)} new one(s) are not "
            f"in the checkpoint (e.g. {example}; adapter.target_modules?)"
        )
    return "the adapter changed: " + "; ".join(parts)


def check_compatible(
    checkpoint: Path,
    fingerprint: str,
    geometry: dict[str, int],
    *,
    adapter: dict[str, list[int]] | None = None,
    optimizer: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Refuse to resume when the data, batch geometry, adapter shape or optimizer settings changed; returns the
    checkpoint's saved state. ``adapter`` is the current model's adapter weight shapes (``None``: not checked)."""
    state = checkpoints.read_marker(checkpoint)
    problems = []
    shape_problem = adapter_shape_problem(adapter_shapes(checkpoint), adapter) if adapter is not None else None
    if shape_problem:
        problems.append(shape_problem)
    saved_opt = state.get("optimizer_settings") or {}
    if optimizer:
        changed_opt = [
            f"train.{k}: {saved_opt[k]} -> {v}" for k, v in optimizer.items() if k in saved_opt and saved_opt[k] != v
        ]
        if changed_opt:
            problems.append(
                "the optimizer settings changed (" + ", ".join(changed_opt) + "; the checkpoint's optimizer and "
                "scheduler state would keep the old values)"
            )
    if state.get("data_fingerprint") not in (None, fingerprint):
        problems.append(
            "the training data differ (data.path, data.sources and their weights, data.max_samples, data.holdout, "
            "trainer.max_length, ...)"
        )
    saved = state.get("batch_geometry") or {}
    changed = [f"train.{k}: {saved[k]} -> {v}" for k, v in geometry.items() if k in saved and saved[k] != v]
    if changed:
        problems.append("the batch layout changed (" + ", ".join(changed) + ")")
    if problems:
        raise UserError(
            f"Cannot resume from {checkpoint}: " + "; ".join(problems) + ". Resuming would not continue the same "
            "run. Restore the original settings, or start a new run in a new output_dir (adapter.resume_from=<checkpoint> "
            "keeps the weights but restarts the schedule). Nothing in the run directory was changed."
        )
    return state


def restore_finished(trainer: Any, checkpoint: Path) -> Any:
    """A run whose checkpoint is already at its last step: load the checkpoint's weights and state, train nothing.

    Returns what ``trainer.train()`` would (a ``TrainOutput``), so the outputs are written exactly as at the end
    of an uninterrupted run. Trainer itself would take one step past ``max_steps`` here.
    """
    from transformers import TrainerState
    from transformers.trainer_utils import TrainOutput

    from mistral_tune.compat.transformers import load_checkpoint_weights

    load_checkpoint_weights(trainer, str(checkpoint))
    trainer.state = TrainerState.load_from_json(str(Path(checkpoint) / "trainer_state.json"))
    losses = [r["loss"] for r in trainer.state.log_history if isinstance(r.get("loss"), (int, float))]
    mean_loss = sum(losses) / len(losses) if losses else 0.0
    return TrainOutput(trainer.state.global_step, mean_loss, {"train_runtime": 0.0})


def trim_metrics(path: Path, step: int) -> list[dict[str, Any]]:
    """Keep metrics.jsonl records up to ``step`` (the resumed run re-logs the rest); returns them."""
    if not path.exists():
        return []
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by the kill
        if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] <= step:
            kept.append(record)
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")
    tmp.replace(path)
    return kept


def planned_steps(train_cfg: Any, num_examples: int, world_size: int = 1) -> int:
    if train_cfg.max_steps > 0:
        return int(train_cfg.max_steps)
    per_step = train_cfg.per_device_train_batch_size * train_cfg.gradient_accumulation_steps * world_size
    return math.ceil(train_cfg.num_train_epochs * math.ceil(num_examples / per_step))


def check_disk_for_run(cfg: Any, run_dir: Path, *, trainable: int, total: int, param_bytes: int, steps: int) -> int:
    """Estimate what the run will write (checkpoints, adapter, merged export) and fail early if it cannot fit."""
    full = cfg.adapter.name == "none"
    ckpt = checkpoints.estimate_checkpoint_bytes(trainable, total, full_model=full, param_bytes=param_bytes)
    saves = max(steps // cfg.train.save_steps, 1)
    kept = min(saves, cfg.train.save_total_limit) if cfg.train.save_total_limit else saves
    final = (total if full else trainable) * param_bytes
    export_bytes = {"float32": 4, "bfloat16": 2, "float16": 2}.get(cfg.export.dtype, param_bytes)
    merged = total * export_bytes if cfg.export.merged else 0
    need = checkpoints.required_disk_bytes(
        checkpoint_bytes=ckpt, num_checkpoints=kept, final_bytes=final, merged_bytes=merged
    )
    detail = (
        f"{kept} checkpoint(s) of {checkpoints.format_bytes(ckpt)} kept + 1 being written, final weights "
        f"{checkpoints.format_bytes(final)}, merged export {checkpoints.format_bytes(merged)}"
    )
    free = checkpoints.check_disk_space(run_dir, need, detail)
    log.info(
        "disk: about %s needed (%s); %s free", checkpoints.format_bytes(need), detail, checkpoints.format_bytes(free)
    )
    return need
