"""``sami-iterate``: SAMI expert iteration (Hydra overrides; see configs/iterate.yaml)."""

from __future__ import annotations

import json

from omegaconf import OmegaConf

from megatron_sami.cli.common import run_hydra_app
from megatron_sami.typed_config import to_typed


def _task(cfg) -> None:
    from megatron_sami.iteration.driver import IterateConfig, run_iterations
    from megatron_sami.runtime import quiet
    from megatron_sami.runtime.distributed import setup_logging

    setup_logging(0)
    quiet.install()
    iterate_config = to_typed(IterateConfig, cfg, "iterate")
    summary = run_iterations(iterate_config, OmegaConf.to_yaml(cfg, resolve=True))
    print(json.dumps({"run_dir": summary["run_dir"], "complete": summary["complete"]}))


def main() -> None:
    run_hydra_app(_task, "iterate")


if __name__ == "__main__":
    main()
