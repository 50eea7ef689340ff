from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import mistral_tune.launch.accelerate as launch
from mistral_tune.config.compose import compose
from mistral_tune.core.process import FAIL_RANK_ENV
from mistral_tune.core.run_lock import LOCK_NAME
from tests.helpers import read_metrics as _records

REPO = Path(__file__).resolve().parents[2]


STEPS = 3


# Dropout 0 and the same data order make the runs comparable step by step.
COMMON = [
    f"train.max_steps={STEPS}",
    "train.logging_steps=1",
    "train.warmup_steps=0",
    "data.max_samples=16",
    "adapter.lora_dropout=0",
    "export.num_samples=0",
]


PER_PROCESS_BATCH = ["train.per_device_train_batch_size=2", "train.gradient_accumulation_steps=1"]


def _run(args: list[str], tmp: Path, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if k != FAIL_RANK_ENV}
    # One intra-op thread, as torchrun gives each of its processes: the same arithmetic in every run.
    full_env.update(PYTHONPATH=str(REPO), TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1", **(env or {}))
    return subprocess.run(args, cwd=tmp, env=full_env, capture_output=True, text=True, timeout=timeout)


def _train(
    tmp: Path,
    name: str,
    overrides: list[str],
    *,
    accelerate_args: list[str] | None = None,
    env=None,
    recipe: str = "sft_lora",
):
    """One run; with ``accelerate_args`` through ``accelerate launch`` itself. Returns (process, run dir)."""
    run_dir = tmp / name
    cli = ["-m", "mistral_tune", f"recipe={recipe}", f"output_dir={run_dir}", *COMMON, *overrides]
    if accelerate_args is None:
        cmd = [sys.executable, *cli]
    else:
        accelerate = Path(sys.executable).with_name("accelerate")
        prefix = (
            [str(accelerate)] if accelerate.exists() else [sys.executable, "-m", "accelerate.commands.accelerate_cli"]
        )
        cmd = [*prefix, "launch", *accelerate_args, *cli]
    return _run(cmd, tmp, env), run_dir


def _ok(proc) -> None:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]


def _losses(run_dir: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _adapter(run_dir: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(run_dir / "adapter" / "adapter_model.safetensors")


def _relative_diff(a: dict, b: dict) -> float:
    """||a - b|| / ||a|| over all adapter tensors. A norm, not a max: Adam's first step moves each weight by
    about lr * sign(gradient), so one weight whose gradient is ~0 may differ by a visible amount between
    runs whose sums are merely reordered, while a real error (a missed gather) gives ~1."""
    import torch

    assert a.keys() == b.keys()
    x, y = (torch.cat([d[k].flatten() for k in sorted(a)]) for d in (a, b))
    return float((x - y).norm() / x.norm())


def offload_without_cpu_adam(tmp: Path) -> Path:
    """The shipped ZeRO-3 offload JSON with torch's AdamW instead of DeepSpeed's CPU Adam, whose C++ build
    takes minutes on a fresh machine: parameters and optimizer states are still offloaded and partitioned."""
    config = json.loads((launch.CONFIG_DIR / "deepspeed_zero3_offload.json").read_text())
    assert config["zero_optimization"]["offload_param"]["device"] == "cpu"
    del config["optimizer"]  # transformers then hands DeepSpeed its own torch AdamW
    config["zero_force_ds_cpu_optimizer"] = False
    path = tmp / "zero3_offload_torch_adam.json"
    path.write_text(json.dumps(config))
    return path


@pytest.fixture(scope="module")
def jobs(tmp_path_factory):
    """Runs shared by the slow tests, started lazily: each costs ~20-40 s of 2-core CPU."""
    tmp = tmp_path_factory.mktemp("launch")
    cache: dict = {}

    def get(name: str):
        if name not in cache:
            if name == "single":
                # 1 process x 2 sequences x 2 accumulation steps = 4 sequences per optimizer step
                cache[name] = _train(tmp, name, ["train.per_device_train_batch_size=2", "train.gradient_accumulation_steps=2",
                                                  "export.merged=false"])  # fmt: skip
            elif name == "ddp":  # the command users type: accelerate launch --multi_gpu --num_processes 2
                accelerate_args = ["--multi_gpu", "--num_processes", "2", "--main_process_port", "0"]
                # with gradient checkpointing, which must neither change the result nor trip DDP's gradient hooks
                overrides = [*PER_PROCESS_BATCH, "export.merged=false", "tracking=wandb", "tracking.mode=offline",
                             "train.gradient_checkpointing=true"]  # fmt: skip
                cache[name] = _train(tmp, name, overrides, accelerate_args=accelerate_args)
            else:  # deepspeed_zero2 / deepspeed_zero3 / deepspeed_zero3_offload through mistral-tune's own launcher
                extra = ["export.num_samples=1", "export.sample_max_new_tokens=4"] if name.endswith("3") else []
                if name.endswith("offload"):
                    extra = [f"launcher.deepspeed_config={offload_without_cpu_adam(tmp)}"]
                cache[name] = _train(tmp, name, [f"launcher={name}", "launcher.num_processes=2",
                                                 "launcher.main_process_port=0", *PER_PROCESS_BATCH, *extra])  # fmt: skip
        return cache[name]

    return get


# 16 pairs, 3 steps of 4 pairs; a high lr and beta so the policy moves off the reference within 3 steps.
DPO = ["train.learning_rate=5e-3", "trainer.beta=0.3", "data.holdout=0"]


@pytest.fixture(scope="module")
def dpo_jobs(tmp_path_factory):
    """Preference runs of one global batch (4 pairs): 1 process x 2 x 2 accumulation, or 2 processes x 2 x 1.

    ``single``/``ddp``/``deepspeed_zero2``/``deepspeed_zero2_again`` train dpo_lora; ``reward_single`` and
    ``reward_zero3`` train reward_lora.
    """
    tmp = tmp_path_factory.mktemp("launch_dpo")
    cache: dict = {}

    def get(name: str):
        if name not in cache:
            recipe, extra = ("reward_lora", ["data.holdout=0"]) if name.startswith("reward") else ("dpo_lora", DPO)
            launcher = {"ddp": "ddp", "reward_zero3": "deepspeed_zero3"}.get(name, "deepspeed_zero2")
            if name.endswith("single"):
                overrides = ["train.per_device_train_batch_size=2", "train.gradient_accumulation_steps=2"]
            else:
                overrides = [f"launcher={launcher}", "launcher.num_processes=2", "launcher.main_process_port=0",
                             *PER_PROCESS_BATCH]  # fmt: skip
            if name.startswith("deepspeed_zero2"):
                # reference log-probs computed once before training (on both ranks) and cached; _again reads them
                overrides += ["trainer.precompute_ref_log_probs=true", f"trainer.ref_cache_dir={tmp / 'ref_cache'}"]
            cache[name] = _train(tmp, name, [*extra, *overrides], recipe=recipe)
        return cache[name]

    return get


@pytest.mark.slow
def test_ddp_two_processes_match_one_process_with_the_same_global_batch(jobs):
    single, single_dir = jobs("single")
    ddp, ddp_dir = jobs("ddp")
    _ok(single)
    _ok(ddp)
    one, two = _losses(single_dir), _losses(ddp_dir)
    assert len(one) == len(two) == STEPS
    assert one == pytest.approx(two, abs=1e-5, rel=0)
    assert _relative_diff(_adapter(single_dir), _adapter(ddp_dir)) < 1e-5
    s1 = json.loads((single_dir / "summary.json").read_text())
    s2 = json.loads((ddp_dir / "summary.json").read_text())
    assert (s1["world_size"], s2["world_size"]) == (1, 2)
    assert s1["global_batch_size"] == s2["global_batch_size"] == 4
    assert s2["engine"] == "ddp"
    # tokens_seen is the sum over both processes: the same tokens as the 1-process run, not 2x one rank's
    assert s1["tokens_seen"] == s2["tokens_seen"] > 0
    assert s2["tokens_per_second"] == pytest.approx(s2["tokens_seen"] / s2["train_seconds"], rel=0.05)


@pytest.mark.slow
def test_only_rank_zero_writes_the_run_directory(jobs):
    ddp, run_dir = jobs("ddp")
    _ok(ddp)
    log = (run_dir / "train.log").read_text()
    assert log.count("run directory:") == 1
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    assert [p.name for p in run_dir.glob(".*")] == [LOCK_NAME], "temporary files left behind"  # the run lock stays
    assert len(list((run_dir / "wandb").glob("offline-run-*"))) == 1  # one tracker run, from rank 0
    assert ddp.stdout.count("run directory:") == 1  # the other process logs warnings and errors only


@pytest.mark.slow
@pytest.mark.parametrize("name", ["deepspeed_zero2", "deepspeed_zero3", "deepspeed_zero3_offload"])
def test_deepspeed_trains_saves_the_adapter_and_exports_a_merge(jobs, name):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    import mistral_tune.models.loading as models
    from mistral_tune.export.verify import VERIFY_PROMPTS, reference_logits
    from mistral_tune.models.sources import resolve_source
    from mistral_tune.models.tokenizer import load_tokenizer

    proc, run_dir = jobs(name)
    _ok(proc)
    _, reference_dir = jobs("ddp")
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["engine"] == name.removesuffix("_offload") and summary["launcher"] == name
    assert summary["world_size"] == 2 and summary["global_batch_size"] == 4
    offloaded = "cpu" if name.endswith("offload") else "none"  # as the running DeepSpeed engine reports it
    assert summary["offload"] == {"param": offloaded, "optimizer": offloaded}
    assert _losses(run_dir) == pytest.approx(_losses(reference_dir), abs=1e-5, rel=0)
    # ZeRO-3 holds each weight on one rank only: a save that skipped the gather would differ (or be empty).
    assert _relative_diff(_adapter(run_dir), _adapter(reference_dir)) < 1e-4
    assert summary["merged"]["verified"] and summary["merged"]["max_abs_logit_diff"] <= 1e-4
    # The merge loads with plain transformers and matches base + the DDP run's adapter.
    cfg = compose("sft_lora", [])
    tokenizer = load_tokenizer(resolve_source(cfg.model.name))
    base = models.load_model(cfg.model, resolve_source(cfg.model.name), seed=cfg.train.seed)
    expected = reference_logits(PeftModel.from_pretrained(base, reference_dir / "adapter"), tokenizer, VERIFY_PROMPTS)
    merged = AutoModelForCausalLM.from_pretrained(run_dir / "merged", dtype=torch.float32)
    assert float((reference_logits(merged, tokenizer, VERIFY_PROMPTS) - expected).abs().max()) < 1e-4
    if name.endswith("3"):  # rank 0 rebuilt the model from the gathered save and sampled from it
        assert len((run_dir / "samples.jsonl").read_text().splitlines()) == 1


@pytest.mark.slow
def test_a_failure_on_one_rank_ends_the_job_and_shows_that_error(tmp_path):
    proc, run_dir = _train(
        tmp_path,
        "fail",
        ["launcher=ddp", "launcher.num_processes=2", "launcher.main_process_port=0", *PER_PROCESS_BATCH,
         "export.merged=false"],
        env={FAIL_RANK_ENV: "1"},
    )  # fmt: skip
    assert proc.returncode != 0
    assert "error: the job stopped" in proc.stderr, proc.stderr[-5000:]
    report = proc.stderr[proc.stderr.index("error: the job stopped") :]
    first = report.splitlines()[1]
    assert first.startswith("  rank 1 ") and "failure drill: rank 1 fails on purpose at step 1" in first
    assert not (run_dir / "summary.json").exists() and not (run_dir / "adapter").exists()


@pytest.mark.slow
def test_dpo_under_ddp_matches_one_process_with_the_same_global_batch(dpo_jobs):
    (single, single_dir), (ddp, ddp_dir) = dpo_jobs("single"), dpo_jobs("ddp")
    _ok(single)
    _ok(ddp)
    one, two = _records(single_dir), _records(ddp_dir)
    assert [r["step"] for r in one] == [r["step"] for r in two] == list(range(1, STEPS + 1))
    # The same DPO loss and implicit rewards at every step: the 2 ranks' pairs are the 1 process's 2 micro-batches.
    for key in ("loss", "rewards/margins", "rewards/accuracies", "logps/chosen"):
        assert [r[key] for r in one] == pytest.approx([r[key] for r in two], abs=1e-4, rel=1e-5), key
    assert one[0]["loss"] == pytest.approx(0.6931, abs=1e-3)  # policy == reference at step 1: ln 2
    # ... and later steps see a policy that has moved off it (on new pairs, so not necessarily a lower loss)
    assert abs(two[-1]["loss"] - one[0]["loss"]) > 1e-3 and abs(two[-1]["rewards/margins"]) > 1e-3
    assert _relative_diff(_adapter(single_dir), _adapter(ddp_dir)) < 1e-5
    s1 = json.loads((single_dir / "summary.json").read_text())
    s2 = json.loads((ddp_dir / "summary.json").read_text())
    assert (s1["world_size"], s2["world_size"], s2["engine"]) == (1, 2, "ddp")
    assert s1["global_batch_size"] == s2["global_batch_size"] == 4
    assert s1["tokens_seen"] == s2["tokens_seen"] > 0  # chosen + rejected tokens of both ranks
    assert s2["merged"]["verified"]
    assert (ddp_dir / "train.log").read_text().count("run directory:") == 1  # rank 0 only


@pytest.mark.slow
def test_dpo_under_zero2_with_precomputed_reference_matches_ddp(dpo_jobs):
    proc, run_dir = dpo_jobs("deepspeed_zero2")
    _ok(proc)
    _, ddp_dir = dpo_jobs("ddp")
    summary = json.loads((run_dir / "summary.json").read_text())
    assert (summary["engine"], summary["world_size"], summary["global_batch_size"]) == ("deepspeed_zero2", 2, 4)
    # Steps 2-3 use the reference log-probs: precomputed on 2 ranks, gathered in data order and cached, they
    # must give the same losses as the DDP run's live reference forwards (a misordered gather would not).
    zero2, ddp = _records(run_dir), _records(ddp_dir)
    for key in ("loss", "rewards/margins"):
        assert [r[key] for r in zero2] == pytest.approx([r[key] for r in ddp], abs=1e-4, rel=1e-4), key
    assert _relative_diff(_adapter(run_dir), _adapter(ddp_dir)) < 1e-4
    cache = summary["ref_logps_cache"]["train"]
    assert cache["hit"] is False
    cached = json.loads(Path(cache["path"]).read_text())
    assert len(cached["ref_chosen_logps"]) == len(cached["ref_rejected_logps"]) == 16  # every pair, once
    assert len(list(Path(cache["path"]).parent.iterdir())) == 1  # written by rank 0 only, no temp files left
    assert summary["merged"]["verified"] and summary["merged"]["max_abs_logit_diff"] <= 1e-4

    # Again: rank 0 finds the cache and hands it to rank 1 (under ZeRO-3 the ranks' weight hashes differ,
    # so a per-rank lookup could split them between reading the cache and running the reference pass).
    again, again_dir = dpo_jobs("deepspeed_zero2_again")
    _ok(again)
    assert json.loads((again_dir / "summary.json").read_text())["ref_logps_cache"]["train"] == {**cache, "hit": True}
    assert [r["loss"] for r in _records(again_dir)] == pytest.approx([r["loss"] for r in zero2], abs=1e-6, rel=0)


@pytest.mark.slow
def test_reward_model_under_zero3_matches_one_process_and_exports_a_classifier(dpo_jobs):
    from transformers import AutoConfig

    (single, single_dir), (zero3, zero3_dir) = dpo_jobs("reward_single"), dpo_jobs("reward_zero3")
    _ok(single)
    _ok(zero3)
    one, three = _records(single_dir), _records(zero3_dir)
    for key in ("loss", "rewards/margins"):
        assert [r[key] for r in one] == pytest.approx([r[key] for r in three], abs=1e-4, rel=1e-4), key
    # The score head is trained in full (modules_to_save) and, like the LoRA weights, sharded under ZeRO-3:
    # the gathered save must hold both, and rank 0 rebuilds a classifier (not a causal LM) from it.
    a, b = _adapter(single_dir), _adapter(zero3_dir)
    assert any("score" in k for k in b) and _relative_diff(a, b) < 1e-4
    summary = json.loads((zero3_dir / "summary.json").read_text())
    assert (summary["engine"], summary["world_size"], summary["global_batch_size"]) == ("deepspeed_zero3", 2, 4)
    assert summary["merged"]["verified"]
    assert AutoConfig.from_pretrained(zero3_dir / "merged").architectures == ["MistralForSequenceClassification"]


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["ddp", "deepspeed_zero2"])
def test_a_resumed_two_process_run_ends_like_an_uninterrupted_one(tmp_path, launcher):
    """2 steps with a checkpoint per step, then resume=auto to step 3, against 3 steps in one go.

    A constant learning rate makes the first 2 steps the same whatever max_steps is; the resumed step 3
    must then see the same model, optimizer state and batch as the uninterrupted run's step 3.
    """
    shared = [f"launcher={launcher}", "launcher.num_processes=2", "launcher.main_process_port=0", *PER_PROCESS_BATCH,
              "train.lr_scheduler_type=constant", "export.merged=false"]  # fmt: skip
    whole, whole_dir = _train(tmp_path, "whole", shared)
    first, run_dir = _train(tmp_path, "resumed", [*shared, "train.max_steps=2", "train.save_steps=1"])
    _ok(whole)
    _ok(first)
    assert (run_dir / "checkpoints" / "checkpoint-2").is_dir()
    again, _ = _train(tmp_path, "resumed", [*shared, "resume=auto"])
    _ok(again)
    assert "checkpoint-2" in json.loads((run_dir / "summary.json").read_text())["resumed_from"]
    assert _losses(run_dir) == pytest.approx(_losses(whole_dir), abs=1e-5, rel=0)  # steps 1-2 kept, 3 resumed
    assert _relative_diff(_adapter(whole_dir), _adapter(run_dir)) < 1e-5
