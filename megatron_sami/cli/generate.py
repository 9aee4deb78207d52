"""Generation as a launched phase of ``sami-iterate`` (an internal command): one process per
node, each with its own engine over its share of a job's shards.

    python -m megatron_sami.cli.generate RUN/iter1/generate-job.json --num-nodes 1
    srun --nodes=4 --ntasks-per-node=1 --ntasks=4 python -m megatron_sami.cli.generate JOB --num-nodes 4

The job (:class:`~megatron_sami.rollout.generation.GenerationJob`, JSON) is written by the
driver. Node k of N (``--node``, else srun's ``SLURM_PROCID``) writes shards k, k + N, ... of
each task, so the records are the same at any node count; shards already written are kept. The
process exits when its share is done, so the engine's GPU memory (vLLM, transformers) goes with
it before the next phase starts. SIGTERM, SIGUSR1 or SIGINT stop it at the next shard boundary
with exit code 75; rerunning the same command resumes. Errors print one sentence (from the first
node only) and exit with code 2.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
from pathlib import Path

from megatron_sami.cli.common import run_main
from megatron_sami.errors import ConfigError, Preempted


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m megatron_sami.cli.generate", description=__doc__.splitlines()[0])
    parser.add_argument("job", type=Path, help="the generation job (JSON) the driver wrote")
    parser.add_argument("--num-nodes", type=int, default=1, help="processes sharing the job, one per node")
    parser.add_argument("--node", type=int, default=None,
                        help="this process's index (default: SLURM_PROCID with several nodes, else 0)")
    return parser


def node_of(args, env: dict[str, str]) -> int:
    """This process's node index: ``--node``, else srun's task id with several nodes, else 0.

    Raises:
        ConfigError: fewer than one node, or a launch whose task count is not the node count.
    """
    if args.num_nodes < 1:
        raise ConfigError(f"--num-nodes must be at least 1, got {args.num_nodes}.")
    if args.node is not None:
        return args.node
    if args.num_nodes == 1:
        return 0
    tasks = env.get("SLURM_NTASKS") or env.get("WORLD_SIZE")
    if tasks is None or int(tasks) != args.num_nodes:
        raise ConfigError(f"generation shared by --num-nodes {args.num_nodes} must be launched as one task per node "
                          f"(srun --ntasks-per-node=1 --ntasks={args.num_nodes}); this launch has {tasks or 'no'} "
                          f"tasks.")
    return int(env.get("SLURM_PROCID") or env.get("RANK") or 0)


def _visible_gpus() -> int:
    import torch

    return torch.cuda.device_count()


@run_main
def main(argv: list[str] | None = None) -> int:
    """Generate this node's share of the job's shards; exit 75 when a signal stopped it."""
    from megatron_sami.rollout.generation import read_job, run_job
    from megatron_sami.runtime import quiet
    from megatron_sami.runtime.distributed import setup_logging

    args = _parser().parse_args(argv)
    node = node_of(args, dict(os.environ))
    setup_logging(node)
    logging.getLogger("megatron_sami").setLevel(logging.INFO)  # every node reports its own shards
    quiet.install()
    stop: list[int] = []

    def on_signal(number, frame) -> None:
        stop.append(number)

    for number in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
        signal.signal(number, on_signal)

    def before_shard() -> None:
        if stop:
            raise Preempted(f"generation stopped by {signal.Signals(stop[0]).name} at a shard boundary; the written "
                            f"shards are kept")

    run_job(read_job(args.job), node, args.num_nodes, before_shard, num_visible_gpus=_visible_gpus())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
