"""The model catalogue: one YAML file per model under ``configs/model/``.

Each file is merged onto the :class:`ModelConfig` schema, so unknown keys and wrong types
fail on load, and the values are checked by the config's own validation.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from megatron_sami.errors import ConfigError
from megatron_sami.models.config import ModelConfig
from megatron_sami.typed_config import to_typed


def config_dir() -> Path:
    """The project's ``configs/`` directory (override with ``SAMI_CONFIG_DIR``)."""
    override = os.environ.get("SAMI_CONFIG_DIR")
    return Path(override) if override else Path(__file__).resolve().parents[2] / "configs"


def model_names() -> list[str]:
    return sorted(path.stem for path in (config_dir() / "model").glob("*.yaml"))


def model_config_from_dict(values: Any) -> ModelConfig:
    """Validate a mapping (or DictConfig) against the schema and return the typed config."""
    return to_typed(ModelConfig, values, "model")


def load_model_config(name: str, **overrides: Any) -> ModelConfig:
    """The catalogue entry ``name`` (e.g. ``llama3-8b``), with optional field overrides."""
    path = config_dir() / "model" / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(f"unknown model '{name}'; choose one of: {', '.join(model_names())}.")
    values = OmegaConf.load(path)
    if overrides:
        values = OmegaConf.merge(values, overrides)
    return model_config_from_dict(values)
