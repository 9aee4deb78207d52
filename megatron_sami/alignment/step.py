"""The SAMI objective inside megatron-core's schedule (the ``forward_step_func`` contract).

``GPTModel(..., labels=...)`` returns per-token cross-entropy (vocab-parallel under TP); its
negation summed or averaged under the response mask gives each sequence's log-probability.
A microbatch holds whole C x C blocks (sequence ``q*C*C + k*C + j``), so the last pipeline
stage can form the matrices and the loss without communication.

Normalisation: the loss returned per microbatch is the mean over its queries; the schedule
divides it by the number of microbatches, and DDP averages gradients over data-parallel
ranks, so the gradient is that of the mean over the global batch of queries. Context
parallelism is refused (the loss would need log-probs summed across CP ranks first).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.distributed as dist

from megatron_sami.alignment.objective import SamiLossConfig, sami_loss, sequence_logprobs
from megatron_sami.alignment.shared_prompt import block_causal_mask
from megatron_sami.models.gpt_ops import on_model_device, position_ids_like
from megatron_sami.runtime.distributed import collective_device


def token_nll(model: torch.nn.Module, tokens_NT: torch.Tensor, labels_NT: torch.Tensor,
              vocab_size: int, scored_NT: torch.Tensor | None = None,
              shared: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """Per-token negative log-likelihood over the REAL vocabulary, vocab-parallel under TP.

    ``GPTModel(..., labels=...)`` normalises over the padded vocabulary too (the padding rows
    give logit 0), which shifts every log-prob; here the padded entries are masked out first,
    so the values equal those of the unpadded HF model.

    With ``scored_NT`` (the loss mask), the output layer and the cross-entropy run only at the
    scored positions (the responses; a SAMI sequence is mostly prompt) and every other position
    gets 0: the same values where scored, for a fraction of the largest matrix multiplication
    (under sequence parallelism, where the output layer gathers the sequence itself, the logits
    of every position are made and the scored ones picked).

    With ``shared`` (the ``tokens``, ``position_ids``, ``segment_ids`` and ``score_index`` of
    :mod:`megatron_sami.alignment.shared_prompt`), the model runs on the shared-prompt rows instead
    of ``tokens_NT``, and the result still has the pairs' shape [N, T] of ``labels_NT``.
    """
    from megatron.core import parallel_state, tensor_parallel

    from megatron_sami.models.checkpoint import unwrap

    gpt = unwrap(model)
    last_stage = parallel_state.is_pipeline_last_stage()
    if shared is not None:
        inputs_RS, score_index_M = shared["tokens"], shared["score_index"]
        positions_RS, attention_mask = shared["position_ids"], block_causal_mask(shared["segment_ids"])
    else:
        inputs_RS, positions_RS, attention_mask = tokens_NT, position_ids_like(tokens_NT), None
        score_index_M = scored_NT.flatten().nonzero().squeeze(1) if scored_NT is not None else None
    select = score_index_M is not None and last_stage and not gpt.config.sequence_parallel and score_index_M.numel() > 0
    with contextlib.ExitStack() as stack:
        if shared is not None:
            stack.enter_context(_rotary_positions(gpt, positions_RS))
        if select:
            stack.enter_context(_output_layer_at(gpt, score_index_M, inputs_RS.shape[1]))
        logits = model(inputs_RS, positions_RS, attention_mask)  # [1, scored, V] when selecting
    if not last_stage:
        return logits  # hidden states on their way to the next stage
    if score_index_M is not None and not select:
        logits = logits.reshape(-1, logits.shape[-1])[score_index_M].unsqueeze(0)
    local_vocab = logits.shape[-1]
    first = parallel_state.get_tensor_model_parallel_rank() * local_vocab
    logits = logits.float()
    if first + local_vocab > vocab_size:  # this rank holds padding rows: mask them (one copy of the logits)
        is_padding_V = torch.arange(first, first + local_vocab, device=logits.device) >= vocab_size
        logits = logits.masked_fill(is_padding_V, float("-inf"))
    if score_index_M is None:
        # megatron-core's kernel reduces over the last dimension whatever the leading ones are
        # ([S, B] in megatron's own loop); [N, T] avoids two transposed copies of the logits.
        return tensor_parallel.vocab_parallel_cross_entropy(logits, labels_NT)
    scored_NT = scored_NT.bool()
    nll_1M = tensor_parallel.vocab_parallel_cross_entropy(logits, labels_NT[scored_NT].unsqueeze(0))
    return nll_1M.new_zeros(scored_NT.shape).masked_scatter(scored_NT, nll_1M[0])


@contextlib.contextmanager
def _output_layer_at(gpt: torch.nn.Module, index_M: torch.Tensor, seq_length: int) -> Iterator[None]:
    """While inside, the model's output layer sees only the hidden states at ``index_M`` (flat
    indices into the [N, T] positions, repeats allowed) as a [M, 1, hidden] batch, so the model
    returns their logits as [1, M, V]."""

    def select(module, args, kwargs):
        hidden_TNH = args[0] if args else kwargs.pop("input_")
        batch = hidden_TNH.shape[1]
        # Row n*T + t of [N, T] is row t*N + n of the [T, N] hidden states (no transposed copy).
        rows_M = (index_M % seq_length) * batch + index_M // seq_length
        chosen_M1H = hidden_TNH.reshape(-1, hidden_TNH.shape[-1])[rows_M].unsqueeze(1)
        return (chosen_M1H, *args[1:]), kwargs

    handle = gpt.output_layer.register_forward_pre_hook(select, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


@contextlib.contextmanager
def _rotary_positions(gpt: torch.nn.Module, positions_NT: torch.Tensor) -> Iterator[None]:
    """While inside, the rotary embedding follows ``positions_NT`` per sequence: megatron-core
    makes it for positions 0..T-1 as [T, 1, 1, dim]; the hook gathers it into [T, N, 1, dim],
    which its (unfused) rotary application broadcasts over the heads."""
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


def _logp_BCC(nll_NT: torch.Tensor, mask_NT: torch.Tensor, num_constitutions: int, reduction: str) -> torch.Tensor:
    logp_N = sequence_logprobs(-nll_NT.float(), mask_NT, reduction)
    return logp_N.view(-1, num_constitutions, num_constitutions)


def sami_forward_step(num_constitutions: int, loss_config: SamiLossConfig, vocab_size: int):
    """A ``forward_step_func`` computing the SAMI loss of one microbatch of C x C blocks."""
    from megatron.core import parallel_state

    if parallel_state.get_context_parallel_world_size() > 1:
        from megatron_sami.errors import ConfigError

        raise ConfigError("the SAMI step does not support context parallelism yet; set parallel.context=1.")

    def forward_step(data_iterator: Iterator[dict[str, torch.Tensor]], model: torch.nn.Module):
        batch = on_model_device(next(data_iterator), model)
        mask_NT = batch["loss_mask"]
        shared = batch if "score_index" in batch else None
        nll_NT = token_nll(model, batch["tokens"], batch["labels"], vocab_size, scored_NT=mask_NT, shared=shared)

        def loss_func(nll_NT: torch.Tensor, non_loss_data: bool = False):
            logp_BCC = _logp_BCC(nll_NT, mask_NT, num_constitutions, loss_config.logprob_reduction)
            if non_loss_data:
                return logp_BCC.detach()
            out = sami_loss(logp_BCC, loss_config)
            logs = out.logs()
            logs["response_tokens"] = mask_NT.sum()
            return out.loss, logs

        return nll_NT, loss_func

    return forward_step


def score_matrices(model: torch.nn.Module, microbatches: list[dict[str, torch.Tensor]], num_constitutions: int,
                   vocab_size: int, reduction: str = "mean") -> torch.Tensor:
    """The C x C log-probability matrices of every query (forward only), on every rank."""
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    step = sami_forward_step(num_constitutions, SamiLossConfig(logprob_reduction=reduction), vocab_size)
    with torch.no_grad():
        collected = get_forward_backward_func()(
            forward_step_func=step, data_iterator=iter(microbatches), model=[model],
            num_microbatches=len(microbatches), seq_length=microbatches[0]["tokens"].shape[1],
            micro_batch_size=microbatches[0]["tokens"].shape[0], forward_only=True, collect_non_loss_data=True)
    num_queries = sum(mb["loss_mask"].shape[0] for mb in microbatches) // num_constitutions**2
    shape = (num_queries, num_constitutions, num_constitutions)
    logp_BCC = torch.cat(collected).contiguous() if parallel_state.is_pipeline_last_stage() else \
        torch.zeros(shape, device=collective_device())
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        dist.all_reduce(logp_BCC, group=parallel_state.get_pipeline_model_parallel_group())
    return logp_BCC
