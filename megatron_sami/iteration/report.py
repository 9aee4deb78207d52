"""What an expert-iteration run measured, in a few lines (``bash scripts/demo.sh`` prints it).

Filter counts, the last training step of each iteration, both MI estimators of the base model
and the last iteration, the win rates, and the side-by-side samples, read from the run
directory that :func:`megatron_sami.iteration.driver.run_iterations` wrote.

    python -m megatron_sami.iteration.report --run-dir RUN_DIR
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def report(run_dir: Path) -> int:
    """Print the run's summary; returns 0 when the run is complete, 1 otherwise.\n\n    Raises:\n        FileNotFoundError: ``run_dir`` has no ``summary.json`` (the run has not started).\n    """
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
    for path in sorted((run_dir / "winrate").glob("iter*-vs-base/result.json")):
        result = json.loads(path.read_text())["all"]
        rate = result["win_rate"]
        print(f"{path.parent.name}: win rate {rate['mean']:.3f} [{rate['low']:.2f}, {rate['high']:.2f}] over {rate['n']} "
              f"judged comparisons ({result['undecided']} undecided), length-balanced {result['length_balanced']:.3f}")
    samples = run_dir / "samples.md"
    if samples.is_file():
        print(samples.read_text())
    return 0 if summary["complete"] else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", type=Path, required=True)
    return report(parser.parse_args(argv).run_dir)


if __name__ == "__main__":
    sys.exit(main())
