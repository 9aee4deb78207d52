"""``sami-convert``: HF <-> Megatron checkpoints for Llama, Mistral and Mixtral.

    sami-convert hf-to-megatron HF_DIR OUT_DIR [--pipeline P] [--expert E] [--dtype D] [--overwrite]
    sami-convert megatron-to-hf CKPT_DIR OUT_DIR [--pipeline P] [--expert E] [--dtype D] [--overwrite]
    torchrun --nproc-per-node N -m megatron_sami.cli.convert verify HF_DIR CKPT_DIR \\
        [--tensor T] [--pipeline P] [--expert E] [--new-tokens 16]

One process converts a small model; for large ones launch with torchrun or srun and split the
layers with --pipeline (and experts with --expert): each process reads and holds only its part.
megatron-to-hf streams in one process, without a process group or GPU, from a checkpoint saved
at any layout, holding one tensor at a time (its --pipeline and --expert are accepted and
ignored; under a multi-process launch only the first process exports). The checkpoint keeps the
source's dtype (fp16 stays fp16, so the round trip is bitwise); --dtype casts. Errors print one
sentence naming the fix and exit with code 2; nothing half-written is left, and an output that
is, contains or lies inside the source is refused (even with --overwrite).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from megatron_sami.cli.common import fail_once, is_first_process, run_main, user_error
from megatron_sami.errors import SamiError

# The layout settings' Hydra keys (in shared error messages) -> this command's options.
FLAGS = {"parallel.tensor": "--tensor", "parallel.pipeline": "--pipeline", "parallel.expert": "--expert"}
DTYPES = ["bfloat16", "float16", "float32"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sami-convert", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    for name, source in (("hf-to-megatron", "hf_dir"), ("megatron-to-hf", "ckpt_dir")):
        command = commands.add_parser(name)
        command.add_argument(source, type=Path)
        command.add_argument("out_dir", type=Path)
        ignored = " (ignored: the export streams in one process)" if name == "megatron-to-hf" else ""
        command.add_argument("--pipeline", type=int, default=1, help="pipeline stages to split layers over" + ignored)
        command.add_argument("--expert", type=int, default=1, help="expert-parallel size to split experts over" + ignored)
        command.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
        if name == "megatron-to-hf":
            command.add_argument("--dtype", choices=DTYPES,
                                 help="output dtype (default: the dtype of the original HF weights)")
            command.add_argument("--max-shard-gb", type=float, default=5.0)
        else:
            command.add_argument("--dtype", choices=DTYPES,
                                 help="cast the weights to this dtype (default: keep the source's dtype)")
    verify = commands.add_parser("verify")
    verify.add_argument("hf_dir", type=Path)
    verify.add_argument("ckpt_dir", type=Path)
    verify.add_argument("--tensor", type=int, default=1)
    verify.add_argument("--pipeline", type=int, default=1)
    verify.add_argument("--expert", type=int, default=1)
    verify.add_argument("--new-tokens", type=int, default=16)
    verify.add_argument("--batch-size", type=int, default=2)
    verify.add_argument("--seq-length", type=int, default=32)
    verify.add_argument("--max-logit-diff", type=float, default=1e-3)
    verify.add_argument("--max-kl", type=float, default=1e-5)
    verify.add_argument("--min-greedy-agreement", type=float, default=1.0)
    return parser


def _verify(args, parallel) -> int:
    import torch

    from megatron_sami.conversion.verify import compare, greedy_tokens, hf_reference, megatron_logits
    from megatron_sami.models.checkpoint_dir import load_checkpoint_model

    model, megatron_model = load_checkpoint_model(args.ckpt_dir, parallel, params_dtype="fp32",
                                                  seq_length=args.seq_length + args.new_tokens)
    tokens_BT = torch.randint(0, model.vocab_size, (args.batch_size, args.seq_length),
                              generator=torch.Generator().manual_seed(0))
    candidate = megatron_logits(megatron_model, tokens_BT, model.vocab_size)
    candidate_new = greedy_tokens(lambda t: megatron_logits(megatron_model, t, model.vocab_size), tokens_BT,
                                  args.new_tokens)
    reference, reference_new = hf_reference(args.hf_dir, tokens_BT, args.new_tokens, torch.float32)
    result = compare(reference, candidate, reference_new, candidate_new)
    ok = result.within(args.max_logit_diff, args.max_kl, args.min_greedy_agreement)
    if torch.distributed.get_rank() == 0:
        print(f"max |logit diff| {result.max_abs_logit_diff:.3e} (tolerance {args.max_logit_diff:g}), "
              f"KL {result.kl_divergence:.3e} (tolerance {args.max_kl:g}), greedy agreement "
              f"{result.greedy_agreement:.1%} over {args.new_tokens} tokens: {'OK' if ok else 'MISMATCH'}")
    return 0 if ok else 1


def run(args) -> int:
    """Start the runtime at the requested layout and run one command; returns the exit code."""
    from megatron_sami.conversion import convert
    from megatron_sami.runtime.distributed import megatron_runtime
    from megatron_sami.runtime.layout import ParallelConfig

    parallel = ParallelConfig(tensor=getattr(args, "tensor", 1), pipeline=args.pipeline, expert=args.expert)
    try:
        if args.command == "megatron-to-hf":
            return _export(args)
        with megatron_runtime(parallel):
            return _run_command(args, convert, parallel)
    except BaseException as err:
        # A file-system refusal inside the checkpoint writer rarely carries the file's name:
        # name the output directory (the boundary in run_main prints the sentence).
        found = None if isinstance(err, (SystemExit, KeyboardInterrupt)) else \
            user_error(err, getattr(args, "out_dir", None))
        if found is None:
            raise
        raise found from err


def _export(args) -> int:
    """The streaming export, in this process (the first of a multi-process launch; the others
    have nothing to do and end at once)."""
    from megatron_sami.conversion.export import megatron_to_hf
    from megatron_sami.runtime.distributed import logger, setup_logging

    setup_logging(0)
    if not is_first_process():
        logger.warning("megatron-to-hf streams in one process: the launch's first process exports, this one ends")
        return 0
    megatron_to_hf(args.ckpt_dir, args.out_dir, overwrite=args.overwrite, dtype=args.dtype,
                   max_shard_bytes=int(args.max_shard_gb * 1e9))
    return 0


def _run_command(args, convert, parallel) -> int:
    if args.command == "hf-to-megatron":
        convert.hf_to_megatron(args.hf_dir, args.out_dir, parallel, overwrite=args.overwrite, dtype=args.dtype)
        return 0
    return _verify(args, parallel)


def check_before_start(args) -> None:
    """Checks that need no process group run first (file headers, paths, an output apart from
    the input): a bad input fails in about two seconds instead of after Megatron-Core's import and
    the runtime's start. Under a multi-process launch only the first process prints the message.

    Raises:
        SystemExit: with code 2 when a check fails.
    """
    from megatron_sami.conversion import convert
    from megatron_sami.models.checkpoint_dir import check_output_path, read_checkpoint_model

    try:
        if args.command == "hf-to-megatron":
            convert.check_hf_source(args.hf_dir, args.out_dir, args.overwrite)
        elif args.command == "megatron-to-hf":
            check_output_path(args.out_dir, args.overwrite, {"checkpoint": args.ckpt_dir})
            read_checkpoint_model(args.ckpt_dir)
        elif args.command == "verify":
            from megatron_sami.conversion.verify import check_matches_checkpoint

            check_matches_checkpoint(args.hf_dir, args.ckpt_dir)
    except SamiError as err:
        fail_once(str(err))


@run_main(flags=FLAGS)
def main(argv: list[str] | None = None) -> int:
    """The ``sami-convert`` entry point; returns the exit code (2: a user error, one line)."""
    args = _parser().parse_args(argv)
    check_before_start(args)
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
