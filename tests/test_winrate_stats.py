"""Win-rate arithmetic against straightforward implementations on fixed inputs: verdict parsing,
A/B placement, the confidence interval, the length-balanced and length-controlled rates (and when
they are undefined), the aggregation and its table, and baseline labels."""

import math
import random

import pytest

from megatron_sami.errors import ConfigError
from megatron_sami.evaluation.pairwise import format_table, parse_baselines
from megatron_sami.evaluation.winrate import (
    Comparison,
    judge_messages,
    length_balanced,
    length_controlled,
    parse_verdict,
    placed_first,
    rate_text,
    summarize,
    win_rate,
    win_score,
)


@pytest.mark.parametrize(("reply", "verdict"), [
    ("Response A is kinder.\nPreferred: A", "A"),
    ("B explains the steps.\nPreferred: B", "B"),
    ("Preferred response: **B**", "B"),
    ("preferred - (A)", "A"),
    ("First thoughts. Preferred: A\nOn reflection:\nPreferred: B", "B"),  # the last final line counts
    ("A", "A"),
    ("B.", "B"),
    ("Preferred: A or B, they are equal", None),  # both letters
    ("Preferred: AB", None),  # a two-letter verdict
    ("Preferred: neither", None),
    ("I think A is better than B", None),  # no final line, more than a letter
    ("", None),
])
def test_verdict_parsing(reply, verdict):
    assert parse_verdict(reply) == verdict


def comparison(index: int, test: str = "test text", baseline: str = "baseline text") -> Comparison:
    return Comparison(f"q{index}", f"query {index}", "learned", "helpful", "Be helpful.", test, baseline)


def test_swapping_the_placement_flips_the_verdict_mapping():
    for verdict in ("A", "B"):
        assert win_score(verdict, True) == 1.0 - win_score(verdict, False)
    assert win_score(None, True) == win_score(None, False) == 0.5
    for index in range(20):
        item = comparison(index)
        user = judge_messages(item, seed=7)[1]["content"]
        a_part, b_part = user.split("Response A:")[1].split("Response B:")
        test_in_a = "test text" in a_part and "baseline text" in b_part
        assert test_in_a == placed_first(item, seed=7)
        # A judge that prefers the test response wins it the comparison wherever it was placed.
        preferred = "A" if test_in_a else "B"
        assert win_score(preferred, placed_first(item, seed=7)) == 1.0


def test_placement_is_seeded_balanced_and_order_independent():
    items = [comparison(i) for i in range(400)]
    placements = [placed_first(item, seed=3) for item in items]
    assert 160 < sum(placements) < 240
    assert placements == [placed_first(item, seed=3) for item in items]
    shuffled = items[:]
    random.Random(0).shuffle(shuffled)
    assert {i.key: placed_first(i, 3) for i in shuffled} == {i.key: p for i, p in zip(items, placements, strict=True)}
    assert placements != [placed_first(item, seed=4) for item in items]


def straightforward_interval(scores):
    n = len(scores)
    mean = sum(scores) / n
    variance = sum((s - mean) ** 2 for s in scores) / (n - 1)
    half = 1.96 * math.sqrt(variance / n)
    return mean, max(0.0, mean - half), min(1.0, mean + half)


def straightforward_length_balanced(scores, test_lengths, baseline_lengths):
    longer, not_longer = [], []
    for score, t, b in zip(scores, test_lengths, baseline_lengths, strict=True):
        (longer if t > b else not_longer).append(score)
    groups = [g for g in (longer, not_longer) if g]
    return sum(sum(g) / len(g) for g in groups) / len(groups)


def test_interval_and_length_balance_match_straightforward_implementations():
    rng = random.Random(11)
    scores = [rng.choice([0.0, 0.5, 1.0, 1.0]) for _ in range(57)]
    test_lengths = [rng.randint(10, 300) for _ in scores]
    baseline_lengths = [rng.randint(10, 300) for _ in scores]
    rate = win_rate(scores)
    assert (rate.mean, rate.low, rate.high) == pytest.approx(straightforward_interval(scores), abs=1e-12)
    longer = [t > b for t, b in zip(test_lengths, baseline_lengths, strict=True)]
    assert length_balanced(scores, longer).mean == pytest.approx(
        straightforward_length_balanced(scores, test_lengths, baseline_lengths), abs=1e-12)
    # A judge that always picks the longer response is exactly neutral once lengths are balanced.
    by_length = [1.0 if flag else 0.0 for flag in longer]
    assert win_rate(by_length).mean != 0.5
    assert length_balanced(by_length, longer).mean == 0.5
    # One group only: undefined, with the reason (it used to be that group's mean).
    one_group = length_balanced([1.0, 0.0, 1.0], [True, True, True])
    assert one_group.mean is None and one_group.low is None and "longer in all 3" in one_group.reason


def test_summary_splits_principles_and_counts():
    rows = []
    for index in range(6):
        for split, principle in (("learned", "helpful"), ("learned", "harmless"), ("heldout", "concise")):
            verdict = [None, "A", "B"][index % 3]
            rows.append({"split": split, "principle": principle, "verdict": verdict,
                         "score": win_score(verdict, index % 2 == 0), "status": "malformed" if index == 5 else "ok",
                         "test": "x" * (10 + index), "baseline": "y" * 12})
    summary = summarize(rows)
    assert summary["all"]["win_rate"]["n"] == 18
    learned = summary["splits"]["learned"]
    assert learned["win_rate"]["n"] == 12 and set(learned["principles"]) == {"helpful", "harmless"}
    assert learned["undecided"] == 4 and learned["malformed"] == 2
    helpful = [r["score"] for r in rows if r["principle"] == "helpful"]
    assert learned["principles"]["helpful"]["win_rate"]["mean"] == pytest.approx(sum(helpful) / len(helpful))
    assert learned["lengths"]["test_longer_fraction"] == pytest.approx(3 / 6)


def test_the_judge_sees_the_constitution_and_the_principle_judged():
    item = Comparison("q1", "How do I fix a leak?", "learned", "harmless", "Avoid harm.", "test text",
                      "baseline text", constitution="1. Be helpful.\n2. Avoid harm.")
    system, user = judge_messages(item, seed=0)
    assert system["role"] == "system" and user["role"] == "user"
    assert "1. Be helpful.\n2. Avoid harm." in user["content"] and "principle of the constitution: Avoid harm." in \
        user["content"]
    assert "How do I fix a leak?" in user["content"] and user["content"].rstrip().endswith('"Preferred: B".')


# -- length-adjusted rates ---------------------------------------------------------------------------

def judged_rows(test_lengths, baseline_lengths, scores) -> list[dict]:
    return [{"split": "learned", "principle": "helpful", "verdict": None if s == 0.5 else "A", "score": s,
             "status": "ok", "test": "t" * t, "baseline": "b" * b}
            for t, b, s in zip(test_lengths, baseline_lengths, scores, strict=True)]


def test_a_length_only_judge_and_an_always_longer_model_give_undefined_rates_not_one():
    # The example: the test response is longer everywhere and the judge prefers the longer one.
    rows = judged_rows([50 + i for i in range(12)], [20] * 12, [1.0] * 12)
    block = summarize(rows)["all"]
    assert block["win_rate"]["mean"] == 1.0
    balanced, controlled = block["length_balanced"], block["length_controlled"]
    assert balanced["mean"] is None and balanced["groups"] == [12, 0] and "longer in all 12" in balanced["reason"]
    assert controlled["mean"] is None and "no finite regression fit" in controlled["reason"]
    table = format_table([{"label": "iter1", "baseline": "base", "result": summarize(rows)}])
    assert all(line.count("n/a") == 2 for line in table.splitlines()[1:3])  # both length columns, both rows
    assert "longer in all 12" in table and "no finite regression fit" in table


def straightforward_balanced_interval(groups, z=1.96):
    """Average of two group means; interval from the groups padded with one 0 and one 1."""
    def mean(xs):
        return sum(xs) / len(xs)

    def variance(xs):
        m = mean(xs)
        return sum((x - m) ** 2 for x in xs) / (len(xs) - 1)

    padded = [g + [0.0, 1.0] for g in groups]
    centre = (mean(padded[0]) + mean(padded[1])) / 2
    half = z * math.sqrt(variance(padded[0]) / len(padded[0]) + variance(padded[1]) / len(padded[1])) / 2
    return (mean(groups[0]) + mean(groups[1])) / 2, max(0.0, centre - half), min(1.0, centre + half)


@pytest.mark.parametrize(("longer", "not_longer"), [
    ([1.0] * 30, [0.0] * 30),  # a length-only judge, balanced
    ([1.0], [0.0] * 59),  # one comparison in a group
    ([1.0, 0.5, 0.0, 1.0], [0.5] * 7),
])
def test_balanced_interval_reflects_the_group_sizes(longer, not_longer):
    rate = length_balanced(longer + not_longer, [True] * len(longer) + [False] * len(not_longer))
    assert (rate.mean, rate.low, rate.high) == pytest.approx(straightforward_balanced_interval([longer, not_longer]))
    assert rate.groups == (len(longer), len(not_longer)) and rate.high - rate.low > 0.05


def test_a_group_of_one_widens_the_balanced_interval():
    big = length_balanced([1.0] * 30 + [0.0] * 30, [True] * 30 + [False] * 30)
    lopsided = length_balanced([1.0] + [0.0] * 59, [True] + [False] * 59)
    assert big.mean == lopsided.mean == 0.5
    assert lopsided.high - lopsided.low > 2 * (big.high - big.low)


def torch_length_controlled(scores, diffs, ridge=1.0):
    """The same penalised fit, by torch's L-BFGS in float64."""
    import torch

    d = torch.tensor(diffs, dtype=torch.float64)
    x = torch.tanh(d / d.std(unbiased=False))
    y = torch.tensor(scores, dtype=torch.float64)
    b = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([b], max_iter=500, tolerance_grad=1e-12, tolerance_change=1e-15,
                                  line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        eta = b[0] + b[1] * x
        loss = torch.nn.functional.binary_cross_entropy_with_logits(eta, y, reduction="sum") + ridge * b[1] ** 2 / 2
        loss.backward()
        return loss

    optimizer.step(closure)
    return torch.sigmoid(b[0]).item()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_length_controlled_matches_a_torch_fit_of_the_same_model(seed):
    rng = random.Random(seed)
    diffs = [rng.randint(-300, 400) for _ in range(80)]
    scores = [rng.choice([0.0, 0.5, 1.0]) if d < 100 else rng.choice([0.5, 1.0, 1.0]) for d in diffs]
    rate = length_controlled(scores, diffs)
    assert rate.mean == pytest.approx(torch_length_controlled(scores, diffs), abs=1e-6)
    assert rate.low < rate.mean < rate.high and rate.reason is None and rate.n == 80


def test_length_controlled_recovers_the_preference_at_equal_length():
    # True model: P(test wins) = sigmoid(0.4 + 2.5 * tanh(d / sd(d))); the test model is mostly longer.
    rng = random.Random(7)
    diffs = [rng.gauss(150, 200) for _ in range(3000)]
    spread = (sum((d - sum(diffs) / len(diffs)) ** 2 for d in diffs) / len(diffs)) ** 0.5
    scores = [1.0 if rng.random() < 1 / (1 + math.exp(-(0.4 + 2.5 * math.tanh(d / spread)))) else 0.0
              for d in diffs]
    truth = 1 / (1 + math.exp(-0.4))
    rate = length_controlled(scores, diffs)
    assert abs(win_rate(scores).mean - truth) > 0.15  # the raw rate is far off
    assert rate.low <= truth <= rate.high and abs(rate.mean - truth) < 0.04


def test_length_controlled_special_cases():
    symmetric = [40, -40, 10, -10, 200, -200]
    only_length = length_controlled([1.0 if d > 0 else 0.0 for d in symmetric], symmetric)
    assert only_length.mean == pytest.approx(0.5, abs=1e-12)  # a judge that prefers only length
    assert length_controlled([1.0, 0.0, 0.5, 1.0], [0, 0, 0, 0]).mean == pytest.approx(0.625)  # no length signal
    same = length_controlled([1.0, 0.0, 1.0], [7, 7, 7])
    assert same.mean is None and "same length difference" in same.reason
    assert "baseline response in all 2" in length_controlled([0.0, 0.0], [3, -5]).reason
    assert length_controlled([], []).mean is None
    small = length_controlled([1.0, 0.0, 1.0, 0.5], [30, -20, 10, 0])
    large = length_controlled([1.0, 0.0, 1.0, 0.5] * 16, [30, -20, 10, 0] * 16)
    assert (large.high - large.low) < (small.high - small.low) / 2


@pytest.mark.parametrize(("rate", "text"), [
    ({"mean": 0.71234, "low": 0.6, "high": 0.81, "n": 9}, "0.712 [0.60, 0.81]"),
    ({"mean": None, "low": None, "high": None, "n": 9, "reason": "why"}, "n/a"),
    (0.25, "0.250"),  # results written before the interval existed
    (None, "n/a"),
    (float("nan"), "n/a"),
])
def test_rate_text(rate, text):
    assert rate_text(rate) == text


# -- baseline labels name folders ---------------------------------------------------------------------

@pytest.mark.parametrize("spec", ["../../x=/m", "a/b=/m", "/abs=/m", ".hidden=/m", "..=/m", "a b=/m", "base=/m",
                                  "iter2=/m", "x" * 65 + "=/m", "=/m", "lab\\el=/m"])
def test_baseline_labels_that_are_not_plain_names_are_refused(spec):
    with pytest.raises(ConfigError, match="label|LABEL=HF_DIR"):
        parse_baselines(["base", spec])


def test_plain_baseline_labels_are_accepted_and_repeats_refused():
    assert parse_baselines(["base", "instruct=/m", "Mistral-7B_v0.2=/n"]) == [
        ("base", None), ("instruct", "/m"), ("Mistral-7B_v0.2", "/n")]
    with pytest.raises(ConfigError, match="given twice"):
        parse_baselines(["a=/m", "a=/n"])


@pytest.mark.parametrize("label", ["../../escaped", "sub/dir"])
def test_sami_eval_model_labels_cannot_leave_the_output_folder(label, tmp_path, capsys):
    from megatron_sami.cli.eval import main

    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    out = tmp_path / "a" / "b" / "out"
    with pytest.raises(SystemExit) as exit_info:
        main(["mi", "--model", f"{label}={tmp_path / 'model'}", "--out", str(out)])
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert exit_info.value.code == 2 and len(errors) == 1 and "plain name" in errors[0]
    assert sorted(path.name for path in tmp_path.rglob("*")) == ["config.json", "model"]
