"""The SAMI objective inside Megatron-Core's schedule (the ``forward_step_func`` contract).

SAMI (Fränken et al. 2024, "Self-Supervised Alignment with Mutual Information", arXiv:2404.14313)
scores every response of a query under every constitution: S[k, j] = log pi(y_j | c_k, x), a
C x C matrix per query, and trains on the two-sided InfoNCE over it
(:mod:`megatron_sami.alignment.objective`). This module makes those matrices from the model.

``GPTModel`` gives per-token logits (vocab-parallel under TP); the cross-entropy over the real
vocabulary, negated and summed or averaged under the response mask, gives each sequence's
log-probability. A microbatch holds whole C x C blocks (sequence ``q*C*C + k*C + j``), so the
last pipeline stage can form the matrices and the loss without communication.

Normalisation: the loss returned per microbatch is the mean over its queries; the schedule
divides it by the number of microbatches, and DDP averages gradients over data-parallel
ranks, so the gradient is that of the mean over the global batch of queries. Context
parallelism is refused (the loss would need log-probs summed across CP ranks first).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from megatron_sami.alignment.objective import SamiLossConfig, sami_loss, sequence_logprobs
from megatron_sami.alignment.shared_prompt import block_causal_mask
from megatron_sami.errors import ConfigError
from megatron_sami.models.checkpoint import unwrap
from megatron_sami.models.gpt_ops import (
    context_parallel_size,
    is_pipeline_last_stage,
    on_model_device,
    output_layer_at,
    position_ids_like,
    real_vocab_cross_entropy,
    rotary_positions,
)
from megatron_sami.training.engine import forward_backward, last_stage_result


def token_nll(model: torch.nn.Module, tokens_NT: torch.Tensor, labels_NT: torch.Tensor,
              vocab_size: int, scored_NT: torch.Tensor | None = None,
              shared: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """Per-token negative log-likelihood [N, T] (nats, fp32) over the REAL vocabulary, vocab-parallel
    under TP, of ``labels_NT`` [N, T] after ``tokens_NT`` [N, T]; on stages before the last, the
    hidden states for the next stage instead.

    ``GPTModel(..., labels=...)`` normalises over the padded vocabulary too (the padding rows
    give logit 0), which shifts every log-prob; here the padded entries are masked out first
    (:func:`~megatron_sami.models.gpt_ops.real_vocab_cross_entropy`), so the values equal those
    of the unpadded HF model.

    With ``scored_NT`` (the loss mask), the output layer and the cross-entropy run only at the
    scored positions (the responses; a SAMI sequence is mostly prompt) and every other position
    gets 0: the same values where scored, for a fraction of the largest matrix multiplication.
    Under sequence parallelism too: each TP rank contributes the scored rows of its slice of the
    sequence, and only those [M, hidden] rows travel (:func:`~megatron_sami.models.gpt_ops.output_layer_at`).

    With ``shared`` (the ``tokens``, ``position_ids``, ``segment_ids`` and ``score_index`` of
    :mod:`megatron_sami.alignment.shared_prompt`), the model runs on the shared-prompt rows instead
    of ``tokens_NT``, and the result still has the pairs' shape [N, T] of ``labels_NT``.
    """
    gpt = unwrap(model)
    last_stage = is_pipeline_last_stage()
    if shared is not None:
        inputs_RS, score_index_M = shared["tokens"], shared["score_index"]
        positions_RS, attention_mask = shared["position_ids"], block_causal_mask(shared["segment_ids"])
    else:
        inputs_RS, positions_RS, attention_mask = tokens_NT, position_ids_like(tokens_NT), None
        score_index_M = scored_NT.flatten().nonzero().squeeze(1) if scored_NT is not None else None
    select = score_index_M is not None and last_stage and score_index_M.numel() > 0
    with contextlib.ExitStack() as stack:
        if shared is not None:
            stack.enter_context(rotary_positions(gpt, positions_RS))
        if select:
            stack.enter_context(output_layer_at(gpt, score_index_M, inputs_RS.shape[1]))
        logits = model(inputs_RS, positions_RS, attention_mask)  # [1, scored, V] when selecting
    if not last_stage:
        return logits  # hidden states on their way to the next stage
    if score_index_M is not None and not select:
        logits = logits.reshape(-1, logits.shape[-1])[score_index_M].unsqueeze(0)
    if score_index_M is None:
        # The kernel reduces over the last dimension whatever the leading ones are ([S, B] in
        # megatron's own loop); [N, T] avoids two transposed copies of the logits.
        return real_vocab_cross_entropy(logits, labels_NT, vocab_size)
    scored_NT = scored_NT.bool()
    nll_1M = real_vocab_cross_entropy(logits, labels_NT[scored_NT].unsqueeze(0), vocab_size)
    return nll_1M.new_zeros(scored_NT.shape).masked_scatter(scored_NT, nll_1M[0])


def _logp_BCC(nll_NT: torch.Tensor, mask_NT: torch.Tensor, num_constitutions: int, reduction: str) -> torch.Tensor:
    logp_N = sequence_logprobs(-nll_NT.float(), mask_NT, reduction)
    return logp_N.view(-1, num_constitutions, num_constitutions)


def sami_forward_step(num_constitutions: int, loss_config: SamiLossConfig, vocab_size: int):
    """A ``forward_step_func`` computing the SAMI loss of one microbatch of C x C blocks.

    Args:
        num_constitutions: C, the constitutions (and responses) per query.
        loss_config: the loss's term weights and the log-prob reduction (mean or sum over
            response tokens).
        vocab_size: the real vocabulary size (the model's padded rows are excluded).

    Returns:
        ``forward_step(data_iterator, model) -> (nll_NT, loss_func)``, where each item of
        ``data_iterator`` is a microbatch of :func:`megatron_sami.alignment.data.collate` (or of
        :func:`megatron_sami.alignment.shared_prompt.share_microbatches`). ``loss_func(nll_NT)``
        returns the mean loss over the microbatch's queries (nats) and its logs;
        ``loss_func(nll_NT, non_loss_data=True)`` returns the [B, C, C] log-probability matrices.

    Raises:
        ConfigError: context parallelism is on (CP > 1).
    """
    if context_parallel_size() > 1:
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
    """The C x C log-probability matrices of every query (forward only), on every rank (collective).

    Args:
        model: this rank's part of the ``GPTModel``.
        microbatches: collated (or shared-prompt) microbatches of whole C x C blocks.
        num_constitutions: C.
        vocab_size: the real vocabulary size.
        reduction: "mean" or "sum" of the response tokens' log-probabilities.

    Returns:
        [B, C, C] fp32, B the queries of all microbatches: entry [b, k, j] is log pi(y_j | c_k, x_b)
        (nats; per token for "mean").
    """
    step = sami_forward_step(num_constitutions, SamiLossConfig(logprob_reduction=reduction), vocab_size)
    with torch.no_grad():
        collected = forward_backward(model, step, iter(microbatches), num_microbatches=len(microbatches),
                                     seq_length=microbatches[0]["tokens"].shape[1],
                                     micro_batch_size=microbatches[0]["tokens"].shape[0], forward_only=True,
                                     collect_non_loss_data=True)
    num_queries = sum(mb["loss_mask"].shape[0] for mb in microbatches) // num_constitutions**2
    shape = (num_queries, num_constitutions, num_constitutions)
    return last_stage_result(torch.cat(collected) if collected else None, shape)
