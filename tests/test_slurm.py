"""The Slurm templates on a real two-node Slurm cluster (munged, slurmctld, two slurmd on this machine).

The cluster is started by ``scripts/slurm_cluster.sh`` (CI installs slurm-wlm and munge). Jobs are
submitted with ``sbatch`` through the same launcher as the GPU templates; training runs as one
gloo rank per node. Outside CI, a machine without Slurm skips these tests visibly; in CI they fail.
"""

import csv
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megatron_sami.conversion.hf_io import SafetensorsReader

import iterate_jobs

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    if shutil.which("slurmctld") is None or os.geteuid() != 0:
        if os.environ.get("CI"):
            pytest.fail("CI must run the Slurm tests: .ci/run installs slurm-wlm and munge as root.")
        pytest.skip("needs root and Debian's slurm-wlm and munge (apt-get install slurm-wlm munge)")
    state = tmp_path_factory.mktemp("slurm")
    started = subprocess.run(["bash", str(ROOT / "scripts" / "slurm_cluster.sh"), "start", str(state)],
                             capture_output=True, text=True, timeout=120)
    assert started.returncode == 0, started.stderr
    conf = started.stdout.strip().splitlines()[-1].split("=", 1)[1]
    yield {"SLURM_CONF": conf, "state": state}
    subprocess.run(["bash", str(ROOT / "scripts" / "slurm_cluster.sh"), "stop", str(state)], timeout=60)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return iterate_jobs.make_inputs(tmp_path_factory.mktemp("slurm-inputs"))


def job_env(cluster, tiny: Path, run_dir: Path) -> dict:
    env = {key: value for key, value in os.environ.items() if not key.startswith(("SLURM_", "SAMI_"))}
    return env | {"SLURM_CONF": cluster["SLURM_CONF"], "SAMI_ROOT": str(ROOT), "SAMI_BASE_HF": str(tiny / "hf"),
                  "SAMI_RUN_DIR": str(run_dir), "SAMI_ITERATE_ARGS": " ".join(iterate_jobs.overrides(tiny))}


def sbatch(cluster, tiny, run_dir, *options, wait=True):
    log = run_dir.parent / f"{run_dir.name}-%j.out"
    command = ["sbatch", "--parsable", "--open-mode=append", f"--output={log}", *options,
               str(ROOT / "slurm" / "sami_tiny.sh")]
    if wait:
        command.insert(1, "--wait")
    result = subprocess.run(command, capture_output=True, text=True, timeout=1200, cwd=ROOT,
                            env=job_env(cluster, tiny, run_dir))
    job_id = result.stdout.strip().split(";")[0]
    output = Path(str(log).replace("%j", job_id)) if job_id else None
    return result, job_id, output


def job_state(cluster, job_id: str) -> str:
    shown = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True,
                           env=os.environ | {"SLURM_CONF": cluster["SLURM_CONF"]})
    for field in shown.stdout.split():
        if field.startswith("JobState="):
            return field.split("=", 1)[1]
    return "GONE"


def in_queue(cluster, job_id: str) -> bool:
    """Pending, running or completing (processes still being stopped)."""
    listed = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True,
                            env=os.environ | {"SLURM_CONF": cluster["SLURM_CONF"]})
    return bool(listed.stdout.strip())


def wait_for(predicate, timeout=900, what="condition"):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def final_weights(run_dir: Path) -> dict:
    reader = SafetensorsReader(run_dir / "iter2" / "hf")
    return {key: reader.get(key) for key in reader.keys()}


@pytest.fixture(scope="module")
def reference(cluster, tiny):
    run_dir = tiny / "uninterrupted"
    result, job_id, output = sbatch(cluster, tiny, run_dir)
    assert result.returncode == 0, (result.stderr, output.read_text() if output and output.exists() else "")
    return run_dir, output


def test_two_node_run_completes_and_resubmission_does_no_work(cluster, tiny, reference):
    run_dir, output = reference
    assert json.loads((run_dir / "summary.json").read_text())["complete"]
    rank_logs = sorted(p.name for p in (run_dir / "logs").glob("train-*-rank*.log"))
    assert any(name.endswith("rank0.log") for name in rank_logs) and any(name.endswith("rank1.log") for name in rank_logs)
    rank0 = next((run_dir / "logs").glob("train-*-rank0.log")).read_text()
    assert "runtime: slurm world=2" in rank0 and "DP=2" in rank0
    before = (run_dir / "state.json").read_text()
    again, _, again_output = sbatch(cluster, tiny, run_dir)
    assert again.returncode == 0
    text = again_output.read_text()
    assert text.count("already complete") == 13 and "runtime:" not in text
    assert (run_dir / "state.json").read_text() == before


def test_cancelled_job_resubmitted_ends_with_the_same_checkpoint(cluster, tiny, reference, tmp_path):
    run_dir = tmp_path / "cancelled"
    _, job_id, _ = sbatch(cluster, tiny, run_dir, wait=False)
    wait_for(lambda: (run_dir / "iter1" / "train" / "checkpoints" / "step_000001").is_dir(), what="the first checkpoint")
    subprocess.run(["scancel", job_id], env=os.environ | {"SLURM_CONF": cluster["SLURM_CONF"]}, check=True)
    wait_for(lambda: not in_queue(cluster, job_id), what="the cancelled job to leave the queue")
    assert job_state(cluster, job_id) == "CANCELLED"  # not requeued by the launcher
    assert not json.loads((run_dir / "summary.json").read_text())["complete"]
    result, _, output = sbatch(cluster, tiny, run_dir)
    assert result.returncode == 0, output.read_text()[-3000:]
    expected, got = final_weights(reference[0]), final_weights(run_dir)
    assert expected.keys() == got.keys()
    for name in expected:
        assert (expected[name] == got[name]).all(), name


def test_time_limit_signal_checkpoints_requeues_and_completes(cluster, tiny, reference, tmp_path):
    run_dir = tmp_path / "signalled"
    _, job_id, output = sbatch(cluster, tiny, run_dir, wait=False)
    wait_for(lambda: (run_dir / "iter1" / "train" / "metrics.jsonl").exists(), what="training to start")
    # What --signal=B:USR1@60 does before the time limit: signal the batch shell.
    subprocess.run(["scancel", "--batch", "--signal=USR1", job_id], env=os.environ | {"SLURM_CONF": cluster["SLURM_CONF"]},
                   check=True)
    wait_for(lambda: (run_dir / "summary.json").exists() and json.loads((run_dir / "summary.json").read_text())["complete"]
             and job_state(cluster, job_id) in ("COMPLETED", "GONE"), timeout=1200, what="the requeued job to finish")
    text = output.read_text()
    assert "requeueing job" in text and "(restart 1)" in text
    expected, got = final_weights(reference[0]), final_weights(run_dir)
    for name in expected:
        assert (expected[name] == got[name]).all(), name


def test_scaling_study_at_one_and_two_nodes_writes_csv_and_plots(cluster, tiny, reference, tmp_path):
    run_dir = reference[0]
    out = tmp_path / "study"
    env = {key: value for key, value in os.environ.items() if not key.startswith(("SLURM_", "SAMI_"))}
    result = subprocess.run(
        [sys.executable, str(ROOT / "slurm" / "scaling_study.py"), "--nodes", "1", "2", "--model", "tiny-llama",
         "--checkpoint", str(run_dir / "base" / "megatron"), "--records", str(run_dir / "iter1" / "records.jsonl"),
         "--out", str(out), "--gpus-per-node", "0", "--warmup", "1",
         "--train-args", "steps=3 queries_per_step=2 data.seq_length=256 optimizer.use_distributed_optimizer=false"],
        capture_output=True, text=True, timeout=1200, cwd=ROOT, env=env | {"SLURM_CONF": cluster["SLURM_CONF"]})
    assert result.returncode == 0, (result.stdout[-2000:], result.stderr[-3000:])
    with (out / "scaling.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [(row["nodes"], row["gpus"]) for row in rows] == [("1", "1"), ("2", "2")]
    for row in rows:
        assert float(row["tokens_per_s_per_gpu"]) > 0 and float(row["tflops_per_gpu"]) > 0
        assert float(row["forward_backward_s"]) > 0 and float(row["optimizer_s"]) > 0 and row["mfu"] == ""
    assert float(rows[0]["scaling_efficiency"]) == 1.0
    for plot in ("throughput.png", "efficiency.png"):
        assert (out / plot).stat().st_size > 0
