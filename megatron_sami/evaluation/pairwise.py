"""Win-rate evaluation: responses of a test and a baseline model, judged principle by principle.

The protocol follows Fränken et al. 2024, "Self-Supervised Alignment with Mutual Information:
Learning to Follow Principles without Preference Labels", arXiv:2404.14313: an LLM judge sees
the constitution, A/B positions are randomised with a fixed seed, and undecided verdicts count
0.5 (:mod:`megatron_sami.evaluation.winrate`).

Responses are greedy, under the positive constitution of each evaluation query (the same
principles the MI evaluation draws for that query). Each (query, principle of its constitution)
is one comparison; the judge sees that principle, the query and both responses in an A/B order
fixed by the seed. Learned (train) and held-out principles are reported separately.

A response row: ``{"id", "query", "split", "constitution", "principles", "response"}``; the
``responses/*.jsonl`` files an evaluation writes are in that format, and so are the files
``sami-eval winrate --test-records/--baseline-records`` reads.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from megatron_sami.alignment.data import PromptTemplate
from megatron_sami.errors import ConfigError, SamiError
from megatron_sami.evaluation.judge import JudgeClient, JudgeConfig, check_judge  # noqa: F401 (driver)
from megatron_sami.evaluation.splits import SPLIT_LABELS, split_label, splits_of  # noqa: F401 (driver)
from megatron_sami.evaluation.winrate import (
    Comparison,
    judge_messages,
    parse_verdict,
    placed_first,
    rate_mean,
    rate_text,
    summarize,
    win_score,
)
from megatron_sami.io import atomic_output, atomic_write_json, atomic_write_jsonl
from megatron_sami.rollout.constitutions import (
    ConstitutionSet,
    SamplingConfig,
    positive_constitution,  # noqa: F401 (its old home; the sampler named "positive")
)
from megatron_sami.rollout.generation import (
    GenerationConfig,
    GenerationTask,
    make_backend,
    read_shards,
    run_task,
)
from megatron_sami.rollout.queries import Query

logger = logging.getLogger(__name__)

# A label names folders (responses/LABEL, iterN-vs-LABEL): one plain path component, never '..'.
_LABEL = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
# The run's own models: a baseline labelled so would share their folders.
_RESERVED_BASELINE = re.compile(r"base|iter\d+")


def check_label(label: str, spec: str, option: str) -> None:
    """Refuse a model label that is not one plain folder name (``../x``, ``a/b``, empty).

    Raises:
        ConfigError: naming the spec and what a label may hold.
    """
    if not _LABEL.fullmatch(label):
        raise ConfigError(f"{option} '{spec}': the label '{label}' must be a plain name of letters, digits, '.', "
                          f"'_' and '-' that starts with a letter or digit (at most 64 characters), e.g. "
                          f"instruct=/models/Mistral-7B-Instruct-v0.2.")


@dataclass
class WinRateConfig:
    """``sami-iterate``'s ``winrate`` section: judge each iteration against its baselines.

    Raises:
        ConfigError: enabled without a judge URL and model, a malformed baseline, or
            ``principles_per_query`` < 1.
    """

    enabled: bool = False
    judge: JudgeConfig = field(default_factory=JudgeConfig)
    baselines: list[str] = field(default_factory=lambda: ["base"])  # "base" or LABEL=HF_DIR (an instruct model)
    principles_per_query: int = 2
    max_new_tokens: int = 0  # 0: the generation's max_new_tokens
    seed: int = 0  # A/B placement

    def __post_init__(self) -> None:
        if self.enabled:
            self.judge.require()
        parse_baselines(self.baselines)
        if self.principles_per_query < 1:
            raise ConfigError("winrate.principles_per_query must be at least 1.")


def parse_baselines(specs: list[str]) -> list[tuple[str, str | None]]:
    """``(label, HF directory)`` per baseline spec: ``("base", None)`` for the run's base model.

    Raises:
        ConfigError: a spec is neither ``base`` nor ``LABEL=HF_DIR``, a label is not a plain
            folder name (:func:`check_label`) or is ``base``/``iterN``, or two baselines share a label.
    """
    out = []
    for spec in specs:
        if spec == "base":
            out.append(("base", None))
            continue
        label, _, path = spec.partition("=")
        if not path or not label:
            raise ConfigError(f"baseline '{spec}' must be 'base' or LABEL=HF_DIR, e.g. instruct=/models/Mistral-7B-"
                              f"Instruct-v0.2.")
        check_label(label, spec, "baseline")
        if _RESERVED_BASELINE.fullmatch(label):
            raise ConfigError(f"baseline '{spec}': the label '{label}' names one of the run's own models (base, "
                              f"iterN); choose another, e.g. instruct={path}.")
        out.append((label, path))
    labels = [label for label, _ in out]
    repeated = sorted({label for label in labels if labels.count(label) > 1})
    if repeated:
        raise ConfigError(f"baseline label '{repeated[0]}' is given twice; give each baseline its own label.")
    return out


def sampling_for(cset: ConstitutionSet, split: str, principles_per_query: int) -> SamplingConfig:
    """The principles drawn per query of ``split``: as many as the MI evaluation draws."""
    # num_constitutions is unused here: one (positive) constitution per query.
    return SamplingConfig(num_constitutions=2, principles_per_query=min(principles_per_query, len(cset.pool(split))),
                          split=split)


def response_rows(records: list[dict], split: str) -> list[dict]:
    """Rows of the positive (first) constitution's response of each record."""
    return [{"id": r["id"], "query": r["query"], "split": split, "constitution": r["constitutions"][0],
             "principles": r["metadata"]["principles"], "response": r["responses"][0]} for r in records]


def generate_responses(model_dir: Path, queries: list[Query], cset: ConstitutionSet, template: PromptTemplate,
                       generation: GenerationConfig, principles_per_query: int, out_dir: Path, seed: int,
                       before_shard=None) -> list[dict]:
    """Greedy responses under the positive constitution, per principle split, in resumable shards
    under ``out_dir/{learned,heldout}/``; returns response rows (see the module docstring).

    Raises:
        ConfigError: ``model_dir`` is not an HF model directory, or too few principles.
        EnvironmentSetupError: the generation backend cannot run here.
    """
    greedy = GenerationConfig(**{**vars(generation), "temperature": 0.0})
    rows = []
    for task in response_tasks(cset, principles_per_query, out_dir, seed):
        shards = run_task(lambda: make_backend(model_dir, greedy), queries, cset, template, task, greedy.shard_size,
                          before_shard=before_shard)
        rows += response_rows(read_shards(shards), task.sampling.split)
    return rows


def response_tasks(cset: ConstitutionSet, principles_per_query: int, out_dir: Path, seed: int) -> list[GenerationTask]:
    """What :func:`generate_responses` generates, one task per principle split (a launched
    ``megatron_sami.cli.generate`` job can run them beforehand, which it then reads)."""
    return [GenerationTask(str(out_dir / split_label(split)), sampling_for(cset, split, principles_per_query),
                           "positive", seed) for split in splits_of(cset)]


def read_response_rows(path: Path) -> list[dict]:
    """The response rows of a JSONL file (see the module docstring for their keys).

    Raises:
        SamiError: a line is not JSON or lacks a key, or the file has no rows.
    """
    rows = []
    with path.open() as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError:
                raise SamiError(f"{path}:{number} is not JSON.") from None
            missing = [key for key in ("id", "query", "split", "principles", "response") if key not in row]
            if missing:
                raise SamiError(f"{path}:{number} lacks {', '.join(missing)}; response rows need id, query, split "
                                f"(train or heldout), principles (names) and response.")
            rows.append(row)
    if not rows:
        raise SamiError(f"{path} has no response rows.")
    return rows


def make_comparisons(test_rows: list[dict], baseline_rows: list[dict], cset: ConstitutionSet) -> list[Comparison]:
    """One comparison per (query, principle of its constitution) present in both sets of rows.

    Raises:
        SamiError: a principle is not in ``cset``, or the two sets share no query.
    """
    definitions = {p.name: p.definition for p in cset.principles}
    baseline = {(r["split"], r["id"]): r for r in baseline_rows}
    comparisons = []
    for row in test_rows:
        other = baseline.get((row["split"], row["id"]))
        if other is None:
            continue
        unknown = [name for name in row["principles"] if name not in definitions]
        if unknown:
            raise SamiError(f"principle '{unknown[0]}' of query {row['id']} is not in the constitution set "
                            f"'{cset.name}'; evaluate with the set the responses were generated under.")
        constitution = row.get("constitution") or "\n".join(
            f"{number}. {definitions[name]}" for number, name in enumerate(row["principles"], start=1))
        for name in row["principles"]:
            comparisons.append(Comparison(row["id"], row["query"], split_label(row["split"]), name,
                                          definitions[name], row["response"], other["response"], constitution))
    if not comparisons:
        raise SamiError("the test and baseline responses share no query; generate both on the same queries.")
    return comparisons


def judge_comparisons(comparisons: list[Comparison], client: JudgeClient, seed: int) -> list[dict]:
    """Ask the judge about every comparison (cached replies reused); rows with verdict and score.

    ``seed`` fixes each comparison's A/B placement (:func:`~megatron_sami.evaluation.winrate.placed_first`).

    Raises:
        JudgeError: the judge is unreachable while some comparison is not cached.
    """
    uncached = [c for c in comparisons if client.cached(judge_messages(c, seed)) is None]
    if uncached:
        client.check_reachable()
    logger.info("judge: %d comparisons, %d cached, %d to ask (%d at a time)", len(comparisons),
                len(comparisons) - len(uncached), len(uncached), client.cfg.concurrency)
    start, progress, asked = time.perf_counter(), threading.Lock(), [0]

    def judge(comparison: Comparison) -> dict:
        test_first = placed_first(comparison, seed)
        reply = client.complete(judge_messages(comparison, seed))
        verdict = parse_verdict(reply.text) if reply.text is not None else None
        if not reply.cached:
            with progress:
                asked[0] += 1
                if asked[0] % 10 == 0 or asked[0] == len(uncached):
                    elapsed = time.perf_counter() - start
                    logger.info("judge: %d/%d asked, %.1f per s, ETA %.0f s", asked[0], len(uncached),
                                asked[0] / elapsed, elapsed / asked[0] * (len(uncached) - asked[0]))
        return {"key": comparison.key, "query_id": comparison.query_id, "split": comparison.split,
                "principle": comparison.principle, "test_first": test_first, "verdict": verdict,
                "score": win_score(verdict, test_first), "status": reply.status, "judge_reply": reply.text,
                "test": comparison.test, "baseline": comparison.baseline}

    with ThreadPoolExecutor(max_workers=client.cfg.concurrency) as pool:
        return list(pool.map(judge, comparisons))


def evaluate_pair(test_rows: list[dict], baseline_rows: list[dict], cset: ConstitutionSet, judge_cfg: JudgeConfig,
                  out_dir: Path, seed: int, cache_dir: Path | None = None) -> dict:
    """Judge a test set of responses against a baseline's; writes judgements.jsonl and result.json.

    Args:
        seed: the A/B placement seed.
        cache_dir: the judge's reply cache (default: ``judge_cfg.cache_dir``, else
            ``out_dir/../judge-cache``).

    Returns:
        :func:`~megatron_sami.evaluation.winrate.summarize`'s result (win rates with 95%
        intervals, per split and principle, and length-balanced) plus the judge and the seed.

    Raises:
        SamiError: as :func:`make_comparisons`.
        JudgeError: as :func:`judge_comparisons`.
    """
    client = JudgeClient(judge_cfg, cache_dir or Path(judge_cfg.cache_dir or out_dir.parent / "judge-cache"))
    judged = judge_comparisons(make_comparisons(test_rows, baseline_rows, cset), client, seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_jsonl(out_dir / "judgements.jsonl", judged)
    result = summarize(judged) | {"judge": {"model": judge_cfg.model, "url": judge_cfg.base_url}, "seed": seed}
    atomic_write_json(out_dir / "result.json", result)
    return result


def winrate_of_rows(test_rows: list[dict], baseline_rows: list[dict], cset: ConstitutionSet,
                    judge_cfg: JudgeConfig, out_dir: Path, seed: int) -> list[dict]:
    """``sami-eval winrate``'s pair mode on response rows: both sets saved under ``out_dir/responses/``,
    judged by :func:`evaluate_pair` into ``out_dir``, plotted to ``out_dir/winrate.png``.

    Returns:
        The table row ``[{"label": "test", "iteration": 1, "baseline": "baseline", "result"}]``.

    Raises:
        SamiError, JudgeError: as :func:`evaluate_pair`.
    """
    (out_dir / "responses").mkdir(parents=True, exist_ok=True)
    atomic_write_jsonl(out_dir / "responses" / "test.jsonl", test_rows)
    atomic_write_jsonl(out_dir / "responses" / "baseline.jsonl", baseline_rows)
    result = evaluate_pair(test_rows, baseline_rows, cset, judge_cfg, out_dir, seed)
    rows = [{"label": "test", "iteration": 1, "baseline": "baseline", "result": result}]
    plot_winrates(rows, out_dir / "winrate.png")
    return rows


def winrate_of_models(test_dir: Path, baseline_dir: Path, queries: list[Query], cset: ConstitutionSet,
                      template: PromptTemplate, generation: GenerationConfig, principles_per_query: int,
                      out_dir: Path, seed: int, judge_cfg: JudgeConfig, position_seed: int) -> list[dict]:
    """``sami-eval winrate``'s pair mode on two HF models: :func:`generate_responses` of each
    (``seed``: the principles drawn), then :func:`winrate_of_rows` (``position_seed``: A/B placement).
    The judge is asked once (:func:`~megatron_sami.evaluation.judge.check_judge`) before anything
    is generated, so a wrong address or key fails in seconds, not after hours of generation.

    Raises:
        ConfigError, EnvironmentSetupError: as :func:`generate_responses`.
        SamiError, JudgeError: as :func:`evaluate_pair`; JudgeError also before generation.
    """
    check_judge(judge_cfg)
    test_rows, baseline_rows = (
        generate_responses(path, queries, cset, template, generation, principles_per_query,
                           out_dir / "responses" / label, seed)
        for label, path in (("test", test_dir), ("baseline", baseline_dir)))
    return winrate_of_rows(test_rows, baseline_rows, cset, judge_cfg, out_dir, position_seed)


def format_table(rows: list[dict]) -> str:
    """rows: {label, baseline, result}; one line per split and per principle, then the reason of
    each length-adjusted rate shown as n/a (undefined), once per distinct reason."""
    header = (f"{'model':<10} {'vs':<10} {'principles':<22} {'n':>4} {'win rate [95% CI]':>22} "
              f"{'length-balanced':>22} {'length-controlled':>22} {'undecided':>9} {'malformed':>9} "
              f"{'chars test/base':>16}")
    lines, reasons = [header], {}  # (measure, reason) -> where it applies
    for row in rows:
        for split, block in row["result"]["splits"].items():
            entries = [(split, block)] + [(f"  {name}", sub) for name, sub in block["principles"].items()]
            for name, values in entries:
                rate, lengths = values["win_rate"], values["lengths"]
                adjusted = [values.get(key) for key in ("length_balanced", "length_controlled")]
                for key, value in zip(("length-balanced", "length-controlled"), adjusted, strict=True):
                    if isinstance(value, dict) and value.get("reason"):
                        where = reasons.setdefault((key, value["reason"]), [])
                        where.append(f"{row['label']} vs {row['baseline']} {name.strip()}")
                lines.append(f"{row['label']:<10} {row['baseline']:<10} {name:<22} {rate['n']:>4} "
                             f"{rate_text(rate):>22} {rate_text(adjusted[0]):>22} {rate_text(adjusted[1]):>22} "
                             f"{values['undecided']:>9} {values['malformed']:>9} "
                             f"{lengths['test_mean_chars']:>7.0f}/{lengths['baseline_mean_chars']:<8.0f}")
    notes = [f"{key} n/a ({', '.join(where[:4])}{', ...' if len(where) > 4 else ''}): {reason}"
             for (key, reason), where in reasons.items()]
    return "\n".join(lines + notes)


def plot_winrates(rows: list[dict], path: Path) -> None:
    """Win rate (with its 95% interval), the length-balanced and the length-controlled win rates
    across iterations, one panel per principle split, one line per baseline (an undefined rate is
    a gap)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    splits = sorted({split for row in rows for split in row["result"]["splits"]})
    fig, axes = plt.subplots(1, len(splits), figsize=(5.5 * len(splits), 4), squeeze=False)
    for axis, split in zip(axes[0], splits, strict=True):
        for baseline in sorted({row["baseline"] for row in rows}):
            mine = [row for row in rows if row["baseline"] == baseline and split in row["result"]["splits"]]
            xs = [row["iteration"] for row in mine]
            rates = [row["result"]["splits"][split]["win_rate"] for row in mine]
            means = [r["mean"] for r in rates]
            errors = [[m - r["low"] for m, r in zip(means, rates, strict=True)],
                      [r["high"] - m for m, r in zip(means, rates, strict=True)]]
            axis.errorbar(xs, means, yerr=errors, marker="o", capsize=3, label=f"vs {baseline}")
            for key, style in (("length_balanced", "--x"), ("length_controlled", ":s")):
                axis.plot(xs, [rate_mean(row["result"]["splits"][split].get(key)) for row in mine], style,
                          label=f"vs {baseline} ({key.replace('_', '-')})")
        axis.axhline(0.5, color="grey", linewidth=0.8)
        axis.set_ylim(0, 1)
        axis.set_xticks(sorted({row["iteration"] for row in rows}))
        axis.set_xlabel("iteration")
        axis.set_ylabel("win rate")
        axis.set_title(f"{split} principles")
        axis.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(path) as staging:
        fig.savefig(staging, dpi=120)
    plt.close(fig)
