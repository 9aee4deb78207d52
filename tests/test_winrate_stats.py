"""Win-rate arithmetic against straightforward implementations on fixed inputs: verdict parsing,
A/B placement, the confidence interval, the length-balanced rate and the aggregation."""

import math
import random

import pytest

from megatron_sami.evaluation.winrate import (
    Comparison,
    judge_messages,
    length_balanced,
    parse_verdict,
    placed_first,
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
    assert length_balanced(scores, longer) == pytest.approx(
        straightforward_length_balanced(scores, test_lengths, baseline_lengths), abs=1e-12)
    # A judge that always picks the longer response is exactly neutral once lengths are balanced.
    by_length = [1.0 if flag else 0.0 for flag in longer]
    assert win_rate(by_length).mean != 0.5
    assert length_balanced(by_length, longer) == 0.5
    # One group only: the mean of that group.
    assert length_balanced([1.0, 0.0, 1.0], [True, True, True]) == pytest.approx(2 / 3)


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
