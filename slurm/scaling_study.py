#!/usr/bin/env python3
"""Scaling study: the same SAMI training benchmark at several node counts, collected into a CSV and plots.

    python slurm/scaling_study.py --nodes 1 2 4 8 --model llama3-8b --checkpoint ckpts/llama3-8b \\
        --records data/iter1.jsonl --out studies/llama3-8b --tensor 8 --gpus-per-node 8 \\
        --train-args "steps=10 queries_per_step=256 precision.params_dtype=bf16"

For each node count it submits ``slurm/sami_bench.sh`` with ``sbatch --wait`` (one after another,
so runs do not compete), then reads every run's ``metrics.jsonl``: the median over steps after
``--warmup`` of tokens/s per GPU, TFLOP/s per GPU, MFU (GPUs with a known peak), and the step
time split into data, forward-backward and optimizer. It writes ``scaling.csv``,
``throughput.png`` (tokens/s per GPU and in total) and ``efficiency.png`` (per-GPU throughput
relative to the smallest node count). ``--dry-run`` prints the submissions; ``--collect-only``
re-reads finished runs.

The whole-iteration study (every phase, not only training) submits an expert-iteration template
at each node count instead, with the rest of its settings (SAMI_BASE_HF, SAMI_ITERATE_ARGS, ...)
taken from the environment, and compares the runs' phase splits (wall time and tokens/s of
generate, filter, train, export, evaluate and score; megatron_sami/iteration/report.py):

    SAMI_BASE_HF=/models/Llama-3-70B python slurm/scaling_study.py --whole-iteration \
        --template slurm/sami_70b.sh --nodes 4 8 --out studies/70b-iterate

It writes ``iteration_scaling.csv`` and ``iteration_scaling.png``; ``--run DIR`` adds a finished
run directory (at another node count) without submitting it again.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shlex
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COLUMNS = ("nodes", "gpus", "steps", "tokens_per_s", "tokens_per_s_per_gpu", "tflops_per_gpu", "mfu", "step_time_s",
           "data_s", "forward_backward_s", "optimizer_s", "scaling_efficiency")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, nargs="+", required=True)
    parser.add_argument("--model", help="catalogue name, e.g. llama3-8b (training study)")
    parser.add_argument("--checkpoint", type=Path, help="converted checkpoint directory (training study)")
    parser.add_argument("--records", type=Path, help="SAMI records JSONL (training study)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--gpus-per-node", type=int, default=8, help="tasks per node; 0 means CPU (one task, no GPUs)")
    parser.add_argument("--tensor", type=int, default=1)
    parser.add_argument("--pipeline", type=int, default=1)
    parser.add_argument("--expert", type=int, default=1)
    parser.add_argument("--train-args", default="steps=10", help="sami-train overrides for every run")
    parser.add_argument("--warmup", type=int, default=1, help="steps left out of the medians")
    parser.add_argument("--sbatch-args", default="", help="extra sbatch options, e.g. '-p gpu -A proj'")
    parser.add_argument("--dry-run", action="store_true")
    parser.add_argument("--collect-only", action="store_true")
    parser.add_argument("--whole-iteration", action="store_true",
                        help="time every phase of an expert-iteration template instead of training alone")
    parser.add_argument("--template", type=Path, help="the sami_*.sh template of --whole-iteration")
    parser.add_argument("--run", type=Path, action="append", default=[],
                        help="a finished run directory to include in --whole-iteration (not submitted)")
    args = parser.parse_args(argv)
    if args.whole_iteration and args.template is None:
        parser.error("--whole-iteration needs --template (e.g. slurm/sami_70b.sh)")
    if not args.whole_iteration and None in (args.model, args.checkpoint, args.records):
        parser.error("the training study needs --model, --checkpoint and --records")
    return args


def submission(args: argparse.Namespace, nodes: int) -> tuple[list[str], dict[str, str]]:
    tasks = max(args.gpus_per_node, 1)
    command = ["sbatch", "--wait", "--parsable", f"--nodes={nodes}", f"--ntasks-per-node={tasks}",
               f"--output={args.out / f'nodes-{nodes}.out'}", *shlex.split(args.sbatch_args)]
    if args.gpus_per_node > 0:
        command.append(f"--gpus-per-node={args.gpus_per_node}")
    command.append(str(ROOT / "slurm" / "sami_bench.sh"))
    env = {"SAMI_ROOT": str(ROOT), "SAMI_MODEL": args.model, "SAMI_BASE_CKPT": str(args.checkpoint.resolve()),
           "SAMI_BENCH_RECORDS": str(args.records.resolve()), "SAMI_RUN_DIR": str((args.out / f"nodes-{nodes}").resolve()),
           "SAMI_GPUS_PER_NODE": str(tasks), "SAMI_TP": str(args.tensor), "SAMI_PP": str(args.pipeline),
           "SAMI_EP": str(args.expert), "SAMI_TRAIN_ARGS": args.train_args}
    if args.gpus_per_node == 0:
        env["SAMI_PARAMS_DTYPE"] = "fp32"
    return command, env


def iteration_submission(args: argparse.Namespace, nodes: int) -> tuple[list[str], dict[str, str]]:
    """The sbatch command and environment of the whole-iteration run at ``nodes`` nodes."""
    command = ["sbatch", "--wait", "--parsable", f"--nodes={nodes}", f"--output={args.out / f'iterate-nodes-{nodes}.out'}",
               *shlex.split(args.sbatch_args), str(args.template.resolve())]
    return command, {"SAMI_ROOT": str(ROOT), "SAMI_RUN_DIR": str((args.out / f"iterate-nodes-{nodes}").resolve())}


def submit_each(args: argparse.Namespace, make_submission, label: str, output_stem: str) -> None:
    """Submit ``make_submission(args, nodes)`` at each node count and wait for it (print it with
    --dry-run); a failed job ends the study naming its output file ``<out>/<output_stem>-<nodes>.out``."""
    for nodes in sorted(args.nodes):
        command, env = make_submission(args, nodes)
        if args.dry_run:
            print(" ".join(f"{k}={v!r}" for k, v in env.items()), " ".join(command))
            continue
        print(f"[scaling] {label}{nodes} node(s): submitting", flush=True)
        result = subprocess.run(command, env=os.environ | env, capture_output=True, text=True)
        if result.returncode != 0:
            print(result.stderr, file=sys.stderr)
            raise SystemExit(f"error: the {nodes}-node run failed; see {args.out / f'{output_stem}-{nodes}.out'}.")


def whole_iteration(args: argparse.Namespace) -> int:
    """Submit the template at each node count (unless --collect-only), then write the study."""
    sys.path.insert(0, str(ROOT))
    from megatron_sami.errors import SamiError
    from megatron_sami.iteration.report import format_phase_split, write_iteration_scaling

    if not args.collect_only:
        submit_each(args, iteration_submission, "whole iteration, ", "iterate-nodes")
    if args.dry_run:
        return 0
    runs = [args.out / f"iterate-nodes-{nodes}" for nodes in sorted(args.nodes)] + list(args.run)
    try:
        rows = write_iteration_scaling(runs, args.out)
    except SamiError as err:
        raise SystemExit(f"error: {err}") from None
    for nodes in dict.fromkeys(row["nodes"] for row in rows):
        print(f"[scaling] whole iteration, {nodes} node(s):")
        print(format_phase_split([row for row in rows if row["nodes"] == nodes]))
    print(f"[scaling] wrote {args.out / 'iteration_scaling.csv'}, {args.out / 'iteration_scaling.png'}")
    return 0


def summarize(nodes: int, gpus: int, rows: list[dict], warmup: int) -> dict:
    measured = rows[warmup:] or rows
    if not measured:
        raise SystemExit(f"error: the {nodes}-node run wrote no metrics; see its output in the study directory.")

    def median(key: str):
        values = [row[key] for row in measured if row.get(key) is not None]
        return statistics.median(values) if values else None

    return {"nodes": nodes, "gpus": gpus, "steps": len(measured),
            **{key: median(key) for key in COLUMNS[3:-1]}}


def collect(args: argparse.Namespace) -> list[dict]:
    results = []
    for nodes in sorted(args.nodes):
        metrics = args.out / f"nodes-{nodes}" / "metrics.jsonl"
        if not metrics.is_file():
            raise SystemExit(f"error: {metrics} is missing; the {nodes}-node run did not finish (see nodes-{nodes}.out).")
        rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
        results.append(summarize(nodes, rows[0].get("world_size", nodes * max(args.gpus_per_node, 1)), rows,
                                 args.warmup))
    base = results[0]["tokens_per_s_per_gpu"]
    for row in results:
        row["scaling_efficiency"] = row["tokens_per_s_per_gpu"] / base if base else None
    return results


def write_csv(results: list[dict], path: Path) -> None:
    staging = path.with_name(path.name + ".incomplete")
    with staging.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(results)
    staging.replace(path)


def plot(results: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    nodes = [row["nodes"] for row in results]
    figure, axes = plt.subplots(1, 2, figsize=(10, 4))
    axes[0].plot(nodes, [row["tokens_per_s"] for row in results], marker="o", label="total")
    axes[0].set_ylabel("tokens/s (all GPUs)")
    twin = axes[0].twinx()
    twin.plot(nodes, [row["tokens_per_s_per_gpu"] for row in results], marker="s", color="tab:orange", label="per GPU")
    twin.set_ylabel("tokens/s per GPU")
    axes[0].set_title("SAMI training throughput")
    stacked = [("data_s", "data"), ("forward_backward_s", "forward-backward"), ("optimizer_s", "optimizer")]
    bottom = [0.0] * len(results)
    for key, label in stacked:
        values = [row[key] or 0.0 for row in results]
        axes[1].bar([str(n) for n in nodes], values, bottom=bottom, label=label)
        bottom = [b + v for b, v in zip(bottom, values, strict=True)]
    axes[1].set_ylabel("seconds per step")
    axes[1].set_title("step time")
    axes[1].legend()
    for axis in axes:
        axis.set_xlabel("nodes")
    figure.tight_layout()
    figure.savefig(out / "throughput.png", dpi=110)
    plt.close(figure)

    figure, axis = plt.subplots(figsize=(5, 4))
    axis.plot(nodes, [row["scaling_efficiency"] for row in results], marker="o", label="measured")
    axis.axhline(1.0, color="grey", linestyle="--", label="ideal")
    axis.set_xlabel("nodes")
    axis.set_ylabel(f"tokens/s per GPU relative to {nodes[0]} node(s)")
    axis.set_ylim(0, 1.2)
    axis.set_title("scaling efficiency")
    axis.legend()
    figure.tight_layout()
    figure.savefig(out / "efficiency.png", dpi=110)
    plt.close(figure)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.whole_iteration:
        return whole_iteration(args)
    if not args.collect_only:
        submit_each(args, submission, "", "nodes")
        if args.dry_run:
            return 0
    results = collect(args)
    write_csv(results, args.out / "scaling.csv")
    plot(results, args.out)
    for row in results:
        mfu = f"{row['mfu']:.1%}" if row["mfu"] is not None else "n/a"
        print(f"[scaling] {row['nodes']} node(s), {row['gpus']} GPU(s): {row['tokens_per_s_per_gpu']:.1f} tokens/s/GPU, "
              f"{row['tflops_per_gpu']:.3f} TFLOP/s/GPU, MFU {mfu}, efficiency {row['scaling_efficiency']:.2f}")
    print(f"[scaling] wrote {args.out / 'scaling.csv'}, {args.out / 'throughput.png'}, {args.out / 'efficiency.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
