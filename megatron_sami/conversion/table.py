"""The declarative key map (``conversion/llama_family.yaml``) expanded for one model.

The YAML file is found through :func:`megatron_sami.resources.key_map_path`, so it loads from a
checkout and from an installed wheel alike.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import yaml

from megatron_sami.errors import ConversionError as ConversionError  # re-exported for older imports
from megatron_sami.models.config import ModelConfig
from megatron_sami.resources import key_map_path


@dataclass(frozen=True)
class Rule:
    """One Megatron parameter (global TP=1 name) and the HF tensors it is made from."""

    megatron: str
    hf: tuple[str, ...]
    transform: str


def _applies(condition: str | None, model: ModelConfig) -> bool:
    return {
        None: True,
        "dense": not model.is_moe,
        "moe": model.is_moe,
        "untied": not model.tie_word_embeddings,
    }[condition]


def load_table(path: Path | None = None) -> dict:
    """The key map as a dict (``rules``, ``ignore_hf``); ``path`` defaults to the shipped table.

    Raises:
        EnvironmentSetupError: if the install lacks the shipped table (see :mod:`megatron_sami.resources`).
    """
    with (path or key_map_path()).open() as handle:
        return yaml.safe_load(handle)


def expand_rules(model: ModelConfig, table: dict | None = None) -> list[Rule]:
    """Every rule of the table that applies to ``model``, with {L} and {E} filled in."""
    table = table or load_table()
    rules: list[Rule] = []
    for entry in table["rules"]:
        if not _applies(entry.get("when"), model):
            continue
        layers = range(model.num_layers) if "{L}" in entry["megatron"] else [None]
        experts = range(model.num_experts) if "{E}" in entry["megatron"] else [None]
        for layer in layers:
            for expert in experts:
                def fill(name: str, layer=layer, expert=expert) -> str:
                    return name.replace("{L}", str(layer)).replace("{E}", str(expert))
                rules.append(Rule(fill(entry["megatron"]), tuple(fill(h) for h in entry["hf"]),
                                  entry.get("transform", "copy")))
    return rules


def ignored_hf_keys(keys: list[str], table: dict | None = None) -> set[str]:
    """The HF keys the key map's ``ignore_hf`` patterns match (e.g. rotary caches): read, not converted."""
    table = table or load_table()
    patterns = [re.compile(pattern) for pattern in table.get("ignore_hf", [])]
    return {key for key in keys if any(p.fullmatch(key) for p in patterns)}


# Names that differ between layer specs / expert backends, mapped to the table's names.
_SPEC_ALIASES = [
    (re.compile(r"self_attention\.linear_qkv\.layer_norm_weight$"), "input_layernorm.weight"),
    (re.compile(r"mlp\.linear_fc1\.layer_norm_weight$"), "pre_mlp_layernorm.weight"),
    (re.compile(r"mlp\.experts\.linear_fc(\d)\.weight(\d+)$"), r"mlp.experts.local_experts.\2.linear_fc\1.weight"),
]
_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.")
_EXPERT = re.compile(r"\.local_experts\.(\d+)\.")


def global_name(local_name: str, layer_offset: int, expert_offset: int) -> str:
    """A rank's parameter name (local layer/expert indices, any spec) -> the table's name."""
    name = local_name
    for pattern, replacement in _SPEC_ALIASES:
        name = pattern.sub(replacement, name)
    name = _LAYER.sub(lambda m: f"decoder.layers.{int(m.group(1)) + layer_offset}.", name)
    return _EXPERT.sub(lambda m: f".local_experts.{int(m.group(1)) + expert_offset}.", name)
