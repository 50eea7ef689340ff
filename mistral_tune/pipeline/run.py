"""The training pipeline: config -> model + tokenizer -> adapter -> data -> trainer -> export.

Each step lives in its own module; this file only wires them in order and writes the run directory.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
import warnings
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Sequence

from omegaconf import OmegaConf

from mistral_tune.config.registry import EXPORT_FORMATS
from mistral_tune.core.errors import UserError
from mistral_tune.core.logs import log_warning, setup_logging, teardown_logging
from mistral_tune.core.process import default_output_dir
from mistral_tune.export.preset import provenance
from mistral_tune.pipeline.summary import build_summary, finish_run, peak_memory

log = logging.getLogger("mistral_tune")


def preflight(cfg: Any) -> None:
    """Cheap checks that fail in milliseconds, before minutes of model loading."""
    import mistral_tune.models.loading as models
    from mistral_tune.config.registry import PREFERENCE_TRAINERS
    from mistral_tune.config.schema import eval_fraction
    from mistral_tune.data.sources import resolve_local_path, resolve_sources
    from mistral_tune.models.presets import PRESETS

    if cfg.trainer.name in PREFERENCE_TRAINERS:
        resolve_local_path(cfg.data.path)
    else:
        resolve_sources(cfg.data)  # every source: files, directories, weights and formats checked at once
    if cfg.data.eval_split and eval_fraction(cfg.data.eval_split) is None:
        resolve_local_path(cfg.data.eval_split)
    preset = PRESETS.get(cfg.model.name)
    if preset is not None and not cfg.model.path:
        models.check_max_length(cfg.trainer.max_length, preset.config.get("max_position_embeddings"))
    if cfg.eval.tasks:  # lm-eval installed, every task known, the hub reachable for lm-eval's own tasks
        from mistral_tune.evaluation.harness import check_installed
        from mistral_tune.evaluation.tasks import resolve_tasks

        check_installed()
        resolve_tasks(list(cfg.eval.tasks))


def shared_directories(cfg: Any, run_dir: Path) -> dict[str, Path]:
    """The directories every machine of a job must see as one: the run directory, and the DPO
    reference cache when it is used (rank 0 writes it, every process reads it)."""
    dirs = {"output_dir": run_dir}
    if cfg.trainer.get("precompute_ref_log_probs"):
        from mistral_tune.train.dpo import default_cache_dir

        given = cfg.trainer.get("ref_cache_dir")
        dirs["trainer.ref_cache_dir"] = Path(given).expanduser() if given else default_cache_dir()
    return dirs


def run(cfg: Any, callbacks: Sequence[Any] = ()) -> dict[str, Any]:
    """Train and export as ``cfg`` says; returns the run summary (also written to summary.json).

    ``callbacks`` are extra ``transformers.TrainerCallback`` objects for Python API users. Raises
    ``guards.TrainingInterrupted`` after saving a checkpoint on SIGTERM/SIGINT, and
    ``guards.NonFiniteLoss`` on a NaN/inf loss with ``on_nan=stop``.
    """
    from mistral_tune.core.files import check_writable
    from mistral_tune.core.process import is_main_process, shared_run_dir
    from mistral_tune.core.run_lock import RunLock
    from mistral_tune.train.resume import check_resume_target

    # In a multi-process launch only rank 0 writes; the others train and help save (distributed.py).
    main_process = is_main_process()
    if cfg.output_dir is not None and not str(cfg.output_dir).strip():
        cfg.output_dir = None  # `output_dir=` (empty) means "not given", never the current directory
    output_dir_given = cfg.output_dir is not None
    check_resume_target(cfg.resume, output_dir_given)  # before a new timestamped directory is created
    run_dir = shared_run_dir(cfg.output_dir, lambda when: default_output_dir(cfg.recipe, when))
    lock = None
    if main_process:
        check_run_dir(run_dir, cfg)
        check_writable(run_dir)
        lock = RunLock(run_dir).acquire()  # one run per directory, released however this process ends
    try:
        return run_locked(cfg, callbacks, run_dir, output_dir_given, main_process)
    finally:
        if lock is not None:
            lock.release()


# What a run writes at the top of its directory (besides adapter/, merged/, preset/ and checkpoints/).
RUN_FILES = ("summary.json", "metrics.jsonl", "metrics.png", "resolved_config.yaml", "samples.jsonl", "train.log")


def check_run_dir(run_dir: Path, cfg: Any) -> None:
    """Before anything is written: the directories this run will replace must be ones mistral-tune wrote."""
    from mistral_tune.core.files import check_replaceable
    from mistral_tune.core.run_lock import LOCK_NAME

    if not run_dir.is_dir():
        return
    if not (run_dir / LOCK_NAME).exists() and not (run_dir / "resolved_config.yaml").is_file():  # not a run dir
        clash = sorted(name for name in RUN_FILES if (run_dir / name).exists())
        if clash:
            raise UserError(
                f"output_dir={run_dir} is not a mistral-tune run directory, but it holds {', '.join(clash)}, which "
                "a run would overwrite. Nothing was changed. Choose a new or empty output_dir."
            )
    outputs = ["adapter"] if cfg.adapter.name != "none" else []
    outputs += [name for name in ("merged", "preset") if getattr(cfg.export, name)]
    for name in outputs:
        check_replaceable(run_dir / name, f" (this run writes {name}/ there)")
    for name in ("summary.json", "metrics.jsonl", "resolved_config.yaml", "samples.jsonl"):
        path = run_dir / name
        if path.exists() and not path.is_file():
            raise UserError(
                f"{path} is in the way: this run writes a file there. Move it, or choose another output_dir."
            )


def run_locked(cfg: Any, callbacks: Sequence[Any], run_dir: Path, output_dir_given: bool, main_process: bool):
    import mistral_tune.launch.engine as distributed
    import mistral_tune.launch.machines as machines
    from mistral_tune.config.registry import PREFERENCE_TRAINERS
    from mistral_tune.data.preflight import check_data

    # Several machines: each says where it runs, and all must see rank 0's run directory (before any loading).
    machines.register(cfg.train.ddp_timeout)
    machines.check_shared_directories(shared_directories(cfg, run_dir), cfg.train.ddp_timeout)
    preflight(cfg)
    cfg.output_dir = str(run_dir)
    setup_logging(run_dir, main_process)
    # The run's first step: every row is read and checked before torch is imported and anything is downloaded,
    # loaded or built, so a bad file fails in about a second.
    try:
        check_data(cfg.data, preference=cfg.trainer.name in PREFERENCE_TRAINERS)
    except BaseException:
        teardown_logging()
        raise
    distributed.prepare_process(cfg)
    distributed.start_cpu_process_group(cfg)
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    if not sys.stderr.isatty():  # a log file or CI: the progress lines say enough, no tqdm bars
        hf_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.showwarning = log_warning
            warnings.filterwarnings("ignore", message=".*pin_memory.*")  # CPU-only machines: harmless
            # TRL and PEFT read the renamed model property; nothing a user can change
            warnings.filterwarnings(
                "ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning
            )
            return train_and_export(cfg, run_dir, output_dir_given, callbacks, main_process)
    finally:
        if bars:
            hf_logging.enable_progress_bar()
        teardown_logging()


def train_and_export(
    cfg: Any, run_dir: Path, output_dir_given: bool, callbacks: Sequence[Any], main_process: bool
) -> dict[str, Any]:
    import mistral_tune.launch.engine as distributed
    import mistral_tune.launch.machines as machines
    from mistral_tune.core.files import save_json
    from mistral_tune.core.process import world_size
    from mistral_tune.core.redaction import redact, redact_config
    from mistral_tune.train.resume import resolve_resume

    resume_from = resolve_resume(cfg.resume, run_dir, output_dir_given)
    config = redact_config(cfg)  # what the run directory and the tracker get to see
    config_yaml = OmegaConf.to_yaml(config)
    if main_process and resume_from is None:  # a resume writes it once the checkpoint accepted the config
        (run_dir / "resolved_config.yaml").write_text(config_yaml, encoding="utf-8")
    log.info("run directory: %s", run_dir)
    if cfg.train.eval_steps and not cfg.data.eval_split:
        log.warning(
            "train.eval_steps=%d is set but data.eval_split is not: no evaluation will run", cfg.train.eval_steps
        )
    started = time.time()

    import mistral_tune.models.loading as models
    from mistral_tune.models.sources import download_source, resolve_source
    from mistral_tune.models.tokenizer import load_tokenizer

    # Before the heavy imports, so an offline machine gets its answer in about a second.
    source = download_source(resolve_source(cfg.model.name, cfg.model.path), cfg.model)
    models.check_custom_code(source.local_dir, cfg.model.trust_remote_code)

    import torch
    from transformers import set_seed

    import mistral_tune.adapters.build as adapters
    from mistral_tune.adapters.quantization import check_optimizer, match_adapter_dtype, quantization_config
    from mistral_tune.export.model_card import write_model_card
    from mistral_tune.pipeline.summary import stopped_summary
    from mistral_tune.tracking.metrics import MetricsJsonl
    from mistral_tune.tracking.progress import ProgressReporter, use_progress_reporter
    from mistral_tune.tracking.trackers import start_tracking
    from mistral_tune.train import resume
    from mistral_tune.train.base import get_trainer
    from mistral_tune.train.nonfinite import NonFiniteLoss
    from mistral_tune.train.signals import GracefulStop, TrainingInterrupted, train_guarded

    method = get_trainer(cfg.trainer.name)  # trainers/sft.py, dpo.py, reward.py: one interface
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # what DeepSpeed picks here anyway, minus its warning
    if cfg.model.attn_implementation == "flex_attention" and not torch.cuda.is_available():
        from mistral_tune.core.errors import UserError

        raise UserError(
            "model.attn_implementation=flex_attention cannot train without a CUDA GPU: torch compiles it for "
            "inference only on CPU (no backward). Use model.attn_implementation=sdpa here (also sliding-window "
            "correct); flex_attention stays available for generate/chat."
        )
    set_seed(cfg.train.seed)
    check_optimizer(cfg.train.optim)
    tokenizer = load_tokenizer(source)
    prepared = method.prepare_data(cfg, tokenizer)  # tokenized before the model exists: data errors come first
    train_ds, report = prepared.train, prepared.report
    compute_dtype = models.resolve_dtype(cfg.model.dtype)
    quant = distributed.quantization_for_engine(quantization_config(cfg.adapter, compute_dtype))
    model = models.load_model(cfg.model, source, seed=cfg.train.seed, quantization_config=quant, task=method.TASK_TYPE)
    models.check_max_length(cfg.trainer.max_length, model.config.max_position_embeddings)
    # Only used when adapter.init_lora_weights rewrites the base (PiSSA/OLoRA). PEFT names the initial adapter after the
    # directory's basename when converting, and a module name cannot contain "." (".adapter-init" failed).
    init_dir = run_dir / ".adapter-init" / "initial"
    model = adapters.apply_adapter(
        model,
        cfg.adapter,
        gradient_checkpointing=cfg.train.gradient_checkpointing,
        init_dir=init_dir,
        task_type=method.TASK_TYPE,
    )
    trainable, total = adapters.count_parameters(model)
    log.info("parameters: %s trainable of %s (%.3f%%)", f"{trainable:,}", f"{total:,}", 100 * trainable / total)

    steps = resume.planned_steps(cfg.train, len(train_ds), world_size())
    resume.check_disk_for_run(
        cfg, run_dir, trainable=trainable, total=total, param_bytes=compute_dtype.itemsize, steps=steps
    )
    metrics = MetricsJsonl(run_dir / "metrics.jsonl")
    stop = GracefulStop()
    tracking = start_tracking(cfg.tracking, run_dir, config, config_yaml) if main_process else None
    extra = [*tracking.callbacks] if tracking else []
    try:
        trainer = method.build_trainer(
            cfg,
            model,
            tokenizer,
            prepared,
            run_dir,
            [*extra, metrics, stop, *distributed.fault_drill_callbacks(), *callbacks],
        )
        use_progress_reporter(trainer, ProgressReporter(metrics))
        if quant is not None:
            match_adapter_dtype(trainer.model, quant.bnb_4bit_compute_dtype)
        trainer.data_fingerprint = resume.dataset_fingerprint(train_ds)
        finished = False
        if resume_from is not None:
            saved = resume.check_compatible(
                resume_from,
                trainer.data_fingerprint,
                resume.batch_geometry(trainer.args),
                adapter=adapters.adapter_shapes(trainer.model) if cfg.adapter.name != "none" else None,
                optimizer=resume.optimizer_settings(trainer.args),
            )
            trainer.nan_skipped_steps.extend(saved.get("nan_skipped_steps", []))
            if trainer.mixture_seen is not None and saved.get("mixture_seen"):
                trainer.mixture_seen = [list(pair) for pair in saved["mixture_seen"]]
            if main_process:  # accepted: now the run directory may change
                (run_dir / "resolved_config.yaml").write_text(config_yaml, encoding="utf-8")
                # drop records past the checkpoint: the resumed run logs those steps again
                metrics.records.extend(resume.trim_metrics(metrics.path, trainer_step(resume_from)))
            finished = saved["step"] >= steps
            log.info(
                "resuming from %s (step %d)%s",
                resume_from,
                saved["step"],
                f": training had finished (train.max_steps={steps}); redoing the outputs only" if finished else "",
            )
        if main_process:
            log.info("topology: %s", machines.topology(trainer.args.per_device_train_batch_size,
                                                        trainer.args.gradient_accumulation_steps))  # fmt: skip
        try:
            # A finished run trains no further step (Trainer would take one past max_steps); it only loads the weights.
            result = (
                resume.restore_finished(trainer, resume_from) if finished else train_guarded(trainer, stop, resume_from)
            )
        except (NonFiniteLoss, TrainingInterrupted) as exc:
            if trainer.mixture_seen is not None:
                report.record_seen(trainer.mixture_seen)
            if main_process:
                summary = stopped_summary(cfg, trainer, exc, report.as_dict(), resume_from, time.time() - started)
                save_json(run_dir / "summary.json", redact(summary))
            raise
        except Exception as exc:
            if world_size() == 1 or not machines.is_collective_failure(exc):
                raise
            named = machines.name_lost_ranks(exc, trainer.state.global_step, cfg.train.ddp_timeout)
            if named is exc:
                raise
            raise named from exc
        per_machine = machines.machine_throughput(  # over each rank's train_runtime, as summary.json's total
            trainer.local_tokens_seen, result.metrics.get("train_runtime", 0.0), cfg.train.ddp_timeout
        )
        extras = method.finish(trainer, prepared)
        try:
            outputs = save_outputs(
                cfg, run_dir, trainer, tokenizer, prepared, source, quant, main_process, init_dir, method
            )
        except Exception as exc:
            raise_if_disk_full(exc, run_dir, "Writing the final outputs (adapter/, samples.jsonl, merged/)")
            raise
        if not main_process:
            return {}
        if trainer.mixture_seen is not None:  # per source: examples, tokens and epochs trained
            report.record_seen(trainer.mixture_seen)
        summary = build_summary(cfg, run_dir, result, trainer, metrics.records, report, started, resume_from)
        summary.update(outputs)
        summary.update(extras)
        summary["data_format"] = prepared.format  # generate/chat read it: chat data means a chat model
        summary["parameters"] = {"trainable": trainable, "total": total}
        summary["machines"] = per_machine  # each machine's tokens and tokens/s, this session's training only
        summary["peak_memory_bytes"], summary["peak_memory_kind"] = peak_memory(torch)
        summary["tracking"] = tracking.info
        if outputs["adapter"]:
            write_model_card(Path(outputs["adapter"]), cfg, redact(summary))
        finish_run(run_dir, summary)
        if cfg.eval.tasks:  # lm-evaluation-harness on what the run wrote (adds "eval" to summary.json)
            from mistral_tune.evaluation.harness import evaluate

            summary["eval"] = evaluate(
                str(run_dir), list(cfg.eval.tasks), limit=cfg.eval.limit, batch_size=cfg.eval.batch_size
            )
        tracking.log_summary(redact(summary))
    except BaseException:
        if tracking:
            tracking.finish(failed=True)
        raise
    tracking.finish()
    return summary


def save_outputs(
    cfg: Any,
    run_dir: Path,
    trainer: Any,
    tokenizer: Any,
    prepared: Any,
    source: Any,
    quant: Any,
    main_process: bool,
    init_dir: Path,
    method: Any,
) -> dict[str, Any]:
    """adapter/, samples.jsonl, merged/ and preset/; returns where they are and each export's check.

    Rank 0 only writes; the other ranks return {} after taking part in the save.
    """
    import shutil

    import mistral_tune.adapters.build as adapters
    import mistral_tune.launch.engine as distributed
    from mistral_tune.core.files import atomic_directory
    from mistral_tune.core.redaction import redact
    from mistral_tune.export.model_card import base_label
    from mistral_tune.export.pipeline import export_trained

    # Every process takes part in saving (ZeRO-3 and FSDP gather the shards); rank 0 writes, then goes on alone.
    model = trainer.model
    adapter_dir = run_dir / "adapter" if cfg.adapter.name != "none" else None
    sharded = distributed.params_sharded(trainer)
    if sharded:
        saved_dir = adapter_dir or run_dir / "checkpoints" / "final"
        with atomic_directory(saved_dir) if main_process else nullcontext(saved_dir) as target:
            distributed.save_trained(trainer, target)
    if not main_process:
        return {}
    if sharded:  # rank 0 holds only a shard: rebuild the model from the save
        model = distributed.load_trained(
            cfg, source, quant, saved_dir, pad_token_id=tokenizer.pad_id, task=method.TASK_TYPE
        )
    base = {"name": cfg.model.name, "path": cfg.model.path, "seed": cfg.train.seed, "label": base_label(cfg.model),
            "load_weights": cfg.model.load_weights}  # fmt: skip
    if adapter_dir is not None:
        with atomic_directory(adapter_dir) as tmp:  # never a half-written adapter/
            adapters.save_adapter(model, tmp, base=base, kind=cfg.adapter.name, init_dir=init_dir)
        shutil.rmtree(init_dir.parent, ignore_errors=True)

    samples = method.samples(model, tokenizer, prepared, cfg)  # the trainer module's samples.jsonl records
    if samples:
        with (run_dir / "samples.jsonl").open("w", encoding="utf-8") as f:
            f.writelines(json.dumps(s, ensure_ascii=False) + "\n" for s in samples)

    exported: dict[str, Any] = {}
    outs = {f: run_dir / f for f in EXPORT_FORMATS if getattr(cfg.export, f)}
    if outs:
        # The same pipeline as `mistral-tune export run_dir=...`: streamed from the base's files and adapter/.
        exported = export_trained(
            model,
            tokenizer,
            outs,
            adapter_dir=adapter_dir,
            base=base,
            source=source,
            verify=cfg.export.verify,
            dtype_name=cfg.export.dtype,
            max_shard_size=cfg.export.max_shard_size,
            tolerance=cfg.export.tolerance,
            base_preset=cfg.model.name,
            provenance=redact({**provenance(cfg), "trainer": cfg.trainer.name, "data_format": prepared.format}),
            gguf_types=list(cfg.export.gguf_types),
            gguf_tolerance=cfg.export.gguf_tolerance,
            gguf_name=run_dir.name,
        )
    return {
        "adapter": str(adapter_dir) if adapter_dir else None,
        "merged": exported.get("merged"),
        "preset": exported.get("preset"),
        **({"gguf": exported["gguf"]} if "gguf" in exported else {}),
    }


def trainer_step(checkpoint: Any) -> int:
    """The global step a checkpoint was saved at; 0 when starting fresh."""
    from mistral_tune.train.checkpoints import checkpoint_step

    return (checkpoint_step(checkpoint) or 0) if checkpoint else 0


def raise_if_disk_full(exc: BaseException, run_dir: Path, what: str) -> None:
    """Turn a full disk, whichever library noticed it, into the documented message naming the last checkpoint."""
    from mistral_tune.train.checkpoints import CHECKPOINTS_DIR, is_disk_full, latest_complete

    if not is_disk_full(exc):
        return
    latest = latest_complete(run_dir / CHECKPOINTS_DIR)
    raise UserError(
        f"{what} failed: the disk is full ({type(exc).__name__}: {exc}). Nothing incomplete was renamed into place. "
        f"The last complete checkpoint is {latest or 'none'}. Free disk space, then run the same command with "
        "resume=auto: it redoes the missing outputs without training again."
    ) from exc
