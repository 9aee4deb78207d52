"""The SAMI objective as pure tensor code (no Megatron imports).

Shapes: ``B`` queries, ``C`` constitutions, ``T`` tokens. ``logp_BCC[b, k, j]`` is the
log-probability of response ``j`` (sampled under constitution ``j``) given constitution ``k``'s
prompt, for query ``b``: rows are constitutions, columns are responses.

Loss (two-sided InfoNCE at temperature 1, no cross-query negatives):
- row term: for each constitution k, a softmax over the responses j of row k, target j = k;
- column term: for each response j, a softmax over the constitutions k of column j, target k = j;
- loss = row_weight * CE_row + col_weight * CE_col, averaged over queries (default 1/2 each).
The InfoNCE lower bound on I(Y; C | x) is log C - loss per query, in nats (with the default
equal weights, where it is a bound).
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
    """Weights of the two InfoNCE terms, the per-sequence reduction, and an optional KL term."""

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
    """Per-sequence log-probability of the masked (response) tokens: sum or per-token mean."""
    mask_NT = mask_NT.to(token_logp_NT.dtype)
    total_N = (token_logp_NT * mask_NT).sum(dim=-1)
    if reduction == "sum":
        return total_N
    return total_N / mask_NT.sum(dim=-1).clamp(min=1)


@dataclass
class SamiOutput:
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
    """The SAMI loss and its metrics for a batch of C x C log-probability matrices."""
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
    """The paper's reported (uncapped) estimator, per query, from SUMMED log-probs.

    MI = (1/C) sum_j [ S[j, j] - (1/C) sum_k S[k, j] ].
    """
    diagonal_BC = logp_BCC.diagonal(dim1=1, dim2=2)
    column_mean_BC = logp_BCC.mean(dim=1)
    return (diagonal_BC - column_mean_BC).mean(dim=1)
