"""Turn a Hydra/OmegaConf node into a validated dataclass, with errors that name the key."""

from __future__ import annotations

import dataclasses
import typing
from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from megatron_sami.errors import ConfigError


def to_typed[T](schema: type[T], values: Any, prefix: str) -> T:
    """Merge ``values`` onto ``schema`` (unknown keys and wrong types fail) and build it.

    Building the dataclass runs its ``__post_init__`` checks. ``prefix`` names the section in
    messages (``train.optimizer.lr``).

    Raises:
        ConfigError: an unknown key, a value of the wrong type, or a ``__post_init__`` refusal; the
            message names the key and the fix.
    """
    try:
        base = OmegaConf.structured(schema)
        restore_auto_defaults(schema, base)  # e.g. sequence_parallel derived from the given TP, not TP = 1
        merged = OmegaConf.merge(base, values if values is not None else {})
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        key = f"{prefix}.{err.full_key}" if getattr(err, "full_key", None) else prefix
        message = getattr(err, "msg", str(err)).splitlines()[0]
        raise ConfigError(f"invalid value for {key}: {message}; fix the config or the override.") from err


def flatten(values: dict, prefix: str = "") -> dict[str, object]:
    """Nested mappings as one level of dotted keys: ``{"a": {"b": 1}}`` -> ``{"a.b": 1}``."""
    flat: dict[str, object] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def restore_auto_defaults(schema: type, node: Any) -> None:
    """Set each field a dataclass names in ``AUTO_DEFAULTS`` back to its declared default, in the
    defaults ``node`` built from ``schema`` (a plain mapping or a DictConfig), through nested
    dataclass fields. Such a field (``ParallelConfig.sequence_parallel``: None, "on when TP > 1")
    is derived by ``__post_init__`` from the fields around it; a schema's defaults hold the value
    derived at the defaults (TP = 1), which would override the derivation at the TP a config sets.
    """
    hints = typing.get_type_hints(schema)
    for spec in dataclasses.fields(schema):
        if spec.name in getattr(schema, "AUTO_DEFAULTS", ()):
            node[spec.name] = spec.default
        elif dataclasses.is_dataclass(hints.get(spec.name)) and spec.name in node:
            restore_auto_defaults(hints[spec.name], node[spec.name])
