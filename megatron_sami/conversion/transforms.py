"""The named tensor transforms of the conversion tables, in both directions. Pure torch.

Each ``to_megatron`` takes the HF tensors of one rule (in the table's order) and returns the
TP=1 Megatron tensor; ``to_hf`` is its exact inverse.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Shapes:
    """The config values the transforms need."""

    num_heads: int
    num_query_groups: int
    head_dim: int
    vocab_size: int
    padded_vocab_size: int


def qkv_to_megatron(shapes: Shapes, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Fuse q/k/v into Megatron's grouped layout: per KV group [its q heads, k, v]."""
    groups, d = shapes.num_query_groups, shapes.head_dim
    heads_per_group = shapes.num_heads // groups
    hidden = q.shape[-1]
    q_G = q.reshape(groups, heads_per_group * d, hidden)
    k_G = k.reshape(groups, d, hidden)
    v_G = v.reshape(groups, d, hidden)
    return torch.cat([q_G, k_G, v_G], dim=1).reshape(-1, hidden)


def qkv_to_hf(shapes: Shapes, qkv: torch.Tensor) -> list[torch.Tensor]:
    groups, d = shapes.num_query_groups, shapes.head_dim
    heads_per_group = shapes.num_heads // groups
    hidden = qkv.shape[-1]
    q_G, k_G, v_G = qkv.reshape(groups, (heads_per_group + 2) * d, hidden).split(
        [heads_per_group * d, d, d], dim=1)
    return [q_G.reshape(-1, hidden), k_G.reshape(-1, hidden), v_G.reshape(-1, hidden)]


def gate_up_to_megatron(shapes: Shapes, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """Megatron's gated fc1 holds [gate; up] at TP=1 (its checkpoint format splits each under TP)."""
    return torch.cat([gate, up], dim=0)


def gate_up_to_hf(shapes: Shapes, fc1: torch.Tensor) -> list[torch.Tensor]:
    gate, up = fc1.chunk(2, dim=0)
    return [gate, up]


def vocab_rows_to_megatron(shapes: Shapes, table: torch.Tensor) -> torch.Tensor:
    """Pad the vocabulary rows with zeros up to Megatron's padded size."""
    padding = shapes.padded_vocab_size - table.shape[0]
    return torch.cat([table, table.new_zeros(padding, table.shape[1])]) if padding > 0 else table


def vocab_rows_to_hf(shapes: Shapes, table: torch.Tensor) -> list[torch.Tensor]:
    """Drop the padded rows."""
    return [table[: shapes.vocab_size]]


def copy_to_megatron(shapes: Shapes, tensor: torch.Tensor) -> torch.Tensor:
    return tensor


def copy_to_hf(shapes: Shapes, tensor: torch.Tensor) -> list[torch.Tensor]:
    return [tensor]


TRANSFORMS = {
    "copy": (copy_to_megatron, copy_to_hf),
    "qkv": (qkv_to_megatron, qkv_to_hf),
    "gate_up": (gate_up_to_megatron, gate_up_to_hf),
    "vocab_rows": (vocab_rows_to_megatron, vocab_rows_to_hf),
}
