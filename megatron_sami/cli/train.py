"""``sami-train``: SAMI training on a converted checkpoint (Hydra overrides; see configs/train.yaml)."""

from __future__ import annotations

from omegaconf import OmegaConf

from megatron_sami.cli.common import run_hydra_app
from megatron_sami.cli.schemas import register_train_schema
from megatron_sami.typed_config import to_typed


def _task(cfg) -> None:
    from megatron_sami.alignment.trainer import TrainConfig, train

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
