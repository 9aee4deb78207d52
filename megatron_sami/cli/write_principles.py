"""``sami-write-principles``: a model drafts principles with antitheses, saved as a constitution set.

    sami-write-principles --model HF_DIR --out my_principles.yaml --count 10 \\
        --seed-prompt "Write principles for summaries of legal documents." [--examples dialogue] \\
        [--heldout 2] [--attempts 4] [--backend hf] [--max-new-tokens 400]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from megatron_sami.cli.common import run_main
from megatron_sami.errors import PrincipleWriterError, SamiError
from megatron_sami.io import atomic_output


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sami-write-principles", description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True, help="HF model directory of the writer")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--count", type=int, default=10)
    parser.add_argument("--seed-prompt", required=True)
    parser.add_argument("--examples", default="dialogue", help="constitution set shown as examples")
    parser.add_argument("--name", default=None, help="name of the new set (default: the output file's stem)")
    parser.add_argument("--task", default="dialogue", choices=["dialogue", "summarization"])
    parser.add_argument("--heldout", type=int, default=0, help="mark the last N principles as held out")
    parser.add_argument("--attempts", type=int, default=4, help="generations to try, sampled after the first")
    parser.add_argument("--backend", default="hf", choices=["hf", "vllm"])
    parser.add_argument("--max-new-tokens", type=int, default=400)
    parser.add_argument("--overwrite", action="store_true")
    return parser


def run(args) -> Path:
    """Draft principles with the ``--model`` writer (greedy first, then sampled attempts), keep
    the valid ones, and save ``--count`` of them as a constitution set at ``--out``; returns it.

    Raises:
        SamiError: ``--out`` exists without ``--overwrite``, or ``--heldout`` >= ``--count``.
        PrincipleWriterError: fewer than ``--count`` valid principles after ``--attempts``.
        ConfigError, EnvironmentSetupError: the writer model or backend cannot be used.
    """
    from megatron_sami.rollout.constitutions import load_constitution_set
    from megatron_sami.rollout.generation import GenerationConfig, make_backend
    from megatron_sami.rollout.principles import (
        accept,
        parse_drafts,
        to_constitution_yaml,
        writer_prompt,
    )

    if args.out.exists() and not args.overwrite:
        raise SamiError(f"{args.out} exists; pass --overwrite to replace it.")
    if args.heldout >= args.count:
        raise SamiError("--heldout must be smaller than --count.")
    examples = load_constitution_set(args.examples)
    prompt = writer_prompt(args.seed_prompt, examples, args.count)
    kept, rejected = [], {}
    existing = {p.definition.lower() for p in examples.principles}
    for attempt in range(args.attempts):
        generation = GenerationConfig(backend=args.backend, max_new_tokens=args.max_new_tokens, stop=[],
                                      temperature=0.0 if attempt == 0 else 0.8, seed=attempt)
        backend = make_backend(args.model, generation)
        text = backend.generate([prompt])[0].text
        new, why = accept(parse_drafts(text), existing | {d.definition.lower() for d in kept})
        kept += new
        for reason, number in why.items():
            rejected[reason] = rejected.get(reason, 0) + number
        if len(kept) >= args.count:
            break
    if len(kept) < args.count:
        raise PrincipleWriterError(f"the writer model produced {len(kept)} valid principles of {args.count} in "
                                   f"{args.attempts} attempts (rejected: {rejected or 'none parsed'}); use a stronger "
                                   f"model, more --attempts, or a lower --count.")
    yaml_text = to_constitution_yaml(args.name or args.out.stem, args.task, kept[:args.count], args.heldout)
    with atomic_output(args.out) as staging:
        staging.write_text(yaml_text)
        load_constitution_set(str(staging))  # what is saved must load as a constitution set
    print(f"wrote {args.count} principles to {args.out} (rejected: {rejected or 'none'})")
    return args.out


@run_main
def main(argv: list[str] | None = None) -> int:
    """``sami-write-principles``: ask a model for principles with antitheses and save a constitution set."""
    run(_parser().parse_args(argv))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
