"""MI scoring: ``sami-score`` (Megatron, launched per model as sami-iterate does) against the
former in-driver transformers path (``evaluation.scorer=hf``), side by side on the same records.

    .venv/bin/python benchmarks/mi_scoring.py [--model synthetic|smollm2] [--queries 12]
        [--constitutions 2] [--response-words 40] [--rounds 3] [--workdir /tmp/sami-bench-mi]

Each round times, on the same records and model (fp32 on CPU):
- ``hf``: :func:`megatron_sami.evaluation.mi.hf_matrices` in this process, model load included
  (what the driver did before MI scoring moved to sami-score; an untimed warm-up has already
  imported and loaded once, as a driver that generated before scoring had);
- ``sami-score shared``: ``python -m megatron_sami.cli.score`` as a new process (import, runtime,
  checkpoint load and scoring), each constitution's prompt once per query (the default);
- ``sami-score pairs``: the same with ``share_prompts=false`` (every (prompt, response) pair).
The runs alternate within a round and each round gives one ratio per sami-score variant (the
machine is shared and drifts); the medians are printed. The matrices of both paths are compared
(fp32: rtol 1e-5, atol 1e-4 nats), so a fast wrong answer cannot pass as a speed-up.

At the demo's size a new process's fixed cost (imports, Megatron initialisation) dominates; at
the scale of the GPU templates the whole model does not fit one process and only sami-score runs.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from train_throughput import dialogue_template, make_model, make_records  # noqa: E402


def convert(model_dir: Path, checkpoint: Path) -> None:
    if not (checkpoint / "hf").is_dir():
        subprocess.run([sys.executable, "-m", "megatron_sami.cli.convert", "hf-to-megatron", str(model_dir),
                        str(checkpoint), "--dtype", "float32"], check=True, capture_output=True, text=True, cwd=ROOT)


def time_hf(model_dir: Path, records: list) -> tuple[float, list]:
    from megatron_sami.evaluation import mi

    start = time.perf_counter()
    matrices = mi.hf_matrices(model_dir, records, dialogue_template())
    return time.perf_counter() - start, matrices


def time_sami_score(checkpoint: Path, records_file: Path, output: Path, share: bool) -> tuple[float, list[dict]]:
    output.unlink(missing_ok=True)
    command = [sys.executable, "-m", "megatron_sami.cli.score", f"checkpoint={checkpoint}",
               f"records={records_file}", f"output={output}", "template=dialogue", "params_dtype=fp32",
               f"share_prompts={str(share).lower()}"]
    start = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True, text=True, cwd=ROOT)
    seconds = time.perf_counter() - start
    return seconds, [json.loads(line) for line in output.read_text().splitlines()]


def check_same(hf: list, rows: list[dict], label: str) -> None:
    for expected, row in zip(hf, rows, strict=True):
        torch.testing.assert_close(torch.tensor(row["sum"]), expected["sum"], rtol=1e-5, atol=1e-4,
                                   msg=lambda m, q=row["id"]: f"{label}, query {q}: {m}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("synthetic", "smollm2"), default="synthetic")
    parser.add_argument("--queries", type=int, default=12)
    parser.add_argument("--constitutions", type=int, default=2)
    parser.add_argument("--response-words", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/sami-bench-mi"))
    args = parser.parse_args()
    from megatron_sami.alignment.data import read_records

    args.workdir.mkdir(parents=True, exist_ok=True)
    model_dir = make_model(args.model, args.workdir)
    checkpoint = args.workdir / f"{args.model}-megatron"
    convert(model_dir, checkpoint)
    records_file = args.workdir / "records.jsonl"
    make_records(records_file, args.queries, args.constitutions, args.response_words)
    records = read_records(records_file)
    print(f"model {args.model}, {args.queries} queries x C={args.constitutions}, {args.rounds} rounds")
    time_hf(model_dir, records[:1])  # warm-up, not timed: this process's first transformers load and imports
    times: dict[str, list[float]] = {"hf": [], "sami-score shared": [], "sami-score pairs": []}
    for round_index in range(args.rounds):
        hf_s, hf = time_hf(model_dir, records)
        times["hf"].append(hf_s)
        for share, label in ((True, "sami-score shared"), (False, "sami-score pairs")):
            seconds, rows = time_sami_score(checkpoint, records_file, args.workdir / "matrices.jsonl", share)
            check_same(hf, rows, label)
            times[label].append(seconds)
        print(f"round {round_index + 1}: " + ", ".join(f"{label} {values[-1]:.1f} s" for label, values in times.items()))
    print(f"\n{'path':<20} {'median s':>9} {'s/query':>8} {'hf / path':>10}")
    for label, values in times.items():
        ratios = [hf_s / s for hf_s, s in zip(times["hf"], values, strict=True)]
        print(f"{label:<20} {statistics.median(values):>9.2f} {statistics.median(values) / args.queries:>8.3f} "
              f"{statistics.median(ratios):>10.2f}")
    print("(hf / path > 1: the path is faster than the in-driver transformers scoring; matrices equal in every run)")
    shutil.rmtree(args.workdir / "matrices.jsonl.parts", ignore_errors=True)


if __name__ == "__main__":
    main()
