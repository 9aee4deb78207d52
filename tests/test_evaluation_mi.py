"""Both MI estimators and the HF scorer against straightforward independent implementations."""

import math
import statistics

import pytest
import torch

from megatron_sami.alignment.data import PromptTemplate, SamiRecord
from megatron_sami.evaluation import mi
from megatron_sami.testing.tiny import make_tiny_hf_model, make_tiny_tokenizer


def naive_info_nce_bound(S):
    """log C - (row CE + column CE)/2 with plain loops, capped at log C."""
    C = len(S)
    row = sum(-(S[k][k] - math.log(sum(math.exp(S[k][j]) for j in range(C)))) for k in range(C)) / C
    col = sum(-(S[j][j] - math.log(sum(math.exp(S[k][j]) for k in range(C)))) for j in range(C)) / C
    return min(math.log(C) - (row + col) / 2, math.log(C))


def naive_paper_mi(S):
    C = len(S)
    return sum(S[j][j] - sum(S[k][j] for k in range(C)) / C for j in range(C)) / C


@pytest.mark.parametrize("C", [2, 4])
def test_estimators_match_loops(C):
    generator = torch.Generator().manual_seed(C)
    for _ in range(5):
        mean_S = torch.randn(C, C, generator=generator, dtype=torch.float64)
        sum_S = mean_S * 17
        got = mi.query_estimates({"mean": mean_S, "sum": sum_S})
        assert got["info_nce_bound"] == pytest.approx(naive_info_nce_bound(mean_S.tolist()), abs=1e-5)
        assert got["paper_mi"] == pytest.approx(naive_paper_mi(sum_S.tolist()), abs=1e-4)
    # A perfectly separable matrix: the bound reaches log C, the paper estimator grows without cap.
    S = torch.full((C, C), -50.0).fill_diagonal_(0.0)
    got = mi.query_estimates({"mean": S, "sum": S * 10})
    assert got["info_nce_bound"] == pytest.approx(math.log(C), abs=1e-6) and got["paper_mi"] > math.log(C)


def test_mean_and_standard_error():
    values = [0.3, 1.2, -0.4, 2.5, 0.9]
    estimate = mi.mean_and_se(values)
    assert estimate.mean == pytest.approx(statistics.mean(values))
    assert estimate.se == pytest.approx(statistics.stdev(values) / math.sqrt(len(values)))
    assert math.isnan(mi.mean_and_se([1.0]).se)


def test_hf_scorer_matches_one_sequence_at_a_time(tmp_path):
    from transformers import AutoModelForCausalLM

    template = PromptTemplate(prompt="Rules:\n{constitution}\nQ: {query}\nA:", response_prefix=" ")
    texts = ["be kind", "be rude", "why is the sky blue", "because of scattering", "no idea, go away"]
    tokenizer = make_tiny_tokenizer(tmp_path / "model", corpus=texts * 20)
    make_tiny_hf_model("llama", tmp_path / "model", vocab_size=len(tokenizer))
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "model", dtype=torch.float32).eval()
    record = SamiRecord("r", "why is the sky blue", ["1. be kind", "1. be rude"],
                        ["because of scattering", "no idea, go away, really"])
    got = mi.score_record(model, tokenizer, template, record)
    for k, constitution in enumerate(record.constitutions):
        prompt = tokenizer(template.render(constitution, record.query))["input_ids"]
        for j, response in enumerate(record.responses):
            answer = tokenizer(" " + response, add_special_tokens=False)["input_ids"]
            ids = torch.tensor([prompt + answer])
            with torch.no_grad():
                logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), dim=-1)
            per_token = [logp[len(prompt) - 1 + i, token].item() for i, token in enumerate(answer)]
            assert got["sum"][k, j].item() == pytest.approx(sum(per_token), abs=1e-3)
            assert got["mean"][k, j].item() == pytest.approx(sum(per_token) / len(per_token), abs=1e-4)
