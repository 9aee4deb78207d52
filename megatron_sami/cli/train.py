"""``sami-train``: SAMI training on a converted checkpoint (Hydra overrides; see configs/train.yaml)."""

from __future__ import annotations

import os

from omegaconf import OmegaConf

from megatron_sami.cli.common import run_hydra_app
from megatron_sami.cli.schemas import register_train_schema
from megatron_sami.typed_config import to_typed


def _task(cfg) -> None:
    from megatron_sami.alignment.trainer import TrainConfig, train

    # Paths are recorded absolute, so that a resume from another directory compares the same run.
    for key in ("checkpoint", "run_dir", "data.records", "data.tokenizer"):
        value = OmegaConf.select(cfg, key)
        if isinstance(value, str) and value not in ("", "???"):
            OmegaConf.update(cfg, key, os.path.abspath(value))
    train_config = to_typed(TrainConfig, cfg, "train")
    train(train_config, OmegaConf.to_yaml(cfg, resolve=True))


def main() -> None:
    """The ``sami-train`` entry point (Hydra overrides on the command line)."""
    register_train_schema()  # the TrainConfig defaults configs/train.yaml builds on
    run_hydra_app(_task, "train", not_taken={
        "model": "sami-train takes the model from the checkpoint it starts from (its model.yaml); drop it "
                 "and pass checkpoint=DIR, a directory made by sami-convert hf-to-megatron"})


if __name__ == "__main__":
    main()
