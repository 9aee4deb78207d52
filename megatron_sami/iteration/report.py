"""What an expert-iteration run measured, read from the run directory that
:func:`megatron_sami.iteration.driver.run_iterations` wrote.

:func:`report` prints, in a few lines (``bash scripts/demo.sh`` shows it), the filter counts, the
last training step of each iteration, both MI estimators of the base model and the last
iteration, the win rates, and the side-by-side samples:

    python -m megatron_sami.cli.report --run-dir RUN_DIR

:func:`mi_of_run` and :func:`winrate_of_run` are ``sami-eval``'s ``--run-dir`` modes.
"""

from __future__ import annotations

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
