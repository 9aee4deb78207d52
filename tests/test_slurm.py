"""The Slurm templates on a real two-node Slurm cluster (munged, slurmctld, two slurmd on this machine).

The cluster is started by ``scripts/slurm_cluster.sh`` (CI installs slurm-wlm and munge). Jobs are
submitted with ``sbatch`` through the same launcher as the GPU templates; training runs as one
gloo rank per node. Outside CI, a machine without Slurm skips these tests visibly; in CI they fail.

The machine may be slow and shared: every wait is on a file or a job state, polled, with a deadline
of many minutes, and ends early with the job's output when the job has left the queue.
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


def sbatch(cluster, tiny, run_dir, *options, wait=True, env=None):
    log = run_dir.parent / f"{run_dir.name}-%j.out"
    command = ["sbatch", "--parsable", "--open-mode=append", f"--output={log}", *options,
               str(ROOT / "slurm" / "sami_tiny.sh")]
    if wait:
        command.insert(1, "--wait")
    result = subprocess.run(command, capture_output=True, text=True, timeout=1200, cwd=ROOT,
                            env=job_env(cluster, tiny, run_dir) | (env or {}))
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


WAIT_S = 2400  # a deadline, not a duration: the waits end as soon as their event happens


def wait_for(predicate, what: str, timeout: float = WAIT_S, cluster=None, job_id: str | None = None,
             output: Path | None = None):
    """Poll ``predicate`` until it holds; fail after ``timeout`` s, or as soon as ``job_id`` has
    left the queue without it (a failed job), with the job's output."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        if job_id is not None and not in_queue(cluster, job_id) and not predicate():
            text = output.read_text()[-3000:] if output is not None and output.exists() else ""
            raise AssertionError(f"job {job_id} ended ({job_state(cluster, job_id)}) before {what}:\n{text}")
        time.sleep(1)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def rank_logs(run_dir: Path, phase: str) -> dict[str, str]:
    """Each per-rank log of ``phase`` (``iter1-train``): file name -> text."""
    return {path.name: path.read_text() for path in sorted((run_dir / "logs").glob(f"{phase}-*-rank*.log"))}


def final_weights(run_dir: Path) -> dict:
    reader = SafetensorsReader(run_dir / "iter2" / "hf")
    return {key: reader.get(key) for key in reader.keys()}


# The reference run's directory holds a space, a comma, a quote and non-ASCII characters: the
# launcher passes it to the driver, srun and sami-train intact (issue 14).
AWKWARD_NAME = "uninterrupted run, it's café 日本"


@pytest.fixture(scope="module")
def reference(cluster, tiny):
    run_dir = tiny / AWKWARD_NAME
    result, job_id, output = sbatch(cluster, tiny, run_dir)
    assert result.returncode == 0, (result.stderr, output.read_text() if output and output.exists() else "")
    return run_dir, output


def test_two_node_run_completes_and_resubmission_does_no_work(cluster, tiny, reference):
    run_dir, output = reference
    assert json.loads((run_dir / "summary.json").read_text())["complete"]
    assert json.loads((run_dir / "summary.json").read_text())["run_dir"] == str(run_dir)
    assert (run_dir / "iter2" / "train" / "metrics.jsonl").exists()  # sami-train got the path intact
    for phase in ("iter1-train", "iter2-train"):  # one log per phase, attempt and rank
        logs = rank_logs(run_dir, phase)
        assert sorted(name.rsplit("-", 1)[1] for name in logs) == ["rank0.log", "rank1.log"], logs.keys()
        rank0 = next(text for name, text in logs.items() if name.endswith(".0-rank0.log"))
        assert "runtime: slurm world=2" in rank0 and "DP=2" in rank0
    # Generation ran as one srun task per node, each writing its share of the shards (issue 14).
    phases = json.loads((run_dir / "state.json").read_text())["phases"]
    for phase in ("iter1/generate", "iter2/generate", "iter0/evaluate", "iter2/evaluate"):
        assert len(phases[phase]["written_by"]) == 2, (phase, phases[phase]["written_by"])
    assert sorted(phases["iter1/generate"]["written_by"].values()) == [2, 2]
    assert sorted(name.rsplit("-", 1)[1] for name in rank_logs(run_dir, "iter1-generate")) == ["rank0.log", "rank1.log"]
    before = (run_dir / "state.json").read_text()
    again, _, again_output = sbatch(cluster, tiny, run_dir)
    assert again.returncode == 0
    text = again_output.read_text()
    assert text.count("already complete") == 15 and "runtime:" not in text  # 13 phases + 2 cleanups
    assert (run_dir / "state.json").read_text() == before


def test_time_limit_requeue_then_cancel_and_resubmission_end_with_the_same_weights(cluster, tiny, reference, tmp_path):
    """One job through both stops a cluster gives a run: the time-limit warning (the job checkpoints and
    requeues itself), then scancel of the requeued attempt (it stays cancelled), then a resubmission that
    finishes. The final weights equal the uninterrupted run's, and no attempt's logs are lost."""
    run_dir = tmp_path / "stopped twice"
    slurm_env = os.environ | {"SLURM_CONF": cluster["SLURM_CONF"]}
    _, job_id, output = sbatch(cluster, tiny, run_dir, wait=False)
    wait_for(lambda: (run_dir / "iter1" / "train" / "metrics.jsonl").exists(), "training to start",
             cluster=cluster, job_id=job_id, output=output)
    # What --signal=B:USR1@60 does before the time limit: signal the batch shell.
    subprocess.run(["scancel", "--batch", "--signal=USR1", job_id], env=slurm_env, check=True)
    # A requeued job leaves the queue only for a moment (or not at all): wait for its second attempt's work.
    # (scancel's SIGTERM makes training checkpoint wherever it is; iter1's checkpoints but the last are gone by
    # then, removed by its cleanup phase.)
    wait_for(lambda: (run_dir / "iter2" / "train" / "metrics.jsonl").exists(),
             "the requeued attempt's training of iteration 2", cluster=cluster, job_id=job_id, output=output)
    text = output.read_text()
    assert "requeueing job" in text and "(restart 1)" in text, text[-3000:]
    subprocess.run(["scancel", job_id], env=slurm_env, check=True)
    wait_for(lambda: not in_queue(cluster, job_id), "the cancelled job to leave the queue")
    assert job_state(cluster, job_id) == "CANCELLED"  # not requeued by the launcher
    assert not json.loads((run_dir / "summary.json").read_text())["complete"]

    result, _, resubmitted = sbatch(cluster, tiny, run_dir)
    assert result.returncode == 0, resubmitted.read_text()[-3000:]
    # The first attempt's training logs survive the requeue beside the second attempt's.
    logs = rank_logs(run_dir, "iter1-train") | rank_logs(run_dir, "iter2-train")
    assert "runtime: slurm world=2" in logs[f"iter1-train-{job_id}.0-rank0.log"], logs.keys()
    assert any(name.endswith(f"-{job_id}.1-rank0.log") and "runtime: slurm" in text for name, text in logs.items())
    expected, got = final_weights(reference[0]), final_weights(run_dir)
    assert expected.keys() == got.keys()
    for name in expected:
        assert (expected[name] == got[name]).all(), name


def test_scaling_studies_at_one_and_two_nodes_write_csvs_and_plots(cluster, tiny, reference, tmp_path):
    """Both scaling studies at 1 and 2 nodes from runs of the tiny template (issue 14 item 4).

    Whole iteration: every phase's wall time and tokens/s per node count. The 2-node point is the
    reference run; the 1-node run does one iteration from the reference's converted base (no
    conversion), the only job this test submits. Training only: its CSV and plots from those two
    runs' first training phase (--collect-only), and sami_bench.sh's submission as a dry run."""
    run_dir = reference[0]
    base = tmp_path / "base-checkpoint"  # SAMI_ITERATE_ARGS is split on spaces; the reference's path has some
    base.symlink_to(run_dir / "base" / "megatron")
    out = tmp_path / "study"
    env = job_env(cluster, tiny, out) | {
        "SAMI_ITERATE_ARGS": " ".join([*iterate_jobs.overrides(tiny), "iterations=1", f"base.checkpoint={base}"])}
    result = subprocess.run(
        [sys.executable, str(ROOT / "slurm" / "scaling_study.py"), "--whole-iteration", "--template",
         str(ROOT / "slurm" / "sami_tiny.sh"), "--nodes", "1", "--run", str(run_dir), "--out", str(out)],
        capture_output=True, text=True, timeout=1200, cwd=ROOT, env=env)
    assert result.returncode == 0, (result.stdout[-2000:], result.stderr[-3000:])
    with (out / "iteration_scaling.csv").open() as handle:
        phases = {(row["nodes"], row["phase"]): row for row in csv.DictReader(handle)}
    for nodes, world in (("1", "1"), ("2", "2")):
        for phase in ("generate", "train", "evaluate", "score"):
            row = phases[(nodes, phase)]
            assert row["world_size"] == world and float(row["seconds"]) > 0 and float(row["tokens_per_s"]) > 0, row
        assert float(phases[(nodes, "export")]["seconds"]) > 0 and phases[(nodes, "export")]["tokens_per_s"] == ""
    assert phases[("1", "train")]["count"] == "1" and phases[("2", "train")]["count"] == "2"
    assert (out / "iteration_scaling.png").stat().st_size > 0 and "whole iteration, 2 node(s)" in result.stdout

    training = tmp_path / "training"
    training.mkdir()
    (training / "nodes-1").symlink_to(out / "iterate-nodes-1" / "iter1" / "train")
    (training / "nodes-2").symlink_to(run_dir / "iter1" / "train")
    records = run_dir / "iter1" / "records.jsonl"
    study = [sys.executable, str(ROOT / "slurm" / "scaling_study.py"), "--nodes", "1", "2", "--model", "tiny-llama",
             "--checkpoint", str(base), "--records", str(records), "--out", str(training), "--gpus-per-node", "0",
             "--warmup", "1"]
    result = subprocess.run([*study, "--collect-only"], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0, (result.stdout[-2000:], result.stderr[-3000:])
    with (training / "scaling.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [(row["nodes"], row["gpus"]) for row in rows] == [("1", "1"), ("2", "2")]
    for row in rows:
        assert float(row["tokens_per_s_per_gpu"]) > 0 and float(row["tflops_per_gpu"]) > 0
        assert float(row["forward_backward_s"]) > 0 and float(row["optimizer_s"]) > 0 and row["mfu"] == ""
    assert float(rows[0]["scaling_efficiency"]) == 1.0
    for plot in ("throughput.png", "efficiency.png"):
        assert (training / plot).stat().st_size > 0
    dry = subprocess.run([*study, "--dry-run"], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert dry.returncode == 0 and dry.stdout.count("sami_bench.sh") == 2 and "--nodes=2" in dry.stdout
    clean = {key: value for key, value in os.environ.items() if not key.startswith(("SLURM_", "SAMI_"))}
    bench = subprocess.run(["bash", str(ROOT / "slurm" / "sami_bench.sh")], capture_output=True, text=True, timeout=300,
                           cwd=ROOT, env=clean | {"SAMI_DRY_RUN": "1", "SAMI_NODES": "2", "SAMI_MODEL": "tiny-llama",
                                                  "SAMI_GPUS_PER_NODE": "1", "SAMI_PARAMS_DTYPE": "fp32",
                                                  "SAMI_BASE_CKPT": str(base), "SAMI_BENCH_RECORDS": str(records),
                                                  "SAMI_RUN_DIR": str(tmp_path / "bench")})
    assert bench.returncode == 0, bench.stderr[-2000:]
    assert "srun --nodes=2 --ntasks-per-node=1" in bench.stdout and "-m megatron_sami.cli.train" in bench.stdout


# The scale rehearsal (issue 14): a budget between one rank's share of the tiny model and the whole
# model (143,680 Megatron parameters, vocabulary padded; 72,000 per rank at TP=2, at most 71,872 at
# PP=2), so a phase that held the whole model in one process (export through one Megatron build, MI
# scored by transformers) would be refused. Generation's hf engine is exempt: it stands in for vLLM's
# tensor-parallel engine (megatron_sami/device_budget.py).
REHEARSAL_BUDGET = 100_000
REHEARSAL_ARGS = "iterations=1 queries_per_iteration=2 train.steps=1 evaluation.num_queries=2"


@pytest.mark.parametrize(("tensor", "pipeline"), [(2, 1), (1, 2)], ids=["TP2", "PP2"])
def test_rehearsal_under_a_device_budget_runs_every_phase_sharded(cluster, tiny, tmp_path, tensor, pipeline):
    run_dir = tmp_path / f"rehearsal TP{tensor} PP{pipeline} café"
    args = " ".join([*iterate_jobs.overrides(tiny), REHEARSAL_ARGS])
    result, _, output = sbatch(cluster, tiny, run_dir, env={
        "SAMI_TP": str(tensor), "SAMI_PP": str(pipeline), "SAMI_DEVICE_BUDGET_PARAMS": str(REHEARSAL_BUDGET),
        "SAMI_ITERATE_ARGS": args})
    assert result.returncode == 0, (result.stderr, output.read_text()[-4000:] if output and output.exists() else "")
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["complete"] and summary["run_dir"] == str(run_dir)
    megatron = {"processes": 2, "layout": {"tensor": tensor, "pipeline": pipeline, "expert": 1, "context": 1}}
    per_node = {"processes": 2, "layout": {"engine": "hf", "tensor": 1}}
    local = {"processes": 1, "layout": None}
    assert summary["layouts"] == {
        "prepare": {"convert": local}, "iter0/evaluate": {"generate": per_node, "score": megatron},
        "iter1/generate": {"generate": per_node}, "iter1/train": {"train": megatron},
        "iter1/export": {"convert": local}, "iter1/evaluate": {"generate": per_node, "score": megatron}}
