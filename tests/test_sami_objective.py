"""The pure SAMI loss against a straightforward loop implementation (values and gradients)."""

import math

import pytest
import torch

from megatron_sami.alignment.objective import SamiLossConfig, paper_mi_estimate, sami_loss, sequence_logprobs
from megatron_sami.errors import ConfigError


def loop_reference(S, row_weight=0.5, col_weight=0.5):
    """Textbook two-sided InfoNCE with explicit loops over queries, rows k and columns j."""
    batch, C, _ = S.shape
    total = 0.0
    for b in range(batch):
        row = 0.0
        for k in range(C):
            row = row - (S[b, k, k] - torch.logsumexp(torch.stack([S[b, k, j] for j in range(C)]), 0))
        col = 0.0
        for j in range(C):
            col = col - (S[b, j, j] - torch.logsumexp(torch.stack([S[b, k, j] for k in range(C)]), 0))
        total = total + row_weight * row / C + col_weight * col / C
    return total / batch


@pytest.mark.parametrize("num_constitutions", [2, 3, 4])
@pytest.mark.parametrize("weights", [(0.5, 0.5), (0.0, 1.0), (0.8, 0.2)])
def test_loss_and_gradients_match_the_loop_implementation(num_constitutions, weights):
    generator = torch.Generator().manual_seed(num_constitutions)
    S1 = torch.randn(3, num_constitutions, num_constitutions, generator=generator, dtype=torch.float64) * 3
    S1.requires_grad_(True)
    S2 = S1.detach().clone().requires_grad_(True)
    ours = sami_loss(S1, SamiLossConfig(row_weight=weights[0], col_weight=weights[1])).loss
    theirs = loop_reference(S2, *weights)
    assert float(ours) == pytest.approx(float(theirs), rel=1e-6)
    ours.backward()
    theirs.backward()
    torch.testing.assert_close(S1.grad, S2.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_sequence_logprobs_reduce_only_response_tokens(reduction):
    token_logp = torch.tensor([[-1.0, -2.0, -3.0, -4.0], [-0.5, -0.5, -9.0, -9.0]])
    mask = torch.tensor([[0, 1, 1, 0], [1, 1, 0, 0]])
    got = sequence_logprobs(token_logp, mask, reduction)
    expected = [-5.0, -1.0] if reduction == "sum" else [-2.5, -0.5]
    assert got.tolist() == expected


def test_metrics_on_a_perfectly_separated_matrix():
    S = torch.full((2, 3, 3), -50.0)
    S[:, range(3), range(3)] = 0.0
    out = sami_loss(S)
    assert float(out.acc_row) == 1.0 and float(out.acc_col) == 1.0
    assert float(out.mi_bound_nats) == pytest.approx(math.log(3), abs=1e-6)
    assert float(out.diag_margin) == pytest.approx(50.0)


def test_uninformative_matrix_gives_zero_bound_and_chance_loss():
    out = sami_loss(torch.zeros(4, 4, 4))
    assert float(out.loss) == pytest.approx(math.log(4))
    assert float(out.mi_bound_nats) == pytest.approx(0.0, abs=1e-6)


def test_paper_estimator_matches_its_formula():
    S = torch.tensor([[[-1.0, -4.0], [-3.0, -2.0]]])
    # (1/C) sum_j [S[j,j] - (1/C) sum_k S[k,j]] = 0.5 * ((-1 - -2) + (-2 - -3)) = 1.0
    assert paper_mi_estimate(S).tolist() == [1.0]


def test_kl_term_is_off_by_default_and_needs_a_reference():
    S = torch.randn(2, 2, 2)
    assert float(sami_loss(S).kl) == 0.0
    with pytest.raises(ValueError, match="reference"):
        sami_loss(S, SamiLossConfig(kl_beta=0.1))
    shifted = sami_loss(S, SamiLossConfig(kl_beta=0.1), ref_logp_BCC=S - 1.0)
    assert float(shifted.kl) == pytest.approx(1.0)
    assert float(shifted.loss) == pytest.approx(float(sami_loss(S).loss) + 0.1)


def test_bad_configs_name_the_key():
    with pytest.raises(ConfigError, match="logprob_reduction"):
        SamiLossConfig(logprob_reduction="max")
    with pytest.raises(ConfigError, match="not both 0"):
        SamiLossConfig(row_weight=0, col_weight=0)
