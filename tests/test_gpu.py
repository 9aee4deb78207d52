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
