"""Canaries for the TRL internals in mistral_tune/compat/trl.py, on a real tiny DPOTrainer.

Each fails naming trl, its installed version and the symbol when an upgrade changes it.
"""

from __future__ import annotations

import inspect
import re

import pytest

from mistral_tune.compat import broken
from mistral_tune.compat import trl as compat

# DPOTrainer's private hooks our DPOHooks mixin forwards, with the parameters it passes.
PREPARE, PRECOMPUTE = "_prepare" + "_dataset", "_precompute" + "_ref_logps"
DPO_HOOKS = {
    PREPARE: ["self", "dataset", "processing_class", "args", "dataset_name"],
    PRECOMPUTE: ["self", "dataset", "name", "batch_size"],
}


@pytest.mark.parametrize("name", sorted(DPO_HOOKS))
def test_dpo_trainer_hooks_keep_their_parameters(name):
    from trl import DPOTrainer

    method = getattr(DPOTrainer, name, None)
    assert method is not None, broken("trl", f"DPOTrainer.{name}", "is gone")
    found = list(inspect.signature(method).parameters)
    assert found == DPO_HOOKS[name], broken("trl", f"DPOTrainer.{name}", f"takes {found}, not {DPO_HOOKS[name]}")


@pytest.fixture(scope="module")
def probe_trainer(tmp_path_factory):
    """A real DPOTrainer (tiny Mistral, precomputed reference log-probs) recording the hooks it calls."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    import mistral_tune.models.loading as models
    from mistral_tune.config.compose import compose
    from mistral_tune.models.sources import resolve_source
    from mistral_tune.models.tokenizer import load_tokenizer

    calls: list[tuple[str, str, list[str]]] = []

    class Probe(compat.DPOHooks, DPOTrainer):
        def prepare_dpo_dataset(self, dataset, processing_class, args, dataset_name):
            out = super().prepare_dpo_dataset(dataset, processing_class, args, dataset_name)
            calls.append(("prepare_dataset", dataset_name, list(out.column_names)))
            return out

        def precompute_reference_logps(self, dataset, name, batch_size):
            out = super().precompute_reference_logps(dataset, name, batch_size)
            calls.append(("precompute_ref_logps", name, list(out.column_names)))
            return out

    cfg = compose("dpo_full", [])
    source = resolve_source(cfg.model.name)
    model = models.load_model(cfg.model, source, seed=0)
    tokenizer = load_tokenizer(source).to_hf()
    data = Dataset.from_dict(
        {"prompt": ["one two", "three four"], "chosen": [" five", " six"], "rejected": [" seven", " eight"]}
    )
    args = DPOConfig(
        output_dir=str(tmp_path_factory.mktemp("dpo")), report_to=[], use_cpu=True, per_device_train_batch_size=2,
        precompute_ref_log_probs=True, max_length=32, disable_tqdm=True,
    )  # fmt: skip
    trainer = Probe(model=model, ref_model=None, args=args, train_dataset=data, processing_class=tokenizer)
    return trainer, calls


def test_dpo_trainer_calls_our_hooks_with_the_columns_we_assume(probe_trainer):
    from mistral_tune.train.dpo import REF_COLUMNS, TOKENIZED_COLUMNS

    trainer, calls = probe_trainer
    if not any(c[0] == "precompute_ref_logps" for c in calls):
        trainer.get_train_dataloader()  # where some TRL versions precompute
    by_hook = {hook: columns for hook, name, columns in calls if name == "train"}
    assert "prepare_dataset" in by_hook, broken("trl", f"DPOTrainer.{PREPARE}", "was not called for 'train'")
    assert set(TOKENIZED_COLUMNS) <= set(by_hook["prepare_dataset"]), broken(
        "trl", f"DPOTrainer.{PREPARE}", f"returns columns {by_hook['prepare_dataset']}, not {TOKENIZED_COLUMNS}"
    )
    assert "precompute_ref_logps" in by_hook, broken("trl", f"DPOTrainer.{PRECOMPUTE}", "was not called")
    assert set(REF_COLUMNS) <= set(by_hook["precompute_ref_logps"]), broken(
        "trl", f"DPOTrainer.{PRECOMPUTE}", f"returns columns {by_hook['precompute_ref_logps']}"
    )


def test_reference_model_hash_is_a_string_that_follows_the_weights(probe_trainer):
    trainer, _ = probe_trainer
    value = compat.reference_model_hash(trainer)
    assert isinstance(value, str) and value, broken(
        "trl", f"DPOTrainer.{compat.MODEL_HASH}", f"is {value!r} with precompute_ref_log_probs=True"
    )


def test_trainer_metrics_are_averaged_into_the_next_log(probe_trainer):
    from transformers import TrainerCallback

    trainer, _ = probe_trainer
    logged: list[dict] = []

    class Catch(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            logged.append(dict(logs or {}))

    trainer.add_callback(Catch())
    trainer.model.train()
    metrics = compat.trainer_metrics(trainer, "train")
    metrics["compat/probe"].append(1.0)
    metrics["compat/probe"].append(3.0)
    trainer.log({"loss": 0.5})
    assert logged and logged[-1].get("compat/probe") == pytest.approx(2.0), broken(
        "trl", f"DPOTrainer.{compat.METRICS}[mode]", f"values are not averaged into log(): {logged}"
    )
    assert (
        "compat/probe" not in compat.trainer_metrics(trainer, "train")
        or not compat.trainer_metrics(trainer, "train")["compat/probe"]
    ), broken("trl", f"DPOTrainer.{compat.METRICS}", "is not cleared after log()")


def test_reward_trainer_keeps_per_mode_metrics():
    from trl import RewardTrainer

    source = inspect.getsource(RewardTrainer.__init__)
    assert re.search(re.escape(f"self.{compat.METRICS}") + r"\s*=\s*\{\s*\"train\"", source), broken(
        "trl", f"RewardTrainer.{compat.METRICS}", "is no longer a {'train': ..., 'eval': ...} dict"
    )


def test_dpo_loss_types_are_the_ones_trl_documents_and_implements():
    from trl import DPOConfig, DPOTrainer

    from_source = compat._loss_types_from_help(compat._dpo_config_help_from_source())
    from_class = compat._loss_types_from_help(compat.dpo_config_loss_help())
    assert from_source == from_class and len(from_class) >= 5, broken(
        "trl", "DPOConfig.loss_type help", f"lists {from_class} (its source file reads {from_source})"
    )
    assert compat.dpo_loss_types() == from_class
    implemented = set(re.findall(r'loss_type == "([a-z_]+)"', inspect.getsource(DPOTrainer)))
    missing = sorted(set(from_class) - implemented)
    assert not missing, broken("trl", "DPOTrainer loss branches", f"lack {missing} that DPOConfig documents")
    config = DPOConfig(output_dir="/tmp/x", use_cpu=True, bf16=False, loss_type=list(from_class[:2]))
    assert config.loss_type == list(from_class[:2])


def test_dpo_trainer_installs_the_fused_lm_head_we_route(probe_trainer):
    """DPOTrainer binds TRL's ``_fused_forward`` as the policy's forward, asking for the outputs we compute."""
    from trl.trainer.utils import FusedCausalLMOutput

    trainer, _ = probe_trainer  # a stock DPOTrainer (only the dataset hooks are ours)
    assert compat.has_trl_fused_lm_head(trainer.model), broken(
        "trl", "trl.trainer.utils.add_fused_lm_head", f"no longer binds {compat.FUSED_FORWARD} as model.forward"
    )
    function = trainer.model.forward.__func__
    cells = dict(zip(function.__code__.co_freevars, (c.cell_contents for c in function.__closure__ or ())))
    asked = set(cells.get("outputs", ())) - {"log_probs"}
    assert asked == set(compat.dpo_fused_outputs(trainer.args)), broken(
        "trl", "DPOTrainer.__init__ add_fused_lm_head(outputs=...)", f"asks for {sorted(asked)}"
    )
    fields = set(FusedCausalLMOutput.__dataclass_fields__)
    assert {*compat.FUSED_FIELDS, "loss", "label_mask"} <= fields, broken(
        "trl", "FusedCausalLMOutput", f"has fields {sorted(fields)}"
    )
    params = inspect.signature(function).parameters
    assert {"fused_lm_head", "labels", "shift_labels", "num_items_in_batch"} <= set(params) or any(
        p.kind is p.VAR_KEYWORD for p in params.values()
    ), broken("trl", compat.FUSED_FORWARD, f"takes {list(params)}")
