"""The parallel layout (TP/PP/EP/CP, DP derived) and its validation against world and model.

Pure Python: validating a layout needs neither torch nor a GPU, so a Slurm dry run or a
config check can refuse a bad layout before any accelerator time is spent.

The model is read through :class:`ModelShape`, the few sizes a layout must divide, so this
floor of the package does not import ``models/`` (which sits above it);
``models.config.ModelConfig`` satisfies the protocol as it is.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Protocol

from megatron_sami.errors import LayoutError


class ModelShape(Protocol):
    """The sizes of a model that a parallel layout must divide (``ModelConfig`` has them all)."""

    @property
    def name(self) -> str: ...

    @property
    def num_layers(self) -> int: ...

    @property
    def num_attention_heads(self) -> int: ...

    @property
    def num_query_groups(self) -> int:
        """KV heads (grouped-query attention)."""

    @property
    def num_experts(self) -> int | None:
        """Experts per MoE layer; None for a dense model."""

    @property
    def is_moe(self) -> bool: ...

    def padded_vocab_size(self) -> int:
        """The embedding's row count: the vocabulary padded for divisibility."""


@dataclass
class ParallelConfig:
    """Model-parallel sizes; the data-parallel size is what the world size leaves over.

    ``sequence_parallel`` (Korthikanti et al. 2022, arXiv:2205.05198) splits the norms', residual
    stream's and dropout's activations along the sequence over the TP ranks instead of holding
    them whole on each, the same math for 1/TP of that memory. It is on by default wherever
    TP > 1 (``None`` becomes ``tensor > 1``): both layer specs support it, the SAMI step still
    computes logits at the scored positions only, and the trainer and the scorer pad sequences
    to a multiple of TP. Set it to false to turn it off (dense models only: megatron-core trains
    MoE under TP only with it).
    """

    # Composed configs keep the declared None of these (cli/schemas.py), resolved here per command.
    AUTO_DEFAULTS: ClassVar[tuple[str, ...]] = ("sequence_parallel",)

    tensor: int = 1
    pipeline: int = 1
    expert: int = 1
    context: int = 1
    sequence_parallel: bool | None = None  # None: on when tensor > 1

    def __post_init__(self) -> None:
        for name in ("tensor", "pipeline", "expert", "context"):
            if getattr(self, name) < 1:
                raise LayoutError(f"parallel.{name} must be >= 1, got {getattr(self, name)}.")
        if self.sequence_parallel is None:
            self.sequence_parallel = self.tensor > 1
        if self.sequence_parallel and self.tensor == 1:
            raise LayoutError("parallel.sequence_parallel needs parallel.tensor > 1; set it to false or raise TP.")

    @property
    def model_parallel_size(self) -> int:
        """TP x PP x CP: the ranks that hold one copy of the model."""
        return self.tensor * self.pipeline * self.context

    def data_parallel_size(self, world_size: int) -> int:
        """DP size for this world, or a LayoutError naming the fix."""
        if world_size % self.model_parallel_size != 0:
            raise LayoutError(
                f"world size {world_size} is not divisible by TP x PP x CP = {self.tensor} x {self.pipeline} x "
                f"{self.context} = {self.model_parallel_size}; use a multiple of {self.model_parallel_size} "
                "processes or change the layout."
            )
        expert_block = self.expert * self.tensor * self.pipeline
        if world_size % expert_block != 0:
            raise LayoutError(
                f"world size {world_size} is not divisible by EP x TP x PP = {expert_block}; "
                "choose parallel.expert so that it divides the data-parallel x context-parallel size."
            )
        return world_size // self.model_parallel_size

    def validate(self, model: ModelShape, world_size: int, seq_length: int | None = None,
                 training: bool = True) -> int:
        """Check the layout against the model (and sequence length); returns the DP size.

        ``model`` is anything shaped like :class:`ModelShape`, normally a ``ModelConfig``.
        ``training=False`` (conversion, scoring) drops megatron-core's training-only rule that
        MoE under TP needs sequence parallelism.

        Raises:
            LayoutError: TP does not divide the heads, KV heads or padded vocabulary; PP does
                not divide the layers; EP on a dense model or not dividing the experts; MoE
                training under TP without sequence parallelism; a sequence length that SP or CP
                cannot split; or a world size the layout does not divide. The message names the fix.
        """
        tp, pp, ep = self.tensor, self.pipeline, self.expert
        if world_size < 1:
            raise LayoutError(f"world_size={world_size}: a job needs at least one rank (one per GPU); set world_size "
                              f"to nodes x GPUs per node.")
        if model.num_attention_heads % tp != 0:
            raise LayoutError(
                f"parallel.tensor={tp} does not divide {model.name}'s {model.num_attention_heads} attention heads; "
                f"use one of {_divisors_hint(model)}."
            )
        groups = model.num_query_groups
        if groups % tp != 0 and tp % groups != 0:
            raise LayoutError(
                f"parallel.tensor={tp} neither divides nor is a multiple of {model.name}'s {groups} KV heads "
                f"(num_query_groups); use one of {_divisors_hint(model)}."
            )
        if model.padded_vocab_size() % tp != 0:
            raise LayoutError(
                f"parallel.tensor={tp} does not divide {model.name}'s padded vocabulary ({model.padded_vocab_size()}); "
                "set model.make_vocab_size_divisible_by to a multiple of the TP size."
            )
        if model.num_layers % pp != 0:
            raise LayoutError(
                f"parallel.pipeline={pp} does not divide {model.name}'s {model.num_layers} layers; "
                f"use a divisor of {model.num_layers}."
            )
        if ep > 1 and not model.is_moe:
            raise LayoutError(f"parallel.expert={ep} needs an MoE model, but {model.name} is dense; set parallel.expert=1.")
        if model.is_moe and model.num_experts % ep != 0:
            raise LayoutError(
                f"parallel.expert={ep} does not divide {model.name}'s {model.num_experts} experts; "
                f"use a divisor of {model.num_experts}."
            )
        if training and model.is_moe and tp > 1 and not self.sequence_parallel:
            raise LayoutError(
                f"{model.name} is an MoE model: with parallel.tensor={tp} megatron-core needs sequence "
                "parallelism; set parallel.sequence_parallel=true."
            )
        if seq_length is not None:
            self._check_sequence_length(seq_length)
        return self.data_parallel_size(world_size)

    def _check_sequence_length(self, seq_length: int) -> None:
        """Sequence parallelism splits the sequence over TP ranks, context parallelism in 2 x CP chunks."""
        if self.sequence_parallel and seq_length % self.tensor != 0:
            raise LayoutError(
                f"sequence length {seq_length} must be divisible by TP={self.tensor} with sequence parallelism; "
                "set data.seq_length to a multiple of TP (or parallel.sequence_parallel=false)."
            )
        if self.context > 1 and seq_length % (2 * self.context) != 0:
            raise LayoutError(
                f"sequence length {seq_length} must be divisible by 2 x CP = {2 * self.context}; "
                "pad the sequences accordingly."
            )


def _divisors_hint(model: ModelShape) -> str:
    """TP sizes megatron-core accepts: divide the heads, and divide or are a multiple of the KV heads."""
    heads, groups = model.num_attention_heads, model.num_query_groups
    usable = [tp for tp in range(1, heads + 1)
              if heads % tp == 0 and (groups % tp == 0 or tp % groups == 0)]
    return ", ".join(str(tp) for tp in usable)
