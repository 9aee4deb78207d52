"""What an expert-iteration run measured, read from the run directory that
:func:`megatron_sami.iteration.driver.run_iterations` wrote.

:func:`report` prints, in a few lines (``bash scripts/demo.sh`` shows it), the filter counts, the
last training step of each iteration, both MI estimators of the base model and the last
iteration, the win rates, the side-by-side samples and the phase split (where the time went):

    python -m megatron_sami.cli.report --run-dir RUN_DIR

:func:`mi_of_run` and :func:`winrate_of_run` are ``sami-eval``'s ``--run-dir`` modes.

The whole-iteration scaling study (beside the training-only one of ``slurm/scaling_study.py``):
every phase records its wall time, the allocation's node count and the tokens it processed in
``state.json`` (:func:`phase_tokens`); :func:`phase_split` sums them per phase kind and
:func:`write_iteration_scaling` puts runs at several node counts side by side:

    python -m megatron_sami.cli.report --scaling RUN_1NODE RUN_2NODES --out STUDY_DIR
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

from megatron_sami.errors import SamiError
from megatron_sami.evaluation.judge import JudgeConfig


def report(run_dir: Path) -> int:
    """Print the run's summary; returns 0 when the run is complete, 1 otherwise.

    Raises:
        SamiError: ``run_dir`` has no ``summary.json`` (not a run directory, or not started).
    """
    if not (run_dir / "summary.json").is_file():
        raise SamiError(f"{run_dir} has no summary.json; give the run_dir of a sami-iterate run.")
    summary = json.loads((run_dir / "summary.json").read_text())
    rows = [row for row in summary["iterations"] if "mi" in row]
    for row in summary["iterations"]:
        if "filter" in row:
            last = row["train_last_step"]
            print(f"iteration {row['iteration']}: filters kept {row['filter']['kept']} of {row['filter']['input']}; "
                  f"last training step: loss {last['loss']:.4f}, MI bound {last['mi_bound_nats']:.3f} nats")
    first, final = rows[0]["mi"]["learned"], rows[-1]["mi"]["learned"]
    for key, label in (("info_nce_bound", "InfoNCE bound"), ("paper_mi", "paper estimator")):
        change = final[key]["mean"] - first[key]["mean"]
        print(f"{label}: base {first[key]['mean']:.3f} -> iteration {rows[-1]['iteration']} "
              f"{final[key]['mean']:.3f} nats ({'rose' if change > 0 else 'did not rise'} by {change:+.3f}; "
              f"standard errors {first[key]['se']:.3f} / {final[key]['se']:.3f}, n = {final[key]['n']})")
    from megatron_sami.evaluation.winrate import rate_text

    for path in sorted((run_dir / "winrate").glob("iter*-vs-base/result.json")):
        result = json.loads(path.read_text())["all"]
        rate = result["win_rate"]
        # A length-adjusted rate may be undefined (None, with its reason) or, in older results, a bare number.
        print(f"{path.parent.name}: win rate {rate_text(rate)} over {rate['n']} judged comparisons "
              f"({result['undecided']} undecided), length-balanced {rate_text(result.get('length_balanced'))}, "
              f"length-controlled {rate_text(result.get('length_controlled'))}")
    samples = run_dir / "samples.md"
    if samples.is_file():
        print(samples.read_text())
    if (run_dir / "state.json").is_file():
        print("Where the time went (phase wall time summed over iterations; tokens/s over that time):")
        print(format_phase_split(phase_split(run_dir)))
    return 0 if summary["complete"] else 1


def mi_of_run(run_dir: Path) -> list[dict]:
    """The summary rows of a run that hold MI estimates (``{"iteration", "mi", ...}``), plotted
    to ``run_dir/mi.png``.

    Raises:
        SamiError: ``run_dir`` has no ``summary.json`` or no MI evaluation yet.
    """
    from megatron_sami.evaluation import mi

    summary_path = run_dir / "summary.json"
    if not summary_path.is_file():
        raise SamiError(f"{run_dir} has no summary.json; is it a sami-iterate run directory?")
    rows = [row for row in json.loads(summary_path.read_text())["iterations"] if "mi" in row]
    if not rows:
        raise SamiError(f"{run_dir} has no MI evaluations yet (evaluation.enabled=false, or no phase "
                        f"finished).")
    mi.plot_mi(rows, run_dir / "mi.png")
    return rows


def winrate_of_run(run_dir: Path, judge: JudgeConfig, baselines: list[str], position_seed: int) -> list[dict]:
    """Every exported iteration of a run judged against each baseline, as ``sami-iterate``'s
    winrate phase does (:meth:`~megatron_sami.iteration.driver.Run.winrate`), into
    ``run_dir/winrate/``; plotted to ``run_dir/winrate.png``.

    Args:
        baselines: ``base`` or ``LABEL=HF_DIR`` each; empty: the run's ``winrate.baselines``.
        position_seed: the A/B placement seed.

    Returns:
        One row per (iteration, baseline): ``{"label", "iteration", "baseline", "result"}``.

    Raises:
        SamiError: ``run_dir`` is not a run directory, or has no exported iteration yet.
        ConfigError: a malformed baseline, or a run configuration that no longer validates.
        JudgeError: the judge is unreachable while some comparison is not cached.
    """
    from omegaconf import OmegaConf

    from megatron_sami.evaluation.pairwise import parse_baselines, plot_winrates
    from megatron_sami.iteration.driver import IterateConfig, Run, winrate_rows
    from megatron_sami.typed_config import to_typed

    config_file = run_dir / "config.yaml"
    if not config_file.is_file():
        raise SamiError(f"{run_dir} has no config.yaml; is it a sami-iterate run directory?")
    cfg = to_typed(IterateConfig, OmegaConf.load(config_file), "iterate")
    if baselines:
        parse_baselines(baselines)
        cfg.winrate.baselines = list(baselines)
    cfg.winrate.seed = position_seed
    run = Run(cfg, None)
    exported = [t for t in range(1, cfg.iterations + 1) if (run.model_hf(t) / "config.json").is_file()]
    if not exported:
        raise SamiError(f"{run_dir} has no exported iteration yet (iterN/hf); let sami-iterate finish one.")
    rows = winrate_rows([{"iteration": t, "winrate": run.winrate(t, judge)} for t in exported])
    plot_winrates(rows, run_dir / "winrate.png")
    return rows


# -- the phase split and the whole-iteration scaling study -------------------------------------------

# Phase kinds in the order a run meets them. ``score`` is the launched sami-score part of an
# ``evaluate`` phase (its ``launched_seconds``); ``evaluate`` keeps the rest (evaluation
# generation, estimates). Runs scored with evaluation.scorer=hf have no ``score`` row.
PHASE_KINDS = ("queries", "prepare", "generate", "filter", "train", "cleanup", "export", "evaluate", "score", "winrate")
SCALING_COLUMNS = ("nodes", "world_size", "phase", "count", "seconds", "mean_seconds", "tokens", "tokens_per_s",
                   "share")


def _jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _shard_tokens(shard_dir: Path) -> tuple[int, int]:
    """(generated, scored) response tokens of the generation shards in ``shard_dir``: generated is
    the responses' own count (``metadata.num_tokens``); scored counts each response once per
    constitution of its query, as the C x C scoring reads it."""
    generated = scored = 0
    for shard in sorted(shard_dir.glob("shard-*.jsonl")):
        for row in _jsonl(shard):
            counts = row.get("metadata", {}).get("num_tokens", [])
            generated += sum(counts)
            scored += sum(counts) * len(row.get("constitutions", counts))
    return generated, scored


def phase_tokens(run_dir: Path, phase: str) -> dict[str, int]:
    """The tokens a completed phase processed, counted from the files it wrote.

    Returns:
        ``{"generated": n}`` for ``iterT/generate`` (new tokens of every response); ``{"trained":
        n}`` for ``iterT/train`` (the tokens of every step's sequences, all ranks together, from
        ``metrics.jsonl``); ``{"generated": n, "scored": m}`` for ``iterT/evaluate`` (the evaluation
        responses, and those responses' tokens under each of their query's C constitutions); ``{}``
        for the other phases, which process no tokens.
    """
    iteration, _, kind = phase.partition("/")
    if kind == "generate":
        return {"generated": _shard_tokens(run_dir / iteration / "generated")[0]}
    if kind == "train":
        rows = _jsonl(run_dir / iteration / "train" / "metrics.jsonl")
        return {"trained": round(sum(row["tokens_per_s"] * row["step_time_s"] for row in rows))}
    if kind == "evaluate":
        generated = scored = 0
        for shard_dir in sorted((run_dir / "eval").glob(f"{iteration}-*")):
            if shard_dir.is_dir() and not shard_dir.name.endswith("-scores"):
                counts = _shard_tokens(shard_dir)
                generated, scored = generated + counts[0], scored + counts[1]
        return {"generated": generated, "scored": scored}
    return {}


def _phase_parts(name: str, result: dict) -> list[tuple[str, float, int | None]]:
    """(kind, seconds, tokens) of one recorded phase; an evaluate phase whose scoring was launched
    is split into ``evaluate`` and ``score``."""
    kind = name.partition("/")[2] or name
    seconds, tokens = float(result.get("seconds", 0.0)), result.get("tokens", {})
    if kind == "evaluate" and "score" in result.get("launched_seconds", {}):
        score_s = float(result["launched_seconds"]["score"])
        return [("evaluate", seconds - score_s, tokens.get("generated")), ("score", score_s, tokens.get("scored"))]
    if kind in ("generate", "evaluate"):
        return [(kind, seconds, tokens.get("generated"))]
    return [(kind, seconds, tokens.get("trained") if kind == "train" else None)]


def phase_split(run_dir: Path) -> list[dict]:
    """Where a run's time went, per phase kind (:data:`PHASE_KINDS`), summed over iterations.

    Returns:
        One row per kind that ran: ``{"phase", "count" (phases summed), "seconds", "mean_seconds",
        "tokens" (None: the kind processes no tokens), "tokens_per_s" (tokens over the phases'
        wall time, start-up included), "share" (of all phases' seconds)}``, then a ``total`` row.
        Seconds are those of each phase's last (completing) attempt.

    Raises:
        SamiError: ``run_dir`` has no ``state.json`` with timed phases.
    """
    from megatron_sami.iteration.driver import read_state

    phases = read_state(run_dir / "state.json")["phases"] if (run_dir / "state.json").is_file() else {}
    sums: dict[str, list] = {}
    for name, result in phases.items():
        if "seconds" not in result:
            continue
        for kind, seconds, tokens in _phase_parts(name, result):
            entry = sums.setdefault(kind, [0, 0.0, None])
            entry[0], entry[1] = entry[0] + 1, entry[1] + seconds
            if tokens is not None:
                entry[2] = (entry[2] or 0) + tokens
    if not sums:
        raise SamiError(f"{run_dir} has no timed phases in state.json; give the run_dir of a sami-iterate run that "
                        "has completed a phase.")
    total = sum(entry[1] for entry in sums.values())
    order = sorted(sums, key=lambda kind: PHASE_KINDS.index(kind) if kind in PHASE_KINDS else len(PHASE_KINDS))
    rows = [_split_row(kind, *sums[kind], total) for kind in order]
    timed = sum("seconds" in result for result in phases.values())  # score is part of an evaluate phase
    return [*rows, _split_row("total", timed, total, None, total)]


def _split_row(kind: str, count: int, seconds: float, tokens: int | None, total: float) -> dict:
    return {"phase": kind, "count": count, "seconds": round(seconds, 1), "mean_seconds": round(seconds / count, 2),
            "tokens": tokens, "tokens_per_s": round(tokens / seconds, 1) if tokens and seconds > 0 else None,
            "share": round(seconds / total, 4) if total > 0 else None}


def format_phase_split(rows: list[dict]) -> str:
    """:func:`phase_split`'s rows as an aligned text table."""
    lines = [f"{'phase':<10} {'count':>5} {'seconds':>9} {'share':>6} {'tokens':>10} {'tokens/s':>10}"]
    for row in rows:
        share = f"{row['share']:.0%}" if row["share"] is not None else ""
        tokens = "" if row["tokens"] is None else str(row["tokens"])
        rate = "" if row["tokens_per_s"] is None else f"{row['tokens_per_s']:.1f}"
        lines.append(f"{row['phase']:<10} {row['count']:>5} {row['seconds']:>9.1f} {share:>6} {tokens:>10} {rate:>10}")
    return "\n".join(lines)


def run_allocation(run_dir: Path) -> tuple[int, int | None]:
    """(nodes, world size) a run's phases ran on: the node count its phases recorded, the world
    size of its training (``metrics.jsonl``; None without a training step).

    Raises:
        SamiError: the phases recorded no node count (a run from before it was recorded), or
            several (a resubmission on another allocation: time it as a fresh run).
    """
    from megatron_sami.iteration.driver import read_state

    if not (run_dir / "state.json").is_file():
        raise SamiError(f"{run_dir} has no state.json; give the run_dir of a sami-iterate run.")
    nodes = {result["nodes"] for result in read_state(run_dir / "state.json")["phases"].values() if "nodes" in result}
    if len(nodes) != 1:
        what = "no node count" if not nodes else f"several node counts ({sorted(nodes)})"
        raise SamiError(f"{run_dir}'s phases recorded {what}; time a fresh run directory at one node count.")
    steps = [row for path in sorted(run_dir.glob("iter*/train/metrics.jsonl")) for row in _jsonl(path)]
    return nodes.pop(), steps[0].get("world_size") if steps else None


def iteration_scaling(run_dirs: list[Path]) -> list[dict]:
    """The phase split of runs of the same recipe at several node counts, as rows of
    :data:`SCALING_COLUMNS` ordered by node count (each run's :func:`phase_split` with its
    ``nodes`` and ``world_size``).

    Raises:
        SamiError: a run has no timed phases or no single node count, or two runs share one.
    """
    studied = sorted(((run_allocation(Path(run_dir)), Path(run_dir)) for run_dir in run_dirs), key=lambda x: x[0][0])
    counts = [nodes for (nodes, _), _ in studied]
    if len(set(counts)) != len(counts):
        raise SamiError(f"two runs ran at the same node count ({counts}); give one run directory per node count.")
    return [{"nodes": nodes, "world_size": world, **row} for (nodes, world), run_dir in studied
            for row in phase_split(run_dir)]


def write_iteration_scaling(run_dirs: list[Path], out: Path) -> list[dict]:
    """Write ``iteration_scaling.csv`` and ``iteration_scaling.png`` (mean seconds per phase
    stacked per node count; tokens/s of each token-processing phase against nodes) into ``out``.

    Returns:
        The rows of :func:`iteration_scaling`.

    Raises:
        SamiError: as :func:`iteration_scaling`.
    """
    from megatron_sami.io import atomic_output

    rows = iteration_scaling(run_dirs)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_output(out / "iteration_scaling.csv") as staging, staging.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=SCALING_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    plot_iteration_scaling(rows, out / "iteration_scaling.png")
    return rows


def plot_iteration_scaling(rows: list[dict], path: Path) -> None:
    """The study's two panels (matplotlib, Agg) into ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    nodes = sorted({row["nodes"] for row in rows})
    kinds = [kind for kind in dict.fromkeys(row["phase"] for row in rows) if kind != "total"]
    cell = {(row["nodes"], row["phase"]): row for row in rows}
    figure, axes = plt.subplots(1, 2, figsize=(11, 4))
    bottom = [0.0] * len(nodes)
    for kind in kinds:
        values = [cell[(n, kind)]["mean_seconds"] if (n, kind) in cell else 0.0 for n in nodes]
        axes[0].bar([str(n) for n in nodes], values, bottom=bottom, label=kind)
        bottom = [b + v for b, v in zip(bottom, values, strict=True)]
    axes[0].set(xlabel="nodes", ylabel="seconds per phase (mean over iterations)", title="whole-iteration time")
    axes[0].legend(fontsize=8)
    for kind in kinds:
        points = [(n, cell[(n, kind)]["tokens_per_s"]) for n in nodes if cell.get((n, kind), {}).get("tokens_per_s")]
        if points:
            axes[1].plot(*zip(*points, strict=True), marker="o", label=kind)
    axes[1].set(xlabel="nodes", ylabel="tokens/s (phase wall time)", title="phase throughput", xticks=nodes)
    axes[1].legend(fontsize=8)
    figure.tight_layout()
    from megatron_sami.io import atomic_output

    with atomic_output(path) as staging:
        figure.savefig(staging, dpi=110)
    plt.close(figure)
