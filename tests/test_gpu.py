"""GPU lane: the same runtime and model builder on CUDA with NCCL and BF16.

Skipped (visibly, with a reason) on machines without a GPU.
"""

import math

import pytest

from megatron_sami.testing.multiprocess import run_distributed

import gpu_jobs

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("model_name", ["tiny-llama", "tiny-mixtral"])
def test_bf16_forward_backward_on_gpu_uses_nccl_and_no_cpu_layer(model_name):
    (report,) = run_distributed(gpu_jobs.bf16_forward_backward_on_gpu, 1, model_name)
    assert report["backend"] == "nccl" and report["device"] == "cuda"
    assert report["dtype"] == "torch.bfloat16"
    assert report["layer_cpu_compat"] is False
    assert math.isfinite(report["loss"]) and abs(report["loss"] - math.log(250)) < 1.0


@pytest.mark.parametrize("share_prompts", [True, False], ids=["shared-prompts", "pairs"])
def test_sami_train_bf16_on_gpu_logs_finite_loss_and_tflops(tmp_path, share_prompts):
    """sami-train end to end on one GPU in BF16: the batches reach the GPU, the loss is finite,
    and the step log carries model TFLOP/s (and MFU where the GPU's peak is known)."""
    import json
    import subprocess
    import sys

    import sami_jobs
    import torch

    from megatron_sami.alignment.data import SamiRecord

    sami_jobs.make_tiny_sami_model(tmp_path)
    records = [SamiRecord(f"q{i}", sami_jobs.QUERIES[i % 8], sami_jobs.CONSTITUTIONS[:2],
                          [f"Yes, gladly: step {i} is to help.", f"No. I refuse to do {i}."]) for i in range(8)]
    sami_jobs.write_records(tmp_path / "records.jsonl", records)
    run_dir = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=1", "-m",
         "megatron_sami.cli.train", f"checkpoint={tmp_path / 'ckpt'}", f"data.records={tmp_path / 'records.jsonl'}",
         f"run_dir={run_dir}", "steps=3", "queries_per_step=4", "precision.params_dtype=bf16",
         f"data.share_prompts={str(share_prompts).lower()}"], capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [1, 2, 3]
    assert all(math.isfinite(row["loss"]) and row["tflops_per_gpu"] > 0 for row in rows)
    if any(name in torch.cuda.get_device_name() for name in ("H100", "H200", "A100")):
        assert all(0 < row["mfu"] < 1 for row in rows)
