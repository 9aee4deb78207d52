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

Both MI estimators are reported with standard errors, for learned (train) and held-out
principles: the InfoNCE bound (mean log-probs, C = 2**principles) and the uncapped estimator of
Fränken et al. 2024, "Self-Supervised Alignment with Mutual Information: Learning to Follow
Principles without Preference Labels", arXiv:2404.14313 (summed log-probs); see
:mod:`megatron_sami.evaluation.mi`. This module parses arguments; the work is done there, in
:mod:`megatron_sami.evaluation.pairwise` and in :mod:`megatron_sami.iteration.report`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from megatron_sami.cli.common import run_main
from megatron_sami.errors import ConfigError, SamiError
from megatron_sami.io import check_output_apart


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
    """The MI table (:func:`megatron_sami.evaluation.mi.format_table`), imported when printed."""
    from megatron_sami.evaluation.mi import format_table as mi_table

    return mi_table(rows)


def _models(specs: list[str]) -> list[tuple[str, Path]]:
    from megatron_sami.evaluation.pairwise import check_label

    models = []
    for spec in specs:
        label, _, path = spec.partition("=")
        if not path:
            raise SamiError(f"--model '{spec}' must be LABEL=HF_DIR, e.g. base=/models/Mistral-7B-v0.1.")
        check_label(label, spec, "--model")  # the label names a folder under --out
        if label in (seen[0] for seen in models):
            raise SamiError(f"--model label '{label}' is given twice; give each model its own label.")
        if not (Path(path) / "config.json").is_file():
            raise SamiError(f"--model {label}: {path} is not an HF model directory (no config.json).")
        models.append((label, Path(path)))
    return models


def _load_template(name: str):
    from megatron_sami.alignment.data import load_template

    return load_template(name)


def _inputs(args) -> dict:
    """The evaluation inputs both modes share: template, held-out queries and greedy generation."""
    from megatron_sami.rollout.generation import GenerationConfig
    from megatron_sami.rollout.queries import QuerySourceConfig, load_queries, split_queries

    spec = args.queries
    if spec.startswith("builtin:"):
        source = QuerySourceConfig(source="builtin", name=spec.split(":", 1)[1])
    else:
        source = QuerySourceConfig(source="parquet" if spec.endswith(".parquet") else "jsonl", path=spec)
    return {"template": _load_template(args.template),
            "queries": split_queries(load_queries(source), 0, 0, args.num_queries, args.seed).evaluation,
            "generation": GenerationConfig(max_new_tokens=args.max_new_tokens, temperature=0.0),
            "principles_per_query": args.principles_per_query}


def _from_run(run_dir: Path) -> list[dict]:
    from megatron_sami.iteration.report import mi_of_run

    return mi_of_run(run_dir)


def _evaluate_models(args) -> list[dict]:
    from megatron_sami.evaluation import mi
    from megatron_sami.rollout.constitutions import load_constitution_set

    models = _models(args.model)
    if not models or args.out is None:
        raise SamiError("give --run-dir RUN, or one or more --model LABEL=HF_DIR and --out OUT.")
    check_output_apart(args.out, {f"model {label}": path for label, path in models})
    cset = load_constitution_set(args.constitutions)
    return mi.evaluate_models(models, cset=cset, out_dir=args.out, seed=args.seed, **_inputs(args))


def _judge_config(args):
    from megatron_sami.evaluation.judge import JudgeConfig

    judge = JudgeConfig(base_url=args.judge_url, model=args.judge_model, api_key_env=args.judge_api_key_env,
                        max_tokens=args.judge_max_tokens, concurrency=args.judge_concurrency,
                        timeout_s=args.judge_timeout, max_retries=args.judge_retries, backoff_s=args.judge_backoff,
                        cache_dir=str(args.judge_cache) if args.judge_cache else None)
    judge.require()
    return judge


def _winrate_pair(args, judge) -> tuple[list[dict], Path]:
    from megatron_sami.evaluation import pairwise
    from megatron_sami.rollout.constitutions import load_constitution_set

    if args.out is None:
        raise SamiError("give --out OUT for the responses, judgements and plot.")
    inputs = {"--test": args.test, "--baseline-model": args.baseline_model, "--test-records": args.test_records,
              "--baseline-records": args.baseline_records}
    check_output_apart(args.out, {label: path for label, path in inputs.items() if path is not None})
    cset = load_constitution_set(args.constitutions)
    if args.test_records or args.baseline_records:
        if not (args.test_records and args.baseline_records):
            raise SamiError("give both --test-records and --baseline-records.")
        test_rows, baseline_rows = (pairwise.read_response_rows(path)
                                    for path in (args.test_records, args.baseline_records))
        rows = pairwise.winrate_of_rows(test_rows, baseline_rows, cset, judge, args.out, args.position_seed)
    elif args.test and args.baseline_model:
        (_, test), (_, baseline) = _models([f"test={args.test}", f"baseline={args.baseline_model}"])
        rows = pairwise.winrate_of_models(test, baseline, cset=cset, out_dir=args.out, seed=args.seed,
                                          judge_cfg=judge, position_seed=args.position_seed, **_inputs(args))
    else:
        raise SamiError("give --run-dir RUN, --test DIR with --baseline-model DIR, or --test-records with "
                        "--baseline-records.")
    return rows, args.out / "winrate.png"


def _winrate(args) -> None:
    from megatron_sami.evaluation.pairwise import check_judge, format_table, parse_baselines
    from megatron_sami.iteration.report import winrate_of_run
    from megatron_sami.runtime import quiet

    quiet.install()
    judge = _judge_config(args)
    if args.run_dir is not None:
        parse_baselines(args.baseline)
        check_judge(judge)  # before any response is generated (pair mode: in winrate_of_models)
        rows = winrate_of_run(args.run_dir, judge, args.baseline, args.position_seed)
        plot = args.run_dir / "winrate.png"
    else:
        rows, plot = _winrate_pair(args, judge)
    print(format_table(rows))
    print(f"plot: {plot}")


# Messages name the judge settings by their JudgeConfig keys (shared with sami-iterate's winrate.judge.*);
# here they are options.
FLAGS = {"judge.base_url": "--judge-url", "judge.model": "--judge-model", "judge.api_key_env": "--judge-api-key-env",
         "judge.max_tokens": "--judge-max-tokens", "judge.concurrency": "--judge-concurrency",
         "judge.timeout_s": "--judge-timeout", "judge.max_retries": "--judge-retries",
         "judge.backoff_s": "--judge-backoff"}


@run_main(flags=FLAGS)
def main(argv: list[str] | None = None) -> int:
    """``sami-eval mi|winrate``: MI estimates or judged win rates of a run or of given models."""
    args = _parser().parse_args(argv)
    for option in ("num_queries", "max_new_tokens", "principles_per_query"):
        if getattr(args, option) < 1:
            raise ConfigError(f"--{option.replace('_', '-')} must be >= 1, got {getattr(args, option)}.")
    if args.command == "winrate":
        import logging

        logging.basicConfig(level=logging.INFO, format="[%(asctime)s] %(message)s", datefmt="%H:%M:%S")
        _winrate(args)
        return 0
    if args.run_dir is not None:
        rows = _from_run(args.run_dir)
        where = args.run_dir / "mi.png"
    else:
        from megatron_sami.runtime import quiet

        quiet.install()
        rows = _evaluate_models(args)
        where = args.out / "mi.png"
    print(format_table(rows))
    print(f"plot: {where}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
