"""Checkpoints are written atomically and never silently overwritten or half-loaded."""

import os

import pytest

from megatron_sami.testing.multiprocess import run_distributed

import checkpoint_jobs

pytestmark = pytest.mark.slow


def test_save_is_atomic_and_refuses_to_overwrite_and_load_names_the_problem(tmp_path):
    (tmp_path / "interrupted.incomplete").mkdir()  # what a killed save leaves behind
    (errors,) = run_distributed(checkpoint_jobs.save_twice_then_load_missing, 1, str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["ckpt", "interrupted.incomplete"]
    assert (tmp_path / "ckpt" / "metadata.json").is_file()
    overwrite, missing, interrupted = errors
    assert "already exists" in overwrite
    assert "no checkpoint at" in missing and "interrupted" not in missing
    assert "interrupted save" in interrupted
