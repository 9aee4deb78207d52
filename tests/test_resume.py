"""Resume exactly after a signal, at another layout, with changed settings; one trainer per run (issue 16).

Each test drives ``sami-train`` through torchrun on the tiny converted Llama of test_sami_train.
Tolerance at another layout: the same global batch and data order, with reductions reordered
(TP splits matmuls, DP sums gradients from two ranks, PP runs the layers in two processes), so
fp32 losses agree to rounding: |delta| <= 1e-5 relative over a few steps (the test prints the
largest difference it saw).
"""

import contextlib
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest
import sami_jobs
import yaml
from test_sami_train import metrics, train_command

from megatron_sami.testing.processes import wait_until_gone

pytestmark = pytest.mark.slow
LAYOUT_TOLERANCE = 1e-5  # relative, fp32 losses after reordered reductions


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return sami_jobs.make_training_inputs(tmp_path_factory.mktemp("resume"))


def run(command: list[str], fail: bool = False) -> subprocess.CompletedProcess:
    """Run to the end; ``fail``: expect a failure (torchrun exits 1 when a worker exits 2)."""
    result = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert (result.returncode != 0) if fail else (result.returncode == 0), result.stderr[-4000:]
    return result


def curve(run_dir: Path) -> list[tuple[int, float, float]]:
    return [(row["step"], row["loss"], row["grad_norm"]) for row in metrics(run_dir)]


def workers_of(job: subprocess.Popen) -> list[psutil.Process]:
    return [p for p in psutil.Process(job.pid).children(recursive=True) if "megatron_sami.cli.train" in " ".join(p.cmdline())]


def wait_for_step(run_dir: Path, step: int, job: subprocess.Popen) -> None:
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        assert job.poll() is None, "the run ended before the signal"
        with contextlib.suppress(FileNotFoundError, ValueError):
            if any(json.loads(line)["step"] >= step for line in (run_dir / "metrics.jsonl").read_text().splitlines()):
                return
        time.sleep(0.05)
    raise AssertionError(f"step {step} never logged")


@pytest.mark.parametrize(("distributed", "signal_after", "how"), [
    (True, 1, "SIGTERM to the workers"),  # preemption, scancel: Slurm signals every task
    (False, 3, "SIGINT to torchrun's group"),  # Ctrl-C in a terminal; torchrun passes it on to its workers
])
def test_a_signal_between_checkpoints_resumes_on_the_same_curve(setup, tmp_path, distributed, signal_after, how):
    """No save interval: the only checkpoint before the end is the one the signal makes, wherever it lands."""
    overrides = ("steps=7", "save_interval=0", f"optimizer.use_distributed_optimizer={str(distributed).lower()}")
    reference, stopped = tmp_path / "uninterrupted", tmp_path / "stopped"
    run(train_command(setup, reference, *overrides))
    job = subprocess.Popen(train_command(setup, stopped, *overrides), stdout=subprocess.DEVNULL,
                           stderr=subprocess.PIPE, text=True, start_new_session=True)
    wait_for_step(stopped, signal_after, job)
    if how.startswith("SIGTERM"):
        for worker in workers_of(job):
            worker.send_signal(signal.SIGTERM)
    else:
        os.killpg(job.pid, signal.SIGINT)
    _, stderr = job.communicate(timeout=600)
    assert job.returncode != 0, "the run finished before the signal reached it"
    assert "rerun the same command to resume" in stderr, stderr[-3000:]
    saved = (stopped / "checkpoints" / "latest").read_text().strip()
    assert saved != "step_000007" and int(saved.split("_")[1]) >= signal_after, stderr[-3000:]
    resumed = run(train_command(setup, stopped, *overrides))
    assert f"at step {int(saved.split('_')[1])}" in resumed.stderr
    assert curve(stopped) == curve(reference)


@pytest.fixture(scope="module")
def reference_curve(setup, tmp_path_factory):
    """The uninterrupted 4-step curve in one process, per optimizer (computed once each)."""
    curves = {}

    def reference(*optimizer: str) -> list[tuple[int, float, float]]:
        if optimizer not in curves:
            run_dir = tmp_path_factory.mktemp("reference") / "run"
            run(train_command(setup, run_dir, "steps=4", *optimizer, nproc=1))
            curves[optimizer] = curve(run_dir)
        return curves[optimizer]

    return reference


@pytest.mark.parametrize(("first", "second"), [
    ((1,), (2,)),  # DP 1 -> 2 (dp_reshardable, the default)
    ((2, "parallel.tensor=2", "optimizer.checkpoint_format=fully_reshardable"), (1,)),  # TP 2 -> 1
    ((2, "parallel.pipeline=2", "optimizer.checkpoint_format=fully_reshardable"), (1,)),  # PP 2 -> 1
    # Without the distributed optimizer (the RMSprop recipes) the state is per parameter, in model space.
    ((2, "parallel.tensor=2", "optimizer.use_distributed_optimizer=false", "optimizer.name=rmsprop"),
     (1, "optimizer.use_distributed_optimizer=false", "optimizer.name=rmsprop")),  # TP 2 -> 1
], ids=["dp1-to-2", "tp2-to-1", "pp2-to-1", "rmsprop-tp2-to-1"])
def test_a_checkpoint_resumes_at_another_layout(setup, tmp_path, reference_curve, first, second):
    run_dir = tmp_path / "run"
    nproc_first, *first_overrides = first
    nproc_second, *second_overrides = second
    run(train_command(setup, run_dir, "steps=2", *first_overrides, nproc=nproc_first))
    kept = [override for override in first_overrides if "checkpoint_format" in override]
    resumed = run(train_command(setup, run_dir, "steps=4", *kept, *second_overrides, nproc=nproc_second))
    reference = reference_curve(*(override for override in first_overrides if override.startswith("optimizer.")
                                  and "checkpoint_format" not in override))
    assert "resumed from" in resumed.stderr and "at step 2" in resumed.stderr, resumed.stderr[-3000:]
    got = curve(run_dir)
    assert [row[0] for row in got] == [1, 2, 3, 4]
    deltas = [abs(loss - want) / max(1.0, abs(want))
              for (_, loss, _), (_, want, _) in zip(got, reference, strict=True)]
    print(f"largest relative loss difference: {max(deltas):.2e}")  # shown with pytest -s
    for (step, loss, grad_norm), (_, want_loss, want_grad_norm) in zip(got, reference, strict=True):
        assert abs(loss - want_loss) <= LAYOUT_TOLERANCE * max(1.0, abs(want_loss)), (step, loss, want_loss)
        assert abs(grad_norm - want_grad_norm) <= 1e-4 * max(1.0, want_grad_norm), (step, grad_norm, want_grad_norm)


def test_a_layout_the_optimizer_state_cannot_follow_is_refused_in_one_sentence(setup, tmp_path):
    run_dir = tmp_path / "run"
    run(train_command(setup, run_dir, "steps=2", "parallel.tensor=2", nproc=2))
    config_before = (run_dir / "config.yaml").read_text()
    result = run(train_command(setup, run_dir, "steps=4", nproc=1), fail=True)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "parallel.tensor=2" in errors[0] and "dp_reshardable" in errors[0], result.stderr[-2000:]
    assert 'megatron_sami/' not in result.stderr, "a traceback through our code (torchrun prints its own)"
    assert (run_dir / "config.yaml").read_text() == config_before
    assert [row["step"] for row in metrics(run_dir)] == [1, 2]


def test_a_changed_lr_applies_and_is_recorded_and_a_changed_loss_is_refused(setup, tmp_path):
    run_dir = tmp_path / "run"
    run(train_command(setup, run_dir, "steps=2", nproc=1))
    original = (run_dir / "config.yaml").read_text()

    refused = run(train_command(setup, run_dir, "steps=4", "loss.temperature=0.5", nproc=1), fail=True)
    errors = [line for line in refused.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "loss.temperature" in errors[0], refused.stderr[-2000:]
    assert (run_dir / "config.yaml").read_text() == original and not (run_dir / "config_history").exists()

    run(train_command(setup, run_dir, "steps=4", "optimizer.lr=2e-3", nproc=1))
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["optimizer"]["lr"] == 2e-3
    history = list((run_dir / "config_history").iterdir())
    assert len(history) == 1 and history[0].read_text() == original and history[0].name.endswith("step_000002.yaml")
    lrs = [row["lr"] for row in metrics(run_dir)]
    assert max(lrs[:2]) <= 1e-3 < max(lrs[2:]), lrs


def test_a_second_trainer_on_the_same_run_directory_is_refused(setup, tmp_path):
    run_dir = tmp_path / "run"
    first = subprocess.Popen(train_command(setup, run_dir, "steps=100000", nproc=1), stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_for_step(run_dir, 1, first)
        second = run(train_command(setup, run_dir, "steps=100000", nproc=1), fail=True)
        errors = [line for line in second.stderr.splitlines() if line.startswith("error: ")]
        assert len(errors) == 1 and "in use by sami-train (pid" in errors[0], second.stderr[-2000:]
        assert first.poll() is None
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    # kill -9 of torchrun's group: its worker dies with it (die_with_launcher), and the kernel releases the
    # lock with its holder, so the run can be resumed. (A dying process leaves /proc's command lines a moment
    # before its files are closed, so wait on the lock itself too.)
    wait_until_gone(run_dir, [run_dir])


def test_a_checkpoint_the_file_system_refuses_is_one_sentence_and_leaves_nothing_half_written(setup, tmp_path):
    """A file-size limit (RLIMIT_FSIZE, EFBIG: what a quota or a full disk does to the writer) that
    metrics and logs fit under but a checkpoint does not; SIGXFSZ ignored, as a shell's ``ulimit -f``
    would leave it for a program that handles write errors."""
    import resource

    def limited() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))

    run_dir = tmp_path / "run"
    result = subprocess.run(train_command(setup, run_dir, "steps=2", "save_interval=1", nproc=1),
                            capture_output=True, text=True, timeout=900, preexec_fn=limited)
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "writing checkpoint" in errors[0] and "step_000001" in errors[0], \
        result.stderr[-3000:]
    assert "megatron_sami/" not in result.stderr, "a traceback through our code (torchrun prints its own)"
    checkpoints = run_dir / "checkpoints"
    assert not (checkpoints / "latest").exists() and not list(checkpoints.glob("*.incomplete"))
