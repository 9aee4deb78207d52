"""``sami-eval``: evaluation of SAMI models.

    sami-eval mi --run-dir RUN
        table of the MI estimates a ``sami-iterate`` run recorded, and its plot (RUN/mi.png)
    sami-eval mi --model base=HF_DIR --model iter1=HF_DIR ... --out OUT [--constitutions dialogue]
        [--template dialogue] [--queries builtin:dialogue | FILE.jsonl] [--num-queries 16]
        [--max-new-tokens 350] [--principles-per-query 2] [--seed 1234]
        evaluates each model on the same held-out queries: OUT/mi.json, OUT/mi.png and a table

Both estimators of the specification are reported with standard errors, for learned (train)
and held-out principles: the InfoNCE bound (mean log-probs, C = 2**principles) and the paper's
uncapped estimator (summed log-probs).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from megatron_sami.cli.common import fail
from megatron_sami.errors import SamiError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sami-eval", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    mi = commands.add_parser("mi", help="mutual-information estimates")
    mi.add_argument("--run-dir", type=Path)
    mi.add_argument("--model", action="append", default=[], help="LABEL=HF_DIR (repeat; evaluated in order)")
    mi.add_argument("--out", type=Path)
    mi.add_argument("--constitutions", default="dialogue")
    mi.add_argument("--template", default="dialogue")
    mi.add_argument("--queries", default="builtin:dialogue")
    mi.add_argument("--num-queries", type=int, default=16)
    mi.add_argument("--max-new-tokens", type=int, default=350)
    mi.add_argument("--principles-per-query", type=int, default=2)
    mi.add_argument("--seed", type=int, default=1234)
    return parser


def format_table(rows: list[dict]) -> str:
    """One line per (iteration or model, principle split) with both estimators and their errors."""
    lines = [f"{'model':<12} {'principles':<10} {'n':>4} {'InfoNCE bound (nats)':>22} {'paper MI (nats)':>18}"]
    for row in rows:
        for split, values in row.get("mi", {}).items():
            bound, paper = values["info_nce_bound"], values["paper_mi"]
            lines.append(f"{str(row.get('label', row.get('iteration'))):<12} {split:<10} {bound['n']:>4} "
                         f"{_pm(bound):>22} {_pm(paper):>18}")
    return "\n".join(lines)


def _pm(estimate: dict) -> str:
    se = "nan" if math.isnan(estimate["se"]) else f"{estimate['se']:.3f}"
    return f"{estimate['mean']:.3f} +- {se}"


def _from_run(run_dir: Path) -> list[dict]:
    from megatron_sami.expert import mi

    summary_path = run_dir / "summary.json"
    if not summary_path.is_file():
        raise SamiError(f"{run_dir} has no summary.json; is it a sami-iterate run directory?")
    rows = [row for row in json.loads(summary_path.read_text())["iterations"] if "mi" in row]
    if not rows:
        raise SamiError(f"{run_dir} has no MI evaluations yet (evaluation.enabled=false, or no phase finished).")
    mi.plot_mi(rows, run_dir / "mi.png")
    return rows


def _models(specs: list[str]) -> list[tuple[str, Path]]:
    models = []
    for spec in specs:
        label, _, path = spec.partition("=")
        if not path:
            raise SamiError(f"--model '{spec}' must be LABEL=HF_DIR, e.g. base=/models/Mistral-7B-v0.1.")
        if not (Path(path) / "config.json").is_file():
            raise SamiError(f"--model {label}: {path} is not an HF model directory (no config.json).")
        models.append((label, Path(path)))
    return models


def _query_source(spec: str):
    from megatron_sami.expert.queries import QuerySourceConfig

    if spec.startswith("builtin:"):
        return QuerySourceConfig(source="builtin", name=spec.split(":", 1)[1])
    return QuerySourceConfig(source="parquet" if spec.endswith(".parquet") else "jsonl", path=spec)


def _evaluate_models(args) -> list[dict]:
    from megatron_sami.expert import mi
    from megatron_sami.expert.constitutions import (
        SamplingConfig,
        evaluation_constitutions,
        load_constitution_set,
    )
    from megatron_sami.expert.generation import GenerationConfig, generate_records, make_backend, read_shards
    from megatron_sami.expert.queries import load_queries, split_queries
    from megatron_sami.models.catalogue import config_dir
    from megatron_sami.sami.data import PromptTemplate, parse_record
    from megatron_sami.typed_config import to_typed

    models = _models(args.model)
    if not models or args.out is None:
        raise SamiError("give --run-dir RUN, or one or more --model LABEL=HF_DIR and --out OUT.")
    cset = load_constitution_set(args.constitutions)
    template_file = config_dir() / "template" / f"{args.template}.yaml"
    if not template_file.is_file():
        raise SamiError(f"unknown template '{args.template}' (no {template_file}).")
    from omegaconf import OmegaConf

    template = to_typed(PromptTemplate, OmegaConf.load(template_file), "template")
    queries = split_queries(load_queries(_query_source(args.queries)), 0, 0, args.num_queries, args.seed).evaluation
    generation = GenerationConfig(max_new_tokens=args.max_new_tokens, temperature=0.0)
    rows = []
    for label, path in models:
        row = {"label": label, "model": str(path), "mi": {}}
        for split in ("train", "heldout"):
            if not any(p.split == split for p in cset.principles):
                continue
            count = min(args.principles_per_query, len(cset.pool(split)))
            sampling = SamplingConfig(num_constitutions=2 ** count, principles_per_query=count, split=split)
            shards = generate_records(lambda path=path: make_backend(path, generation), queries, cset, sampling,
                                      template, args.out / "responses" / f"{label}-{split}", generation.shard_size,
                                      args.seed, sample=evaluation_constitutions)
            records = [parse_record(json.dumps(r), label) for r in read_shards(shards)
                       if all(x.strip() for x in r["responses"])]
            row["mi"]["learned" if split == "train" else "heldout"] = mi.evaluate_records(path, records, template)
        rows.append(row)
    for index, row in enumerate(rows):
        row["iteration"] = index
    (args.out / "mi.json").write_text(json.dumps(rows, indent=2) + "\n")
    mi.plot_mi(rows, args.out / "mi.png")
    return rows


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.run_dir is not None:
            rows = _from_run(args.run_dir)
            where = args.run_dir / "mi.png"
        else:
            from megatron_sami.runtime import quiet

            quiet.install()
            rows = _evaluate_models(args)
            where = args.out / "mi.png"
    except SamiError as err:
        fail(str(err))
    print(format_table(rows))
    print(f"plot: {where}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
