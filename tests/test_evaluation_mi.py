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


def random_matrices(count: int, C: int, seed: int) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        mean_S = torch.randn(C, C, generator=generator)
        out.append({"mean": mean_S, "sum": mean_S * 9})
    return out


def test_estimates_are_the_mean_and_error_of_the_per_query_values():
    matrices = random_matrices(6, 4, seed=3)
    got = mi.estimates(matrices)
    per_query = [mi.query_estimates(m) for m in matrices]
    for key in ("info_nce_bound", "paper_mi", "acc_row", "acc_col"):
        values = [q[key] for q in per_query]
        assert got[key]["mean"] == pytest.approx(statistics.mean(values))
        assert got[key]["se"] == pytest.approx(statistics.stdev(values) / math.sqrt(6))
        assert got[key]["n"] == 6
    assert got["num_constitutions"] == 4


def write_scores(path, ids, matrices):
    import json

    with path.open("w") as out:
        for query_id, m in zip(ids, matrices, strict=True):
            out.write(json.dumps({"id": query_id, "sum": m["sum"].tolist(), "mean": m["mean"].tolist()}) + "\n")


def test_a_launched_scorer_writes_the_records_and_reads_the_matrices_in_order(tmp_path):
    from megatron_sami.alignment.data import read_records

    records = [SamiRecord(f"q{i}", f"query {i}", ["1. be kind", "1. be rude"], [f"yes {i}", f"no {i}"],
                          {"signs": [[1], [-1]]}) for i in range(3)]
    matrices = random_matrices(3, 2, seed=1)
    launched = []

    def launch(records_path, matrices_path):
        launched.append(records_path)
        assert [r.id for r in read_records(records_path)] == ["q0", "q1", "q2"]
        write_scores(matrices_path, [r.id for r in records], matrices)

    scorer = mi.launched_scorer(launch, lambda label: tmp_path / f"eval-{label}")
    got = scorer("learned", records)
    assert launched == [tmp_path / "eval-learned" / "scoring-records.jsonl"]
    for g, m in zip(got, matrices, strict=True):
        assert torch.equal(g["sum"], m["sum"]) and torch.equal(g["mean"], m["mean"])
    assert mi.estimates(got) == mi.estimates(matrices)

    def launch_reordered(records_path, matrices_path):
        write_scores(matrices_path, ["q1", "q0", "q2"], matrices)

    with pytest.raises(mi.DataError, match="not the 3 of"):
        mi.launched_scorer(launch_reordered, lambda label: tmp_path / "other")("learned", records)


@pytest.mark.parametrize("line, fix", [
    ('{"id": "a", "sum": [[1, 2], [3, 4]]}', "not a row"),
    ('{"id": "a", "sum": [[1, 2], [3, 4]], "mean": [[1, 2, 3]]}', "C x C"),
    ('{"id": "a", "sum": [[1]], "mean": [[1]]}', "C >= 2"),
    ("not json", "not a row"),
])
def test_a_malformed_scores_file_is_one_sentence(tmp_path, line, fix):
    (tmp_path / "m.jsonl").write_text(line + "\n")
    with pytest.raises(mi.DataError, match=fix):
        mi.read_matrices(tmp_path / "m.jsonl")
    with pytest.raises(mi.DataError, match="run sami-score first"):
        mi.read_matrices(tmp_path / "missing.jsonl")


def test_evaluate_model_scores_with_the_given_scorer(tmp_path):
    from megatron_sami.rollout.constitutions import load_constitution_set
    from megatron_sami.rollout.generation import Completion, GenerationConfig
    from megatron_sami.rollout.queries import Query

    class Echo:
        def generate(self, prompts):
            return [Completion(f"answer {len(p)}", True, 2) for p in prompts]

    calls = []

    def scorer(label, records):
        calls.append((label, [r.id for r in records]))
        return random_matrices(len(records), records[0].num_constitutions, seed=len(calls))

    queries = [Query(f"q{i}", f"question {i}?") for i in range(3)]
    cset = load_constitution_set("dialogue")
    results = mi.evaluate_model(tmp_path / "no-model", queries, cset, PromptTemplate(), GenerationConfig(), 2,
                                lambda split: tmp_path / split, 7, "test", backend_factory=Echo, scorer=scorer)
    assert calls == [("learned", ["q0", "q1", "q2"])] and list(results) == ["learned"]
    assert results["learned"] == mi.estimates(random_matrices(3, 4, seed=1))
