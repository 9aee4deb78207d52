"""GPU lane: the same runtime, model builder, SAMI step, trainer and ``verify`` on CUDA with NCCL
and BF16; Transformer Engine's checkpoint keys where TE imports.

Skipped (visibly, with a reason) on machines without a GPU. ``scripts/gpu_check.sh`` runs these
tests one check at a time and prints a PASS/FAIL line per check.
"""

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_sami.testing.multiprocess import run_distributed

import gpu_jobs

pytestmark = pytest.mark.gpu

# The tiny model has 256 positions; sami-train's default data.seq_length (512) exceeds them.
SEQ_LENGTH = 256


@pytest.fixture(scope="module")
def tiny_sami(tmp_path_factory) -> Path:
    """A tiny Llama (HF dir ``hf``, converted checkpoint ``ckpt``) and 8 records ``records.jsonl``."""
    import sami_jobs

    return sami_jobs.make_training_inputs(tmp_path_factory.mktemp("gpu-sami"))


def sami_train(root: Path, run_dir: Path, *overrides: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=1", "-m",
               "megatron_sami.cli.train", f"checkpoint={root / 'ckpt'}", f"data.records={root / 'records.jsonl'}",
               f"run_dir={run_dir}", "queries_per_step=4", "precision.params_dtype=bf16",
               f"data.seq_length={SEQ_LENGTH}", *overrides]
    return subprocess.run(command, capture_output=True, text=True, timeout=900)


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("model_name", ["tiny-llama", "tiny-mixtral"])
def test_bf16_forward_backward_on_gpu_uses_nccl_and_no_cpu_layer(model_name):
    (report,) = run_distributed(gpu_jobs.bf16_forward_backward_on_gpu, 1, model_name, backend="nccl")
    assert report["backend"] == "nccl" and report["device"] == "cuda"
    assert report["dtype"] == "torch.bfloat16"
    assert report["layer_cpu_compat"] is False
    assert math.isfinite(report["loss"]) and abs(report["loss"] - math.log(250)) < 1.0


@pytest.mark.parametrize("share", [False, True], ids=["pairs", "shared-prompts"])
def test_cxc_matrices_on_cuda_equal_transformers(tiny_sami, share):
    """The C x C log-probability matrices computed on the GPU (fp32) equal transformers' on the CPU."""
    import sami_jobs

    hf_dir, ckpt = str(tiny_sami / "hf"), str(tiny_sami / "ckpt")
    expected = sami_jobs.hf_matrices(hf_dir, sami_jobs.tokenized(hf_dir, 3, 3), 3, "sum")
    (got,) = run_distributed(sami_jobs.megatron_matrices, 1, ckpt, hf_dir, 3, 3, 1, 1, "sum", False, share,
                             backend="nccl")
    assert got.device.type == "cpu"
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("share_prompts", [True, False], ids=["shared-prompts", "pairs"])
def test_sami_train_bf16_on_gpu_logs_finite_loss_and_tflops(tiny_sami, tmp_path, share_prompts):
    """sami-train end to end on one GPU in BF16: the batches reach the GPU, the loss is finite,
    and the step log carries model TFLOP/s, and MFU where the GPU's peak is known."""
    run_dir = tmp_path / "run"
    result = sami_train(tiny_sami, run_dir, "steps=3", f"data.share_prompts={str(share_prompts).lower()}")
    assert result.returncode == 0, result.stderr[-3000:]
    rows = metrics(run_dir)
    assert [row["step"] for row in rows] == [1, 2, 3]
    assert all(math.isfinite(row["loss"]) and row["tflops_per_gpu"] > 0 for row in rows)
    if re.search(r"\b(H100|H200|A100|B200)\b", torch.cuda.get_device_name()):
        assert all(row["mfu"] is not None and 0 < row["mfu"] < 1 for row in rows)


def test_bf16_run_on_gpu_resumes_on_the_same_loss_curve(tiny_sami, tmp_path):
    """4 steps, against 2 steps and the same run_dir rerun to 4: the rerun resumes at step 2 and
    continues the curve (GPU kernels are not bitwise deterministic, so within 0.5 %; a run
    restarted from step 0 instead differs by about 1.5 % at step 3)."""
    reference, stopped = tmp_path / "reference", tmp_path / "stopped"
    for run_dir, steps in ((reference, 4), (stopped, 2), (stopped, 4)):
        done = sami_train(tiny_sami, run_dir, f"steps={steps}", "optimizer.lr=1e-3")
        assert done.returncode == 0, done.stderr[-3000:]
    assert re.search(r"resumed from \S+ at step 2", done.stderr), done.stderr[-3000:]
    expected, got = metrics(reference), metrics(stopped)
    assert [row["step"] for row in got] == [1, 2, 3, 4]
    for row, reference_row in zip(got[2:], expected[2:], strict=True):
        assert row["loss"] == pytest.approx(reference_row["loss"], rel=5e-3)


def test_verify_on_gpu_matches_transformers(tiny_sami):
    """``sami-convert verify`` with the checkpoint's model on the GPU and transformers on the CPU."""
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=1", "-m",
         "megatron_sami.cli.convert", "verify", str(tiny_sami / "hf"), str(tiny_sami / "ckpt")],
        capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:] + done.stdout[-1000:]
    assert "OK" in done.stdout and "device=cuda" in done.stderr, done.stderr[-3000:]


def test_fp8_without_transformer_engine_is_refused(tiny_sami, tmp_path):
    from megatron_sami.models.build import transformer_engine_problem

    if transformer_engine_problem() is None:
        pytest.skip("Transformer Engine imports here; the refusal is for GPUs without it")
    result = sami_train(tiny_sami, tmp_path / "run", "steps=1", "precision.fp8=e4m3")
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    # torchrun exits 1 when its worker exits 2 (the CLI's user error).
    assert result.returncode != 0 and len(errors) == 1 and "Transformer Engine" in errors[0], result.stderr[-3000:]
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_transformer_engine_spec_writes_the_local_key_set(tmp_path):
    """With the real TE modules: the TE spec's checkpoint keys are the local spec's plus
    ``_extra_state`` entries (``tests/test_te_lane.py`` checks this with stand-ins on CPU), and a
    checkpoint converted on the local lane loads on the TE lane."""
    from megatron_sami.models.build import transformer_engine_problem

    problem = transformer_engine_problem()
    if problem is not None:
        pytest.skip(problem)
    for model_name in ("tiny-llama", "tiny-mixtral"):
        (lanes,) = run_distributed(gpu_jobs.lane_entries_and_cross_load, 1, model_name, str(tmp_path / model_name),
                                   backend="nccl")
        weights = {lane: {key: entry for key, entry in lanes[lane].items() if entry[0] != "extra_state"}
                   for lane in ("local", "te")}
        assert weights["local"] == weights["te"], model_name
        assert all(key.endswith("_extra_state") for key in set(lanes["te"]) ^ set(lanes["local"])), model_name
        assert lanes["mismatched"] == [], model_name
