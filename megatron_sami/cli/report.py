"""``python -m megatron_sami.cli.report --run-dir RUN``: what an expert-iteration run measured
(:func:`megatron_sami.iteration.report.report`, ending with its phase split); exit code 0 when the
run is complete, 1 when not, 2 when RUN is not a run directory.

``python -m megatron_sami.cli.report --scaling RUN_A RUN_B ... --out DIR``: the whole-iteration
scaling study of runs of one recipe at different node counts
(:func:`~megatron_sami.iteration.report.write_iteration_scaling`): ``DIR/iteration_scaling.csv``
(node count, phase, seconds, tokens/s) and ``DIR/iteration_scaling.png``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from megatron_sami.cli.common import run_main


@run_main
def main(argv: list[str] | None = None) -> int:
    """Print the run's report (the exit code says whether the run is complete), or write the
    scaling study of several runs."""
    from megatron_sami.iteration.report import format_phase_split, report, write_iteration_scaling

    parser = argparse.ArgumentParser(description="What an expert-iteration run measured (its summary and samples), "
                                                 "or the whole-iteration scaling study of runs at several node counts.")
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--run-dir", type=Path)
    mode.add_argument("--scaling", type=Path, nargs="+", metavar="RUN_DIR",
                      help="runs of one recipe at different node counts")
    parser.add_argument("--out", type=Path, help="where --scaling writes iteration_scaling.csv and .png")
    args = parser.parse_args(argv)
    if args.run_dir is not None:
        return report(args.run_dir)
    if args.out is None:
        parser.error("--scaling needs --out DIR (where the CSV and the plot go)")
    rows = write_iteration_scaling(args.scaling, args.out)
    for nodes in dict.fromkeys(row["nodes"] for row in rows):
        print(f"{nodes} node(s):")
        print(format_phase_split([row for row in rows if row["nodes"] == nodes]))
    print(f"wrote {args.out / 'iteration_scaling.csv'} and {args.out / 'iteration_scaling.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
