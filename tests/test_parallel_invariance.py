"""Invariance of real Megatron-Core code under parallel layouts, as multi-process gloo jobs.

A reference is made once at TP=PP=EP=1 (random init, saved as a distributed checkpoint); each
layout loads that checkpoint and must reproduce the reference: logits for TP and EP, the loss
and gradient norm through the pipeline schedule for PP, and the loss curve of five optimizer
steps with the distributed optimizer for TP=2 and for DP=2.
"""

import pytest
import torch

from megatron_sami.testing.multiprocess import run_distributed

import megatron_jobs as jobs

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """name -> (checkpoint dir, TP=1 logits) for the dense and the MoE test model."""
    made = {}
    for name in ("tiny-llama", "tiny-llama-tied", "tiny-mixtral"):
        ckpt = str(tmp_path_factory.mktemp(name) / "ckpt")
        (logits,) = run_distributed(jobs.create_reference, 1, name, ckpt)
        made[name] = (ckpt, logits)
    return made


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-llama-tied"])
def test_tp2_logits_equal_tp1(reference, name):
    ckpt, expected = reference[name]
    results = run_distributed(jobs.logits_at_layout, 2, name, ckpt, 2, 1, 1)
    for logits in results:
        torch.testing.assert_close(logits, expected, rtol=0, atol=2e-5)


@pytest.mark.parametrize(("tensor", "pipeline"), [(1, 2), (2, 2)], ids=["PP2", "TP2xPP2"])
def test_pipeline_loss_and_grad_norm_equal_single_process(reference, tensor, pipeline):
    ckpt, _ = reference["tiny-llama"]
    (single,) = run_distributed(jobs.loss_at_layout, 1, "tiny-llama", ckpt, 1, 1)
    results = run_distributed(jobs.loss_at_layout, tensor * pipeline, "tiny-llama", ckpt, tensor, pipeline)
    for loss, grad_norm in results:
        assert loss == pytest.approx(single[0], rel=1e-6)
        assert grad_norm == pytest.approx(single[1], rel=1e-5)


def test_ep2_moe_logits_equal_ep1(reference):
    ckpt, expected = reference["tiny-mixtral"]
    for logits in run_distributed(jobs.logits_at_layout, 2, "tiny-mixtral", ckpt, 1, 1, 2):
        torch.testing.assert_close(logits, expected, rtol=0, atol=2e-5)


def test_five_distributed_optimizer_steps_tp2_equal_tp1(reference):
    ckpt, _ = reference["tiny-llama"]
    (single,) = run_distributed(jobs.train_losses, 1, "tiny-llama", ckpt, 1, 4, 2)
    assert single[-1] < single[0] or len(set(single)) > 1  # the weights really moved
    for losses in run_distributed(jobs.train_losses, 2, "tiny-llama", ckpt, 2, 4, 2):
        assert losses == pytest.approx(single, rel=1e-5)


def test_dp2_equals_dp1_with_the_same_global_batch(reference):
    ckpt, _ = reference["tiny-llama"]
    # DP=1 accumulates 2 microbatches of 2; DP=2 takes one microbatch of 2 per rank.
    (single,) = run_distributed(jobs.train_losses, 1, "tiny-llama", ckpt, 1, 4, 2)
    for losses in run_distributed(jobs.train_losses, 2, "tiny-llama", ckpt, 1, 4, 2):
        assert losses == pytest.approx(single, rel=1e-5)


def test_rmsprop_follows_torch_rmsprop_on_the_same_gradients(reference):
    ckpt, _ = reference["tiny-llama"]
    (max_difference,) = run_distributed(jobs.rmsprop_against_torch, 1, "tiny-llama", ckpt)
    assert max_difference < 1e-6


def test_rmsprop_with_the_distributed_optimizer_is_refused():
    from megatron_sami.errors import ConfigError
    from megatron_sami.training.engine import OptimizerSettings

    with pytest.raises(ConfigError, match="use_distributed_optimizer=false"):
        OptimizerSettings(name="rmsprop", use_distributed_optimizer=True)
