"""Model FLOPs of a SAMI training step, counted as Megatron-LM counts them. Pure code.

MFU divides the FLOPs the model needs by the time taken and the GPUs' peak, so only useful
work counts (Megatron-LM ``num_floating_point_operations`` in ``megatron/training/training.py``):
every GEMM a real token passes through, x 2 per multiply-add and x 3 for forward plus the two
backward GEMMs; padding is not counted, activation recomputation is not counted, nor norms,
rotary embeddings, softmax or the MoE router (Megatron-LM omits the router too: it is h x E
per token against the experts' 3 h f k).

Per real token and layer (h hidden, q = heads x head_dim, kv = groups x head_dim, f the FFN
width, k the experts per token):
- QKV and output projections (GQA): ``2 h (2 q + 2 kv)``;
- MLP, SwiGLU's three GEMMs, MoE through its top-k experts: ``2 x 3 h f k``;
Per layer, for each query-key pair the attention computes (QK^T and the weighted sum of V):
``2 x 2 q``; a causal sequence of L real tokens has L^2 / 2 such pairs (Megatron-LM's
halving), and a shared-prompt row (:mod:`megatron_sami.alignment.shared_prompt`) with prompt P
and responses R_j has P^2 / 2 + sum_j (R_j P + R_j^2 / 2): each response block sees the prompt
and itself only.
The output layer, ``2 h V`` (padded vocabulary: the GEMM's rows), runs where the step computes
logits: at the scored positions only (:func:`megatron_sami.alignment.step.token_nll` selects them,
with or without sequence parallelism).

On a batch of equal-length, unpadded sequences with logits at every token this is Megatron-LM's
count exactly (tests/test_precision_flops.py checks it).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron_sami.alignment.data import used_lengths
from megatron_sami.alignment.shared_prompt import PAD_SEGMENT
from megatron_sami.models.config import ModelConfig

FORWARD_BACKWARD = 3  # forward GEMM, then the data- and weight-gradient GEMMs
FMA = 2  # FLOPs per multiply-add


@dataclass(frozen=True)
class RowLengths:
    """The real tokens of one row the model processes: ``prompt`` tokens every later token of
    the row attends to, then ``responses``, blocks that each attend to the prompt and to
    themselves only. A pair row (one whole causal sequence) is ``RowLengths(prompt=L)``."""

    prompt: int
    responses: tuple[int, ...] = ()

    @property
    def tokens(self) -> int:
        """Real tokens in the row."""
        return self.prompt + sum(self.responses)

    @property
    def attention_pairs(self) -> float:
        """Query-key pairs the row's attention computes (causal halving, as Megatron-LM counts)."""
        return self.prompt**2 / 2 + sum(r * self.prompt + r**2 / 2 for r in self.responses)


def per_token_flops(model: ModelConfig) -> float:
    """Training FLOPs per real token of the GEMMs that every token passes through (projections
    and MLP of all layers), without attention scores and the output layer."""
    q = model.kv_channels * model.num_attention_heads
    kv = model.kv_channels * model.num_query_groups
    projections = model.hidden_size * (2 * q + 2 * kv)
    experts = model.moe_router_topk if model.is_moe else 1
    mlp = 3 * model.hidden_size * model.ffn_hidden_size * experts
    return FORWARD_BACKWARD * FMA * model.num_layers * (projections + mlp)


def training_flops(model: ModelConfig, rows: list[RowLengths], logit_tokens: int) -> float:
    """Model FLOPs (forward + backward) of running ``rows`` and the output layer at
    ``logit_tokens`` positions (module docstring)."""
    q = model.kv_channels * model.num_attention_heads
    tokens = sum(row.tokens for row in rows)
    pairs = sum(row.attention_pairs for row in rows)
    attention = FORWARD_BACKWARD * FMA * model.num_layers * 2 * q * pairs
    logits = FORWARD_BACKWARD * FMA * model.hidden_size * model.padded_vocab_size() * logit_tokens
    return per_token_flops(model) * tokens + attention + logits


def microbatch_rows(micro: dict[str, torch.Tensor]) -> list[RowLengths]:
    """The rows of a pair microbatch (``tokens``, ``loss_mask`` [N, T]: each row one causal
    sequence of its used length) or of a shared-prompt one (``segment_ids`` [R, S]: segment 0
    the prompt, ``j + 1`` response ``j``, -1 padding)."""
    if "segment_ids" not in micro:
        return [RowLengths(prompt=int(length)) for length in used_lengths(micro["loss_mask"]).tolist()]
    rows = []
    for segments_S in micro["segment_ids"]:
        counts = torch.bincount(segments_S[segments_S != PAD_SEGMENT])
        rows.append(RowLengths(prompt=int(counts[0]), responses=tuple(int(n) for n in counts[1:].tolist())))
    return rows


def step_flops(model: ModelConfig, micro: list[dict[str, torch.Tensor]]) -> float:
    """Model FLOPs of one rank's microbatches of a SAMI step (sum over data-parallel ranks for the
    step's total), the output layer at the scored tokens (``loss_mask``) only."""
    return sum(training_flops(model, microbatch_rows(batch), int(batch["loss_mask"].sum())) for batch in micro)
