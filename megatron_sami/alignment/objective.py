"""The SAMI objective as pure tensor code (no Megatron imports).

Source: Fränken et al. 2024, "Self-Supervised Alignment with Mutual Information: Learning to
Follow Principles without Preference Labels", arXiv:2404.14313 (the paper below): its InfoNCE
objective over constitutions and self-generated responses, and the MI estimate it reports.

Shapes: ``B`` queries, ``C`` constitutions, ``T`` tokens. ``logp_BCC[b, k, j]`` is the
log-probability of response ``j`` (sampled under constitution ``j``) given constitution ``k``'s
prompt, for query ``b``: rows are constitutions, columns are responses.

Loss (two-sided InfoNCE at temperature 1, no cross-query negatives):
- row term: for each constitution k, a softmax over the responses j of row k, target j = k;
- column term: for each response j, a softmax over the constitutions k of column j, target k = j;
- loss = row_weight * CE_row + col_weight * CE_col, averaged over queries (default 1/2 each).
The InfoNCE lower bound on I(Y; C | x) is log C - loss per query, in nats (with the default
equal weights, where it is a bound). The paper's public code scores a response by its mean
per-token log-probability (``logprob_reduction="mean"``, the default); the summed log-probability
(``"sum"``) is the optimal InfoNCE critic.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from megatron_sami.errors import ConfigError

REDUCTIONS = ("mean", "sum")


@dataclass
class SamiLossConfig:
    """Weights of the two InfoNCE terms, the per-sequence reduction, and an optional KL term.

    Raises:
        ConfigError: an unknown ``logprob_reduction``, a negative weight, both weights 0, or a
            negative ``kl_beta``.
    """

    row_weight: float = 0.5
    col_weight: float = 0.5
    logprob_reduction: str = "mean"  # mean per-token log-prob (paper code) or sum (optimal critic)
    kl_beta: float = 0.0  # weight of the KL-to-reference term; off, as in the paper

    def __post_init__(self) -> None:
        if self.logprob_reduction not in REDUCTIONS:
            raise ConfigError(f"loss.logprob_reduction '{self.logprob_reduction}' is unknown; use mean or sum.")
        if self.row_weight < 0 or self.col_weight < 0 or self.row_weight + self.col_weight == 0:
            raise ConfigError("loss.row_weight and loss.col_weight must be >= 0 and not both 0.")
        if self.kl_beta < 0:
            raise ConfigError(f"loss.kl_beta must be >= 0, got {self.kl_beta}.")


def sequence_logprobs(token_logp_NT: torch.Tensor, mask_NT: torch.Tensor, reduction: str) -> torch.Tensor:
    """Per-sequence log-probability of the masked (response) tokens, in nats.

    Args:
        token_logp_NT: [N, T] log-probability of each token.
        mask_NT: [N, T], 1 on the tokens to score (the response), 0 elsewhere.
        reduction: ``"sum"``, or ``"mean"`` per scored token (a sequence with none gives 0).

    Returns:
        [N], in ``token_logp_NT``'s dtype.
    """
    mask_NT = mask_NT.to(token_logp_NT.dtype)
    total_N = (token_logp_NT * mask_NT).sum(dim=-1)
    if reduction == "sum":
        return total_N
    return total_N / mask_NT.sum(dim=-1).clamp(min=1)


@dataclass
class SamiOutput:
    """What :func:`sami_loss` returns: 0-dim float32 tensors, averaged over the batch's queries.

    ``loss`` (differentiable) is the weighted two-sided InfoNCE loss plus ``kl_beta * kl``;
    ``loss_row``/``loss_col`` its two cross-entropies (nats); ``acc_row``/``acc_col`` the share
    of rows/columns whose largest entry is the diagonal; ``diag_margin`` the mean diagonal entry
    minus the mean off-diagonal entry (nats); ``mi_bound_nats`` log C - (loss_row + loss_col) / 2,
    capped at log C; ``kl`` the KL-to-reference estimate (0 when off).
    """

    loss: torch.Tensor
    loss_row: torch.Tensor
    loss_col: torch.Tensor
    acc_row: torch.Tensor
    acc_col: torch.Tensor
    diag_margin: torch.Tensor
    mi_bound_nats: torch.Tensor
    kl: torch.Tensor

    def logs(self) -> dict[str, torch.Tensor]:
        """Detached copies, safe to keep after the schedule scales the loss in place."""
        return {name: value.detach().clone() for name, value in vars(self).items()}


def sami_loss(
    logp_BCC: torch.Tensor,
    config: SamiLossConfig | None = None,
    ref_logp_BCC: torch.Tensor | None = None,
) -> SamiOutput:
    """The SAMI loss and its metrics for a batch of C x C log-probability matrices.

    Implements the paper's two-sided InfoNCE objective (Fränken et al. 2024, arXiv:2404.14313):
    a cross-entropy over each row (which response was written under constitution k?) and over
    each column (under which constitution was response j written?), target the diagonal,
    temperature 1, no negatives from other queries; loss = row_weight * CE_row + col_weight *
    CE_col (+ kl_beta * KL).

    Args:
        logp_BCC: [B, C, C] log p(response j | constitution k, query b) at [b, k, j], in nats
            (any float dtype; computed in float32), C >= 2.
        config: weights and KL (default :class:`SamiLossConfig`).
        ref_logp_BCC: [B, C, C] the reference model's log-probabilities; needed only when
            ``config.kl_beta > 0``.

    Returns:
        :class:`SamiOutput`.

    Raises:
        ValueError: ``logp_BCC`` is not [B, C, C] with C >= 2, or ``kl_beta > 0`` without
            ``ref_logp_BCC``.
    """
    config = config or SamiLossConfig()
    if logp_BCC.dim() != 3 or logp_BCC.shape[1] != logp_BCC.shape[2] or logp_BCC.shape[1] < 2:
        raise ValueError(f"logp_BCC must have shape [B, C, C] with C >= 2, got {tuple(logp_BCC.shape)}")
    batch, num_constitutions, _ = logp_BCC.shape
    logp_BCC = logp_BCC.float()
    target_BC = torch.arange(num_constitutions, device=logp_BCC.device).expand(batch, -1)
    # Row k: which response was written under constitution k? Column j: under which constitution?
    loss_row = F.cross_entropy(logp_BCC.reshape(-1, num_constitutions), target_BC.reshape(-1))
    loss_col = F.cross_entropy(logp_BCC.transpose(1, 2).reshape(-1, num_constitutions), target_BC.reshape(-1))
    loss = config.row_weight * loss_row + config.col_weight * loss_col
    kl = logp_BCC.new_zeros(())
    if config.kl_beta > 0:
        if ref_logp_BCC is None:
            raise ValueError("kl_beta > 0 needs the reference model's log-probabilities (ref_logp_BCC)")
        # Responses were sampled from the (earlier) policy: E[log pi - log pi_ref] on the diagonal.
        kl = (logp_BCC.diagonal(dim1=1, dim2=2) - ref_logp_BCC.float().diagonal(dim1=1, dim2=2)).mean()
        loss = loss + config.kl_beta * kl
    diagonal_BC = logp_BCC.diagonal(dim1=1, dim2=2)
    off_diagonal_mean_B = (logp_BCC.sum(dim=(1, 2)) - diagonal_BC.sum(dim=1)) / (num_constitutions * (num_constitutions - 1))
    with torch.no_grad():
        acc_row = (logp_BCC.argmax(dim=2) == target_BC).float().mean()
        acc_col = (logp_BCC.argmax(dim=1) == target_BC).float().mean()
        info_nce = 0.5 * (loss_row + loss_col)
        mi_bound = (math.log(num_constitutions) - info_nce).clamp(max=math.log(num_constitutions))
    return SamiOutput(
        loss=loss, loss_row=loss_row, loss_col=loss_col, acc_row=acc_row, acc_col=acc_col,
        diag_margin=(diagonal_BC.mean(dim=1) - off_diagonal_mean_B).mean().detach(),
        mi_bound_nats=mi_bound, kl=kl.detach(),
    )


def paper_mi_estimate(logp_BCC: torch.Tensor) -> torch.Tensor:
    """The MI estimate the paper reports (Fränken et al. 2024, arXiv:2404.14313), per query.

    MI = (1/C) sum_j [ S[j, j] - (1/C) sum_k S[k, j] ]: each response's log-probability under its
    own constitution minus its mean over all C constitutions, averaged over responses. Uncapped
    (unlike the InfoNCE bound); the paper computes it from SUMMED log-probs of one greedy
    response per constitution, C = 4 (two principles, every sign pattern).

    Args:
        logp_BCC: [B, C, C] S[k, j] = log p(response j | constitution k) per query, in nats.

    Returns:
        [B], in nats.
    """
    diagonal_BC = logp_BCC.diagonal(dim1=1, dim2=2)
    column_mean_BC = logp_BCC.mean(dim=1)
    return (diagonal_BC - column_mean_BC).mean(dim=1)
