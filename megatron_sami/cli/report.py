"""``python -m megatron_sami.cli.report --run-dir RUN``: what an expert-iteration run measured
(:func:`megatron_sami.iteration.report.report`); exit code 0 when the run is complete, 1 when not,
2 when RUN is not a run directory."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from megatron_sami.cli.common import run_main


@run_main
def main(argv: list[str] | None = None) -> int:
    """Print the run's report; the exit code says whether the run is complete."""
    from megatron_sami.iteration.report import report

    parser = argparse.ArgumentParser(description="What an expert-iteration run measured (its summary and samples).")
    parser.add_argument("--run-dir", type=Path, required=True)
    return report(parser.parse_args(argv).run_dir)


if __name__ == "__main__":
    sys.exit(main())
