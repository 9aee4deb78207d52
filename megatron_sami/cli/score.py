"""``sami-score``: each query's C x C log-probability matrices through Megatron at a training
layout (Hydra overrides; see configs/score.yaml), for the MI evaluation.

    torchrun --nproc-per-node 8 -m megatron_sami.cli.score checkpoint=runs/x/iter1/train/checkpoints/step_000004 \\
        records=runs/x/eval/iter1-learned/scoring-records.jsonl output=runs/x/eval/iter1-learned/matrices.jsonl \\
        parallel.tensor=4

Launch it like sami-train (torchrun on one node, srun with one task per GPU); rerunning the same
command after an interruption scores only the chunks that are missing. Errors print one sentence
naming the fix (from the first process only) and exit with code 2.
"""

from __future__ import annotations

import os
import time

from megatron_sami.cli.common import EXIT_USER_ERROR, fail, run_hydra_app
from megatron_sami.cli.schemas import defaults_tree, register_schema
from megatron_sami.errors import SamiError
from megatron_sami.typed_config import to_typed

FOLLOWER_WAIT_S = 60.0  # seconds a non-first process waits to be ended by its launcher


def _first_process() -> bool:
    return os.environ.get("RANK", "0") == "0" and os.environ.get("SLURM_PROCID", "0") == "0"


def _read_or_exit(cfg):
    """The checked inputs (no process group yet): a bad checkpoint, layout or records file fails
    in seconds. Under a multi-process launch only the first process prints the sentence; the
    others wait for the launcher to end them, so that the first is not killed before it prints
    (every process reads the same inputs and fails the same way).

    Raises:
        SystemExit: with code 2 when a check fails.
    """
    from megatron_sami.alignment.scoring import read_scoring_data

    try:
        return read_scoring_data(cfg)
    except SamiError as err:
        if _first_process():
            fail(str(err))
        time.sleep(FOLLOWER_WAIT_S)
        raise SystemExit(EXIT_USER_ERROR) from None


def _task(cfg) -> None:
    from megatron_sami.alignment.scoring import ScoreConfig, score

    score_config = to_typed(ScoreConfig, cfg, "score")
    score(score_config, _read_or_exit(score_config))


def main() -> None:
    """The ``sami-score`` entry point (Hydra overrides on the command line)."""
    from megatron_sami.alignment.scoring import ScoreConfig

    register_schema("score_schema", defaults_tree(ScoreConfig))  # the defaults configs/score.yaml builds on
    run_hydra_app(_task, "score")


if __name__ == "__main__":
    main()
