"""The named tensor transforms of the conversion tables, in both directions. Pure torch.

Every TP=1 Megatron tensor of these families is its HF tensors' rows, reordered: the fused QKV
interleaves row blocks of q, k and v per KV group, the gated fc1 stacks gate over up, and the
vocabulary tables gain zero rows. Each transform therefore declares its layout as a list of
:class:`Rows` (``to_rows``), from which both the whole tensor (``to_megatron``) and any row range
of it, read straight from the files (conversion), are made; ``to_hf`` is the exact inverse.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
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


@dataclass(frozen=True)
class Rows:
    """``count`` consecutive rows of a Megatron tensor: rows ``start``.. of the rule's HF tensor
    number ``source`` (in the table's order), or zeros when ``source`` is None."""

    source: int | None
    start: int
    count: int


def qkv_rows(shapes: Shapes, q_rows: int, k_rows: int, v_rows: int) -> list[Rows]:
    """Megatron's grouped QKV layout: per KV group [its q heads, its k head, its v head]."""
    groups, d = shapes.num_query_groups, shapes.head_dim
    q_block = shapes.num_heads // groups * d
    rows = []
    for group in range(groups):
        rows += [Rows(0, group * q_block, q_block), Rows(1, group * d, d), Rows(2, group * d, d)]
    return rows


def qkv_to_hf(shapes: Shapes, qkv: torch.Tensor) -> list[torch.Tensor]:
    """[q, k, v] of Megatron's fused [groups * (heads/group + 2) * head_dim, hidden] QKV weight."""
    groups, d = shapes.num_query_groups, shapes.head_dim
    heads_per_group = shapes.num_heads // groups
    hidden = qkv.shape[-1]
    q_G, k_G, v_G = qkv.reshape(groups, (heads_per_group + 2) * d, hidden).split(
        [heads_per_group * d, d, d], dim=1)
    return [q_G.reshape(-1, hidden), k_G.reshape(-1, hidden), v_G.reshape(-1, hidden)]


def gate_up_rows(shapes: Shapes, gate_rows: int, up_rows: int) -> list[Rows]:
    """Megatron's gated fc1 holds [gate; up] at TP=1 (its checkpoint format splits each under TP)."""
    return [Rows(0, 0, gate_rows), Rows(1, 0, up_rows)]


def gate_up_to_hf(shapes: Shapes, fc1: torch.Tensor) -> list[torch.Tensor]:
    """[gate, up]: the two halves of Megatron's gated fc1 weight."""
    gate, up = fc1.chunk(2, dim=0)
    return [gate, up]


def vocab_rows(shapes: Shapes, table_rows: int) -> list[Rows]:
    """The table's rows, then zero rows up to Megatron's padded vocabulary size."""
    padding = shapes.padded_vocab_size - table_rows
    return [Rows(0, 0, table_rows)] + ([Rows(None, 0, padding)] if padding > 0 else [])


def vocab_rows_to_hf(shapes: Shapes, table: torch.Tensor) -> list[torch.Tensor]:
    """Drop the padded rows."""
    return [table[: shapes.vocab_size]]


def copy_rows(shapes: Shapes, rows: int) -> list[Rows]:
    """The HF tensor's rows as they are."""
    return [Rows(0, 0, rows)]


def copy_to_hf(shapes: Shapes, tensor: torch.Tensor) -> list[torch.Tensor]:
    """The tensor as it is."""
    return [tensor]


RowLayout = Callable[..., list[Rows]]
TRANSFORMS: dict[str, tuple[RowLayout, Callable[[Shapes, torch.Tensor], list[torch.Tensor]]]] = {
    "copy": (copy_rows, copy_to_hf),
    "qkv": (qkv_rows, qkv_to_hf),
    "gate_up": (gate_up_rows, gate_up_to_hf),
    "vocab_rows": (vocab_rows, vocab_rows_to_hf),
}


def to_rows(transform: str, shapes: Shapes, source_shapes: Sequence[Sequence[int]]) -> list[Rows]:
    """The row layout of the Megatron tensor made from HF tensors of ``source_shapes``.

    Args:
        transform: a name of ``TRANSFORMS`` (the table's ``transform:``).
        source_shapes: the shapes of the rule's HF tensors, in the table's order.

    Raises:
        ValueError: the sources' rows differ in width, or the layout reads past a source's rows.
    """
    widths = {tuple(shape[1:]) for shape in source_shapes}
    if len(widths) != 1:
        raise ValueError(f"the tensors have rows of different shapes: {sorted(widths)}")
    rows = TRANSFORMS[transform][0](shapes, *(shape[0] for shape in source_shapes))
    for piece in rows:
        if piece.source is not None and piece.start + piece.count > source_shapes[piece.source][0]:
            raise ValueError(f"rows {piece.start}..{piece.start + piece.count} of a tensor with "
                             f"{source_shapes[piece.source][0]} rows")
    return rows


def megatron_shape(transform: str, shapes: Shapes, source_shapes: Sequence[Sequence[int]]) -> tuple[int, ...]:
    """The shape of the Megatron tensor :func:`to_megatron` makes from HF tensors of
    ``source_shapes`` (from the row layout alone: no tensor is made)."""
    rows = to_rows(transform, shapes, source_shapes)
    return (sum(piece.count for piece in rows), *source_shapes[0][1:])


def to_megatron(transform: str, shapes: Shapes, *sources: torch.Tensor) -> torch.Tensor:
    """The whole TP=1 Megatron tensor made from the rule's HF tensors (any device, meta included)."""
    rows = to_rows(transform, shapes, [tuple(source.shape) for source in sources])
    pieces = [sources[p.source][p.start:p.start + p.count] if p.source is not None
              else sources[0].new_zeros(p.count, *sources[0].shape[1:]) for p in rows]
    return torch.cat(pieces) if len(pieces) > 1 else pieces[0]


def to_hf(transform: str, shapes: Shapes, tensor: torch.Tensor) -> list[torch.Tensor]:
    """The rule's HF tensors from the whole TP=1 Megatron tensor (exact inverse of to_megatron)."""
    return TRANSFORMS[transform][1](shapes, tensor)
