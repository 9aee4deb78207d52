"""Operations on a megatron-core ``GPTModel`` that callers outside the seam use.

The SAMI step, conversion and its verification, and the test objectives call these instead of
reaching into ``GPTModel`` or megatron-core themselves: the two forward hooks that depend on
``GPTModel``'s internals (its output layer and its rotary embedding), the cross-entropy over
the real (unpadded) vocabulary, the gather of vocab-parallel logits, and the questions about
this rank's place in the layout that those callers ask (pipeline stage, TP rank, offsets of
its layers and experts). Written against megatron-core 0.19.x.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from megatron_sami.models.config import ModelConfig


def position_ids_like(tokens_BT: torch.Tensor) -> torch.Tensor:
    """Positions 0..T-1 for every row of ``tokens_BT`` [B, T] (int64, same device), as [B, T]."""
    return torch.arange(tokens_BT.shape[1], device=tokens_BT.device).unsqueeze(0).expand_as(tokens_BT)


def on_model_device(batch: dict[str, torch.Tensor], model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The batch's tensors on the device of the model's parameters (batches are made on the CPU)."""
    device = next(model.parameters()).device
    return {key: value.to(device, non_blocking=True) for key, value in batch.items()}


# --- where this rank sits in the layout ---------------------------------------------------------


def is_pipeline_last_stage() -> bool:
    """Whether this rank holds the last pipeline stage (the one whose model output is logits)."""
    from megatron.core import parallel_state

    return parallel_state.is_pipeline_last_stage()


def tensor_parallel_rank() -> int:
    """This rank's index in its tensor-parallel group (0-based)."""
    from megatron.core import parallel_state

    return parallel_state.get_tensor_model_parallel_rank()


def tensor_parallel_size() -> int:
    """The number of ranks a layer's weights are split over (TP)."""
    from megatron.core import parallel_state

    return parallel_state.get_tensor_model_parallel_world_size()


def context_parallel_size() -> int:
    """The number of ranks a sequence is split over (CP)."""
    from megatron.core import parallel_state

    return parallel_state.get_context_parallel_world_size()


def layer_and_expert_offsets(model: ModelConfig) -> tuple[int, int]:
    """Global index of this rank's first transformer layer and first expert (0 for a dense model).

    Layers are split evenly over the pipeline stages and experts over the expert-parallel
    ranks, as :func:`megatron_sami.models.build.build_gpt_model` builds them.
    """
    from megatron.core import parallel_state

    pp_rank = parallel_state.get_pipeline_model_parallel_rank()
    pp_size = parallel_state.get_pipeline_model_parallel_world_size()
    layer_offset = pp_rank * (model.num_layers // pp_size)
    expert_offset = 0
    if model.is_moe:
        ep_size = parallel_state.get_expert_model_parallel_world_size()
        expert_offset = parallel_state.get_expert_model_parallel_rank() * (model.num_experts // ep_size)
    return layer_offset, expert_offset


def writes_param(local_name: str) -> bool:
    """Whether this rank writes its copy of parameter ``local_name`` (a ``named_parameters`` name)
    when each tensor is to be written once: dense weights from data-parallel rank 0, experts from
    expert-data-parallel rank 0."""
    from megatron.core import parallel_state

    if ".local_experts." in local_name or ".experts.linear_fc" in local_name:
        return parallel_state.get_expert_data_parallel_rank() == 0
    return parallel_state.get_data_parallel_rank() == 0


# --- forward hooks on GPTModel's internals ------------------------------------------------------


@contextlib.contextmanager
def output_layer_at(gpt: torch.nn.Module, index_M: torch.Tensor, seq_length: int) -> Iterator[None]:
    """While inside, the model's output layer sees only the hidden states at ``index_M``.

    Args:
        gpt: the bare ``GPTModel`` (see :func:`megatron_sami.models.checkpoint.unwrap`) of the
            last pipeline stage.
        index_M: [M] int64 flat indices into the model's [N, T] token positions (repeats allowed),
            the same on every TP rank.
        seq_length: T, the length of the sequences the model runs on.

    The output layer gets them as a [M, 1, hidden] batch, so the model returns their logits as
    [1, M, V_local], with or without sequence parallelism (:func:`_select_sequence_parallel`).
    Depends on ``GPTModel.output_layer`` (a ``ColumnParallelLinear``; Transformer Engine's LM head
    only with ``fp8_output_proj``, never set here) taking the [T, N, hidden] hidden states,
    [T / TP, N, hidden] under sequence parallelism, as its first argument and reading its
    ``sequence_parallel`` attribute at each call (megatron-core 0.19.x).
    """
    layer = gpt.output_layer
    sharded = bool(layer.sequence_parallel)

    def select(module, args, kwargs):
        hidden_TNH = args[0] if args else kwargs.pop("input_")
        if sharded:
            chosen_M1H = _select_sequence_parallel(hidden_TNH, index_M, seq_length, layer.tp_group)
            # The selected rows are whole on every rank now: the layer must not gather them again
            # (megatron-core's own GPTModel._postprocess turns the flag off the same way when it
            # keeps only the last token in inference). Its backward then all-reduces the input
            # gradient over TP, as without sequence parallelism.
            module.sequence_parallel = False
        else:
            batch = hidden_TNH.shape[1]
            # Row n*T + t of [N, T] is row t*N + n of the [T, N] hidden states (no transposed copy).
            rows_M = (index_M % seq_length) * batch + index_M // seq_length
            chosen_M1H = hidden_TNH.reshape(-1, hidden_TNH.shape[-1])[rows_M].unsqueeze(1)
        return (chosen_M1H, *args[1:]), kwargs

    def restore(module, args, output):
        module.sequence_parallel = sharded

    handles = [layer.register_forward_pre_hook(select, with_kwargs=True), layer.register_forward_hook(restore)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
        layer.sequence_parallel = sharded


def _select_sequence_parallel(hidden_TNH: torch.Tensor, index_M: torch.Tensor, seq_length: int,
                              group) -> torch.Tensor:
    """The rows ``index_M`` (flat indices into [N, T]) of hidden states sharded along the sequence
    over the TP group (this rank holds positions ``rank * T/TP`` to ``(rank + 1) * T/TP - 1`` of
    every sequence, as [T/TP, N, hidden]), whole on every rank, as [M, 1, hidden].

    Each rank fills the rows it holds into an [M, hidden] tensor of zeros, and an all-reduce (sum)
    over TP assembles them: adding zeros is exact, so the rows are bit-for-bit those of the
    gathered sequence. megatron-core's ``reduce_from_tensor_model_parallel_region`` does the sum
    and passes the gradient through unchanged in backward, which is right because the output
    layer's backward has already summed the input gradient over TP (all ranks hold the same);
    each rank's ``torch.where`` then keeps the gradient of its own rows only. The alternative,
    gathering the whole sequence (``gather_from_sequence_parallel_region``: all-gather forward,
    reduce-scatter backward) and selecting after, moves and holds [T, N, hidden] per rank in
    forward and backward; this moves and holds [M, hidden], M the scored tokens. An all-gather of
    each rank's own rows would move half as much, but the ranks hold unequal numbers of them
    (responses sit late in each sequence), and megatron-core gathers equal shapes only: padded to
    the busiest rank, the output layer would run on up to TP x M rows.
    """
    from megatron.core.tensor_parallel import reduce_from_tensor_model_parallel_region

    local_T, batch, hidden = hidden_TNH.shape
    rank = torch.distributed.get_rank(group)
    t_M, n_M = index_M % seq_length, index_M // seq_length
    mine_M = t_M // local_T == rank
    # Rows of other ranks point at row 0 here and are replaced by zeros below.
    rows_M = torch.where(mine_M, (t_M - rank * local_T) * batch + n_M, 0)
    picked_MH = hidden_TNH.reshape(-1, hidden)[rows_M]
    chosen_MH = torch.where(mine_M.unsqueeze(1), picked_MH, torch.zeros((), dtype=picked_MH.dtype,
                                                                         device=picked_MH.device))
    return reduce_from_tensor_model_parallel_region(chosen_MH, group=group).unsqueeze(1)


@contextlib.contextmanager
def rotary_positions(gpt: torch.nn.Module, positions_NT: torch.Tensor) -> Iterator[None]:
    """While inside, the rotary embedding follows ``positions_NT`` [N, T] (int64) per sequence.

    megatron-core 0.19.x makes the embedding for positions 0..T-1 as [T, 1, 1, dim]; the hook
    gathers it into [T, N, 1, dim], which its (unfused) rotary application broadcasts over the
    heads.

    Raises:
        ValueError: the model has no rotary position embedding.
    """
    rotary = getattr(gpt, "rotary_pos_emb", None)
    if rotary is None:
        raise ValueError("shared prompts need rotary position embeddings")

    def gather(module, args, emb_S11D):
        return emb_S11D[:, 0][positions_NT.t()]

    handle = rotary.register_forward_hook(gather)
    try:
        yield
    finally:
        handle.remove()


# --- logits -------------------------------------------------------------------------------------


def real_vocab_cross_entropy(logits_XV: torch.Tensor, labels_X: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Per-token negative log-likelihood (nats, fp32) over the REAL vocabulary, vocab-parallel.

    Args:
        logits_XV: [..., V_local] this TP rank's slice of the logits over the padded vocabulary
            (any leading shape; megatron-core's kernel reduces over the last dimension only).
        labels_X: [...] int64 token ids, the leading shape of ``logits_XV``.
        vocab_size: the real vocabulary size; padded entries at or beyond it are masked out.

    Returns:
        [...] fp32, ``labels_X``'s shape. ``GPTModel(..., labels=...)`` would normalise over the
        padding rows too (logit 0), shifting every log-prob; masked first, the values equal those
        of the unpadded HF model.
    """
    from megatron.core import tensor_parallel

    local_vocab = logits_XV.shape[-1]
    first = tensor_parallel_rank() * local_vocab
    logits_XV = logits_XV.float()
    if first + local_vocab > vocab_size:  # this rank holds padding rows: mask them (one copy of the logits)
        is_padding_V = torch.arange(first, first + local_vocab, device=logits_XV.device) >= vocab_size
        logits_XV = logits_XV.masked_fill(is_padding_V, float("-inf"))
    return tensor_parallel.vocab_parallel_cross_entropy(logits_XV, labels_X)


def gather_vocab(logits_XV: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Full-vocabulary logits [..., vocab_size] from this TP rank's slice [..., V_local] of the
    padded vocabulary (an all-gather over the tensor-parallel group; padding cut off)."""
    from megatron.core import tensor_parallel

    return tensor_parallel.gather_from_tensor_model_parallel_region(logits_XV)[..., :vocab_size]
