"""``sami-eval``: evaluation of SAMI models.

    sami-eval mi --run-dir RUN
        table of the MI estimates a ``sami-iterate`` run recorded, and its plot (RUN/mi.png)
    sami-eval mi --model base=HF_DIR --model iter1=HF_DIR ... --out OUT [--constitutions dialogue]
        [--template dialogue] [--queries builtin:dialogue | FILE.jsonl] [--num-queries 16]
        [--max-new-tokens 350] [--principles-per-query 2] [--seed 1234]
        evaluates each model on the same held-out queries: OUT/mi.json, OUT/mi.png and a table

    sami-eval winrate --run-dir RUN --judge-url URL --judge-model NAME [--baseline base] [--baseline L=DIR]
        each iteration of a run against its base model (and other baselines): RUN/winrate/, a table
        and RUN/winrate.png
    sami-eval winrate --test DIR --baseline-model DIR --out OUT --judge-url URL --judge-model NAME
        [--constitutions dialogue] [--template dialogue] [--queries ...] [--num-queries 16]
    sami-eval winrate --test-records F --baseline-records F --out OUT --judge-url ... --judge-model ...
        response rows (id, query, split, principles, response; what OUT/responses/*.jsonl hold)

The judge is any OpenAI-compatible endpoint (sami-serve, vLLM, a hosted API); its key is read
from the variable --judge-api-key-env names (default SAMI_JUDGE_API_KEY), never from the command.

Both MI estimators of the specification are reported with standard errors, for learned (train)
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
    win = commands.add_parser("winrate", help="win rates judged by an LLM")
    win.add_argument("--run-dir", type=Path)
    win.add_argument("--baseline", action="append", default=[],
                     help="with --run-dir: base, or LABEL=HF_DIR (repeat); default: the run's winrate.baselines")
    win.add_argument("--test", type=Path, help="HF directory of the model under test")
    win.add_argument("--baseline-model", type=Path, help="HF directory of the baseline model")
    win.add_argument("--test-records", type=Path)
    win.add_argument("--baseline-records", type=Path)
    win.add_argument("--out", type=Path)
    win.add_argument("--constitutions", default="dialogue")
    win.add_argument("--template", default="dialogue")
    win.add_argument("--queries", default="builtin:dialogue")
    win.add_argument("--num-queries", type=int, default=16)
    win.add_argument("--max-new-tokens", type=int, default=350)
    win.add_argument("--principles-per-query", type=int, default=2)
    win.add_argument("--seed", type=int, default=1234, help="query draw and principle draw")
    win.add_argument("--position-seed", type=int, default=0, help="A/B placement")
    win.add_argument("--judge-url", help="OpenAI-compatible base URL, e.g. http://127.0.0.1:8000/v1")
    win.add_argument("--judge-model")
    win.add_argument("--judge-api-key-env", default="SAMI_JUDGE_API_KEY")
    win.add_argument("--judge-concurrency", type=int, default=4)
    win.add_argument("--judge-timeout", type=float, default=120.0)
    win.add_argument("--judge-retries", type=int, default=5)
    win.add_argument("--judge-backoff", type=float, default=1.0)
    win.add_argument("--judge-max-tokens", type=int, default=256)
    win.add_argument("--judge-cache", type=Path, help="default: OUT/judge-cache (RUN/winrate/judge-cache)")
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
    from megatron_sami.evaluation import mi

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


def _load_template(name: str):
    from omegaconf import OmegaConf

    from megatron_sami.alignment.data import PromptTemplate
    from megatron_sami.models.catalogue import config_dir
    from megatron_sami.typed_config import to_typed

    template_file = config_dir() / "template" / f"{name}.yaml"
    if not template_file.is_file():
        raise SamiError(f"unknown template '{name}' (no {template_file}).")
    return to_typed(PromptTemplate, OmegaConf.load(template_file), "template")


def _query_source(spec: str):
    from megatron_sami.rollout.queries import QuerySourceConfig

    if spec.startswith("builtin:"):
        return QuerySourceConfig(source="builtin", name=spec.split(":", 1)[1])
    return QuerySourceConfig(source="parquet" if spec.endswith(".parquet") else "jsonl", path=spec)


def _evaluate_models(args) -> list[dict]:
    from megatron_sami.alignment.data import parse_record
    from megatron_sami.evaluation import mi
    from megatron_sami.rollout.constitutions import (
        SamplingConfig,
        evaluation_constitutions,
        load_constitution_set,
    )
    from megatron_sami.rollout.generation import GenerationConfig, generate_records, make_backend, read_shards
    from megatron_sami.rollout.queries import load_queries, split_queries

    models = _models(args.model)
    if not models or args.out is None:
        raise SamiError("give --run-dir RUN, or one or more --model LABEL=HF_DIR and --out OUT.")
    cset = load_constitution_set(args.constitutions)
    template = _load_template(args.template)
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


def _judge_config(args):
    from megatron_sami.evaluation.judge import JudgeConfig

    judge = JudgeConfig(base_url=args.judge_url, model=args.judge_model, api_key_env=args.judge_api_key_env,
                        max_tokens=args.judge_max_tokens, concurrency=args.judge_concurrency,
                        timeout_s=args.judge_timeout, max_retries=args.judge_retries, backoff_s=args.judge_backoff,
                        cache_dir=str(args.judge_cache) if args.judge_cache else None)
    judge.require()
    return judge


def _winrate_run(args, judge) -> tuple[list[dict], Path]:
    from omegaconf import OmegaConf

    from megatron_sami.evaluation.pairwise import parse_baselines, plot_winrates
    from megatron_sami.iteration.driver import IterateConfig, Run, winrate_rows
    from megatron_sami.typed_config import to_typed

    config_file = args.run_dir / "config.yaml"
    if not config_file.is_file():
        raise SamiError(f"{args.run_dir} has no config.yaml; is it a sami-iterate run directory?")
    cfg = to_typed(IterateConfig, OmegaConf.load(config_file), "iterate")
    if args.baseline:
        parse_baselines(args.baseline)
        cfg.winrate.baselines = list(args.baseline)
    cfg.winrate.seed = args.position_seed
    run = Run(cfg, None)
    exported = [t for t in range(1, cfg.iterations + 1) if (run.model_hf(t) / "config.json").is_file()]
    if not exported:
        raise SamiError(f"{args.run_dir} has no exported iteration yet (iterN/hf); let sami-iterate finish one.")
    rows = winrate_rows([{"iteration": t, "winrate": run.winrate(t, judge)} for t in exported])
    plot_winrates(rows, args.run_dir / "winrate.png")
    return rows, args.run_dir / "winrate.png"


def _winrate_pair(args, judge) -> tuple[list[dict], Path]:
    from megatron_sami.evaluation import pairwise as evaluate
    from megatron_sami.rollout.constitutions import load_constitution_set
    from megatron_sami.rollout.generation import GenerationConfig, write_jsonl_atomic
    from megatron_sami.rollout.queries import load_queries, split_queries

    if args.out is None:
        raise SamiError("give --out OUT for the responses, judgements and plot.")
    cset = load_constitution_set(args.constitutions)
    if args.test_records or args.baseline_records:
        if not (args.test_records and args.baseline_records):
            raise SamiError("give both --test-records and --baseline-records.")
        test_rows = evaluate.read_response_rows(args.test_records)
        baseline_rows = evaluate.read_response_rows(args.baseline_records)
    else:
        models = _models([f"test={args.test}", f"baseline={args.baseline_model}"] if args.test and args.baseline_model
                         else [])
        if not models:
            raise SamiError("give --run-dir RUN, --test DIR with --baseline-model DIR, or --test-records with "
                            "--baseline-records.")
        template = _load_template(args.template)
        queries = split_queries(load_queries(_query_source(args.queries)), 0, 0, args.num_queries,
                                args.seed).evaluation
        generation = GenerationConfig(max_new_tokens=args.max_new_tokens, temperature=0.0)
        test_rows, baseline_rows = (
            evaluate.generate_responses(path, queries, cset, template, generation, args.principles_per_query,
                                        args.out / "responses" / label, args.seed) for label, path in models)
    (args.out / "responses").mkdir(parents=True, exist_ok=True)
    write_jsonl_atomic(args.out / "responses" / "test.jsonl", test_rows)
    write_jsonl_atomic(args.out / "responses" / "baseline.jsonl", baseline_rows)
    result = evaluate.evaluate_pair(test_rows, baseline_rows, cset, judge, args.out, args.position_seed)
    rows = [{"label": "test", "iteration": 1, "baseline": "baseline", "result": result}]
    evaluate.plot_winrates(rows, args.out / "winrate.png")
    return rows, args.out / "winrate.png"


def _winrate(args) -> None:
    from megatron_sami.evaluation.pairwise import format_table
    from megatron_sami.runtime import quiet

    quiet.install()
    judge = _judge_config(args)
    rows, plot = _winrate_run(args, judge) if args.run_dir is not None else _winrate_pair(args, judge)
    print(format_table(rows))
    print(f"plot: {plot}")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "winrate":
        import logging

        logging.basicConfig(level=logging.INFO, format="[%(asctime)s] %(message)s", datefmt="%H:%M:%S")
        try:
            _winrate(args)
        except SamiError as err:
            fail(str(err))
        return 0
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
