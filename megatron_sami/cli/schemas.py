"""The schemas that the YAML files in ``configs/`` build on: the dataclass defaults, given to Hydra.

The dataclasses hold every default (:class:`~megatron_sami.alignment.trainer.TrainConfig`,
:class:`~megatron_sami.iteration.driver.IterateConfig`, ``CheckConfig`` and what they nest).
``configs/train.yaml``, ``iterate.yaml`` and ``check_config.yaml`` name their schema first in
their defaults list (``- train_schema``) and state only what differs; each command registers its
schema with Hydra's ConfigStore before Hydra composes. ``sami-train --cfg job`` prints the
composed result.

A schema is registered as a plain tree of the default values, not as a typed node: Hydra still
refuses an unknown key (``train.optimzer.lr=...``), and a wrong type is reported afterwards by
:func:`~megatron_sami.typed_config.to_typed` as one sentence naming the key (inside Hydra's
composition it would be a page of text and exit code 1).
"""

from __future__ import annotations

from typing import Any

from omegaconf import OmegaConf

from megatron_sami.typed_config import restore_auto_defaults


def defaults_tree(schema: type) -> dict[str, Any]:
    """The default values of the dataclass ``schema`` as nested plain mappings (``???`` where a
    value is required).

    A field a dataclass names in ``AUTO_DEFAULTS`` keeps its declared default (``None``), not the
    value its ``__post_init__`` derives from the defaults around it: ``parallel.sequence_parallel``
    is ``None`` ("on when TP > 1"), so that a command composed with ``parallel.tensor=8`` derives it
    from TP = 8, not from the schema's TP = 1.
    """
    tree = OmegaConf.to_container(OmegaConf.structured(schema))
    restore_auto_defaults(schema, tree)
    return tree


def register_schema(name: str, tree: dict[str, Any]) -> None:
    """Make ``tree`` the config ``name`` of Hydra's ConfigStore (replacing an earlier one)."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name=name, node=tree)


def register_train_schema() -> None:
    """``train_schema``: TrainConfig's defaults, under ``configs/train.yaml``."""
    from megatron_sami.alignment.trainer import TrainConfig

    register_schema("train_schema", defaults_tree(TrainConfig))


def register_iterate_schema() -> None:
    """``iterate_schema``: IterateConfig's defaults, under ``configs/iterate.yaml`` and the recipes.

    Its ``train`` section holds every sami-train key unset, so that ``train.x=...`` overrides
    work while only the keys a config or the user sets reach sami-train.
    """
    from megatron_sami.iteration.driver import IterateConfig, train_section_schema

    tree = defaults_tree(IterateConfig)
    tree["train"] = train_section_schema()
    register_schema("iterate_schema", tree)
