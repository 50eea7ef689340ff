"""``mistral-tune recipe=NAME ...``: compose the recipe, then print it (``--cfg``), dry-run it, launch
it on several processes, or run it here.
"""

from __future__ import annotations

from mistral_tune.config.compose import compose, split_recipe
from mistral_tune.core.errors import UserError


def cmd_train(args: list[str]) -> int:
    from omegaconf import OmegaConf

    recipe, overrides = split_recipe(args)
    show = "--cfg" in overrides  # `--cfg` or Hydra's `--cfg job`: print the config, run nothing
    if show:
        i = overrides.index("--cfg")
        # only a Hydra section name goes with it, never the next override
        del overrides[i : i + (2 if overrides[i + 1 : i + 2] in (["job"], ["hydra"], ["all"]) else 1)]
    if recipe is None:
        raise UserError(
            "No recipe given. Pass recipe=NAME, e.g. `mistral-tune recipe=sft_lora`; see `mistral-tune --help`."
        )
    cfg = compose(recipe, overrides)
    if show:
        print(OmegaConf.to_yaml(cfg, resolve=True))  # the values the run would use
        return 0
    if cfg.dry_run:
        from mistral_tune.pipeline.dry_run import dry_run

        dry_run(cfg)
        return 0
    from mistral_tune.launch.accelerate import launch, should_launch

    if should_launch(cfg):  # launcher=ddp|fsdp|deepspeed_*: start the processes, each of which runs below
        from mistral_tune.config.registry import PREFERENCE_TRAINERS
        from mistral_tune.data.preflight import check_data

        check_data(cfg.data, preference=cfg.trainer.name in PREFERENCE_TRAINERS)  # before any process starts
        return launch(cfg, recipe, overrides)
    from mistral_tune.pipeline.run import run

    run(cfg)
    return 0
