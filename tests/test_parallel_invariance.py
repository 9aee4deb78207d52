"""Invariance of real Megatron-Core code under parallel layouts, as multi-process jobs.

A reference is made once at TP=PP=EP=1 (random init, saved as a distributed checkpoint); each
layout loads that checkpoint and must reproduce the reference: logits for TP and EP, the loss
and gradient norm through the pipeline schedule for PP, and the loss curve of five optimizer
steps with the distributed optimizer for TP=2 and for DP=2.

Every check runs once per backend of ``BACKENDS``: gloo on the CPU everywhere, NCCL on GPUs
where at least two are visible (skipped with the reason elsewhere). The reference is made on
the same backend as the layouts it is compared with.
"""

import pytest
import torch

from megatron_sami.testing.backends import BACKENDS, require_gpus_for
from megatron_sami.testing.multiprocess import run_distributed

import megatron_jobs as jobs

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", params=BACKENDS)
def backend(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def reference(tmp_path_factory, backend):
    """name -> (checkpoint dir, TP=1 logits) for the dense and the MoE test model."""
    made = {}
    for name in ("tiny-llama", "tiny-llama-tied", "tiny-mixtral"):
        ckpt = str(tmp_path_factory.mktemp(f"{name}-{backend}") / "ckpt")
        (logits,) = run_distributed(jobs.create_reference, 1, name, ckpt, backend=backend)
        made[name] = (ckpt, logits)
    return made


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-llama-tied"])
def test_tp2_logits_equal_tp1(reference, backend, name):
    ckpt, expected = reference[name]
    results = run_distributed(jobs.logits_at_layout, 2, name, ckpt, 2, 1, 1, backend=backend)
    for logits in results:
        torch.testing.assert_close(logits, expected, rtol=0, atol=2e-5)


@pytest.mark.parametrize(("tensor", "pipeline"), [(1, 2), (2, 2)], ids=["PP2", "TP2xPP2"])
def test_pipeline_loss_and_grad_norm_equal_single_process(reference, backend, tensor, pipeline):
    require_gpus_for(backend, tensor * pipeline)
    ckpt, _ = reference["tiny-llama"]
    (single,) = run_distributed(jobs.loss_at_layout, 1, "tiny-llama", ckpt, 1, 1, backend=backend)
    results = run_distributed(jobs.loss_at_layout, tensor * pipeline, "tiny-llama", ckpt, tensor, pipeline,
                              backend=backend)
    for loss, grad_norm in results:
        assert loss == pytest.approx(single[0], rel=1e-6)
        assert grad_norm == pytest.approx(single[1], rel=1e-5)


def test_ep2_moe_logits_equal_ep1(reference, backend):
    ckpt, expected = reference["tiny-mixtral"]
    for logits in run_distributed(jobs.logits_at_layout, 2, "tiny-mixtral", ckpt, 1, 1, 2, backend=backend):
        torch.testing.assert_close(logits, expected, rtol=0, atol=2e-5)


def test_five_distributed_optimizer_steps_tp2_equal_tp1(reference, backend):
    ckpt, _ = reference["tiny-llama"]
    (single,) = run_distributed(jobs.train_losses, 1, "tiny-llama", ckpt, 1, 4, 2, backend=backend)
    assert single[-1] < single[0] or len(set(single)) > 1  # the weights really moved
    for losses in run_distributed(jobs.train_losses, 2, "tiny-llama", ckpt, 2, 4, 2, backend=backend):
        assert losses == pytest.approx(single, rel=1e-5)


def test_dp2_equals_dp1_with_the_same_global_batch(reference, backend):
    ckpt, _ = reference["tiny-llama"]
    # DP=1 accumulates 2 microbatches of 2; DP=2 takes one microbatch of 2 per rank.
    (single,) = run_distributed(jobs.train_losses, 1, "tiny-llama", ckpt, 1, 4, 2, backend=backend)
    for losses in run_distributed(jobs.train_losses, 2, "tiny-llama", ckpt, 1, 4, 2, backend=backend):
        assert losses == pytest.approx(single, rel=1e-5)


def test_rmsprop_follows_torch_rmsprop_on_the_same_gradients(reference, backend):
    ckpt, _ = reference["tiny-llama"]
    (max_difference,) = run_distributed(jobs.rmsprop_against_torch, 1, "tiny-llama", ckpt, backend=backend)
    assert max_difference < 1e-6


def test_rmsprop_with_the_distributed_optimizer_is_refused():
    from megatron_sami.errors import ConfigError
    from megatron_sami.training.engine import OptimizerSettings

    with pytest.raises(ConfigError, match="use_distributed_optimizer=false"):
        OptimizerSettings(name="rmsprop", use_distributed_optimizer=True)
