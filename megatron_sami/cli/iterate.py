"""``sami-iterate``: SAMI expert iteration (Hydra overrides; see configs/iterate.yaml).

    sami-iterate run_dir=runs/mistral-hh base.hf=/models/Mistral-7B-v0.1 train.parallel.tensor=8
    sami-iterate --config-name recipe/mistral-7b run_dir=... base.hf=...   # a recipe (configs/recipe/)
    sami-iterate --cfg job ...                                             # print the composed config
"""

from __future__ import annotations

import json

from omegaconf import OmegaConf

from megatron_sami.cli.common import run_hydra_app
from megatron_sami.cli.schemas import register_iterate_schema
from megatron_sami.typed_config import to_typed


def iterate_config(cfg):
    """The :class:`~megatron_sami.iteration.driver.IterateConfig` of a composed sami-iterate config.

    Drops the unset keys of ``cfg.train`` in place, so that the config saved with the run and the
    sami-train command lines hold only the train settings a config or the user set.

    Raises:
        ConfigError: if a value is invalid (the message names the key).
    """
    from megatron_sami.iteration.driver import IterateConfig, set_values

    cfg.train = set_values(OmegaConf.to_container(cfg.train, resolve=True))
    return to_typed(IterateConfig, cfg, "iterate")


def _task(cfg) -> None:
    from megatron_sami.iteration.driver import run_iterations
    from megatron_sami.runtime import quiet
    from megatron_sami.runtime.distributed import setup_logging

    setup_logging(0)
    quiet.install()
    settings = iterate_config(cfg)  # first: it drops the unset train keys from the saved config
    summary = run_iterations(settings, OmegaConf.to_yaml(cfg, resolve=True))
    print(json.dumps({"run_dir": summary["run_dir"], "complete": summary["complete"]}))


def main() -> None:
    """``sami-iterate``: run or resume expert iteration (exit 2 on bad input, 75 when stopped by a signal)."""
    register_iterate_schema()
    run_hydra_app(_task, "iterate")


if __name__ == "__main__":
    main()
