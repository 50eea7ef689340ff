"""TRL internals: DPOTrainer's dataset/reference-log-prob hooks, trainer metrics, the DPO loss types."""

from __future__ import annotations

import ast
import re
import sys
from functools import lru_cache
from pathlib import Path
from typing import Any


class DPOHooks:
    """DPOTrainer mixin: ``_prepare_dataset`` and ``_precompute_ref_logps`` forwarded to public-named hooks.

    Override ``prepare_dpo_dataset(dataset, processing_class, args, dataset_name)`` and
    ``precompute_reference_logps(dataset, name, batch_size)``; ``trl_prepare_dataset`` and
    ``trl_precompute_ref_logps`` are TRL's own.
    """

    def trl_prepare_dataset(self, dataset: Any, processing_class: Any, args: Any, dataset_name: str) -> Any:
        return super()._prepare_dataset(dataset, processing_class, args, dataset_name)

    def trl_precompute_ref_logps(self, dataset: Any, name: str, batch_size: int) -> Any:
        return super()._precompute_ref_logps(dataset, name, batch_size)

    def prepare_dpo_dataset(self, dataset: Any, processing_class: Any, args: Any, dataset_name: str) -> Any:
        return self.trl_prepare_dataset(dataset, processing_class, args, dataset_name)

    def precompute_reference_logps(self, dataset: Any, name: str, batch_size: int) -> Any:
        return self.trl_precompute_ref_logps(dataset, name, batch_size)

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        return self.prepare_dpo_dataset(dataset, processing_class, args, dataset_name)

    def _precompute_ref_logps(self, dataset, name, batch_size):
        return self.precompute_reference_logps(dataset, name, batch_size)


# Attribute names of TRL trainers read here (the canary tests name them from this table).
MODEL_HASH = "_precompute_model_hash"  # DPOTrainer
METRICS = "_metrics"  # DPOTrainer, RewardTrainer: {"train": defaultdict(list), "eval": ...}


def reference_model_hash(trainer: Any) -> str | None:
    """DPOTrainer's hash of the reference weights (``_precompute_model_hash``; None unless precomputing)."""
    return getattr(trainer, MODEL_HASH)


def trainer_metrics(trainer: Any, mode: str) -> dict[str, list]:
    """The per-mode lists TRL's trainers average into each log (``_metrics[mode]``), to append to or rename."""
    return getattr(trainer, METRICS)[mode]


def _loss_types_from_help(help_text: str) -> tuple[str, ...]:
    return tuple(re.findall(r"`'([a-z_]+)'`", help_text.split("Possible values are:")[1].split(". If")[0]))


def _dpo_config_help_from_source() -> str:
    """``DPOConfig.loss_type``'s help text read from TRL's source, without importing TRL (and torch)."""
    from importlib.util import find_spec

    spec = find_spec("trl")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("trl is not installed")
    source = Path(next(iter(spec.submodule_search_locations))) / "trainer" / "dpo_config.py"
    for node in ast.walk(ast.parse(source.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ClassDef) and node.name == "DPOConfig":
            for item in node.body:
                if isinstance(item, ast.AnnAssign) and getattr(item.target, "id", None) == "loss_type":
                    for kw in item.value.keywords:
                        if kw.arg == "metadata":
                            return ast.literal_eval(kw.value)["help"]
    raise LookupError(f"no DPOConfig.loss_type help in {source}")


def dpo_config_loss_help() -> str:
    """``DPOConfig.loss_type``'s help text from the imported class."""
    from trl import DPOConfig

    return DPOConfig.__dataclass_fields__["loss_type"].metadata["help"]


@lru_cache(maxsize=1)
def dpo_loss_types() -> tuple[str, ...]:
    """The loss types the installed TRL documents for ``DPOConfig.loss_type`` (TRL has no public list).

    Read from the class when TRL's DPO config is already imported, else from its source file, so
    config validation stays torch-free. The one list: validation and the trainer both use it.
    """
    if "trl.trainer.dpo_config" in sys.modules:
        return _loss_types_from_help(dpo_config_loss_help())
    try:
        return _loss_types_from_help(_dpo_config_help_from_source())
    except (OSError, LookupError, ImportError, IndexError, SyntaxError, ValueError):
        return _loss_types_from_help(dpo_config_loss_help())
