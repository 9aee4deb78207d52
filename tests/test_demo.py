"""The embedded-default job end to end: TP=2 training, checkpoint, TP=1 reload reproduces it."""

import json

import pytest

from megatron_sami.testing import foundation_demo as demo
from megatron_sami.testing.multiprocess import run_distributed

pytestmark = pytest.mark.slow


def test_demo_trains_at_tp2_and_reloads_identically_at_tp1(tmp_path, capsys):
    run_dir = tmp_path / "run"
    run_distributed(demo.train, 2, run_dir, 12, 4)
    losses = [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 12 and losses[-1] < losses[0]
    (exit_code,) = run_distributed(demo.verify, 1, run_dir)
    assert exit_code == 0
