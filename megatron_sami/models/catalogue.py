"""The model catalogue: one YAML file per model under ``configs/model/`` (found through
:func:`megatron_sami.resources.config_dir`, so it works from a checkout and from a wheel).

Each file is merged onto the :class:`ModelConfig` schema, so unknown keys and wrong types
fail on load, and the values are checked by the config's own validation.
"""

from __future__ import annotations

from typing import Any

from omegaconf import OmegaConf

from megatron_sami.errors import ConfigError
from megatron_sami.models.config import ModelConfig
from megatron_sami.resources import config_dir  # also imported from here by older callers
from megatron_sami.typed_config import to_typed


def model_names() -> list[str]:
    """The catalogue's model names, sorted (the file stems under ``configs/model/``)."""
    return sorted(path.stem for path in (config_dir() / "model").glob("*.yaml"))


def model_config_from_dict(values: Any) -> ModelConfig:
    """Validate a mapping (or DictConfig) against the schema and return the typed config."""
    return to_typed(ModelConfig, values, "model")


def load_model_config(name: str, **overrides: Any) -> ModelConfig:
    """The catalogue entry ``name`` (e.g. ``llama3-8b``), with optional field overrides.

    Raises:
        ConfigError: if ``name`` is not in the catalogue, or a value is of the wrong type or invalid.
    """
    path = config_dir() / "model" / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(f"unknown model '{name}'; choose one of: {', '.join(model_names())}.")
    values = OmegaConf.load(path)
    if overrides:
        values = OmegaConf.merge(values, overrides)
    return model_config_from_dict(values)
