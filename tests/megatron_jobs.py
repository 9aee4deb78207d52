"""Rank bodies for the multi-process Megatron tests (each runs inside one local process).

Every body initialises the project's real runtime from the launcher variables that
``run_distributed`` sets (the backend among them), builds the real ``GPTModel``, and tears down
at the end. Inputs go to the runtime's device; results may stay there (the harness brings
tensors back on the CPU).
"""

from __future__ import annotations

import torch

from megatron_sami.conversion.verify import megatron_logits
from megatron_sami.models.build import build_gpt_model
from megatron_sami.models.catalogue import load_model_config
from megatron_sami.models.checkpoint import load_model, save_model
from megatron_sami.models.config import PrecisionConfig
from megatron_sami.runtime.distributed import collective_device, megatron_runtime
from megatron_sami.runtime.layout import ParallelConfig
from megatron_sami.testing.lm import lm_forward_step, make_lm_batches
from megatron_sami.training.engine import (
    OptimizerSettings,
    build_optimizer,
    forward_backward,
    reduce_logs,
    train_step,
    wrap_ddp,
)

SEQ_LENGTH = 32
FP32 = PrecisionConfig(params_dtype="fp32")


def sample_tokens(vocab_size: int, batch: int = 2, seed: int = 7) -> torch.Tensor:
    return torch.randint(0, vocab_size, (batch, SEQ_LENGTH), generator=torch.Generator().manual_seed(seed))


def sum_sequence_parallel_grads(model) -> None:
    """Sum the gradients of the weights marked ``sequence_parallel`` (norms, the MoE router) over
    TP, as megatron-core's ``finalize_model_grads`` does in training: under sequence parallelism
    each TP rank holds the gradient of its slice of the sequence only (collective over TP)."""
    from megatron.core import parallel_state

    for param in model.parameters():
        if param.grad is not None and getattr(param, "sequence_parallel", False):
            torch.distributed.all_reduce(param.grad, group=parallel_state.get_tensor_model_parallel_group())


def counted_grads(model) -> list[torch.Tensor]:
    """Each weight's gradient once: TP-replicated weights (norms) only from TP rank 0, summed
    over TP first under sequence parallelism (:func:`sum_sequence_parallel_grads`)."""
    from megatron.core import parallel_state, tensor_parallel

    sum_sequence_parallel_grads(model)
    return [p.grad for p in model.parameters() if p.grad is not None and (
        parallel_state.get_tensor_model_parallel_rank() == 0
        or tensor_parallel.param_is_not_tensor_parallel_duplicate(p))]


def model_parallel_norm(grads: list[torch.Tensor]) -> float:
    """The L2 norm of gradients spread over the TP x PP ranks of one model replica."""
    from megatron.core import parallel_state

    grad_sq = torch.tensor([sum(float(g.double().pow(2).sum()) for g in grads)], dtype=torch.float64,
                           device=collective_device())
    torch.distributed.all_reduce(grad_sq, group=parallel_state.get_model_parallel_group())
    return float(grad_sq.sqrt())


def create_reference(model_name: str, ckpt_dir: str, seed: int = 1234) -> torch.Tensor:
    """One process: random init at TP=1, save a distributed checkpoint, return logits."""
    config = load_model_config(model_name)
    parallel = ParallelConfig()
    with megatron_runtime(parallel, model=config, seed=seed) as info:
        model = build_gpt_model(config, parallel, FP32, SEQ_LENGTH)
        save_model(model, ckpt_dir)
        return megatron_logits(model, sample_tokens(config.vocab_size).to(info.device), config.vocab_size)


def logits_at_layout(model_name: str, ckpt_dir: str, tensor: int, pipeline: int, expert: int):
    """Load the checkpoint at a layout and return this rank's gathered logits."""
    config = load_model_config(model_name)
    parallel = ParallelConfig(tensor=tensor, pipeline=pipeline, expert=expert)
    # A different seed: the weights must come from the checkpoint, not from the init.
    with megatron_runtime(parallel, model=config, seed=99) as info:
        model = build_gpt_model(config, parallel, FP32, SEQ_LENGTH)
        load_model(model, ckpt_dir)
        return megatron_logits(model, sample_tokens(config.vocab_size).to(info.device), config.vocab_size)


def loss_at_layout(model_name: str, ckpt_dir: str, tensor: int, pipeline: int, num_microbatches: int = 2):
    """Forward+backward through the schedule; the mean loss and the global gradient norm."""
    config = load_model_config(model_name)
    parallel = ParallelConfig(tensor=tensor, pipeline=pipeline)
    with megatron_runtime(parallel, model=config, seed=99):
        model = build_gpt_model(config, parallel, FP32, SEQ_LENGTH)
        load_model(model, ckpt_dir)
        batches = make_lm_batches(num_microbatches, 2, SEQ_LENGTH, config.vocab_size, seed=5)
        logs = forward_backward(model, lm_forward_step, iter(batches), num_microbatches, SEQ_LENGTH, 2)
        return reduce_logs(logs)["loss"], model_parallel_norm(counted_grads(model))


def train_losses(
    model_name: str, ckpt_dir: str, tensor: int, global_batch: int, micro_batch: int,
    num_steps: int = 5, use_distributed_optimizer: bool = True,
) -> list[float]:
    """``num_steps`` optimizer steps; each DP rank takes its slice of the same global batches."""
    from megatron.core import parallel_state

    config = load_model_config(model_name)
    parallel = ParallelConfig(tensor=tensor)
    with megatron_runtime(parallel, model=config, seed=99) as info:
        model = build_gpt_model(config, parallel, FP32, SEQ_LENGTH)
        load_model(model, ckpt_dir)
        ddp_model = wrap_ddp(model, use_distributed_optimizer)
        optimizer = build_optimizer(ddp_model, OptimizerSettings(
            lr=1e-3, use_distributed_optimizer=use_distributed_optimizer, clip_grad=1.0))
        dp_rank, dp_size = parallel_state.get_data_parallel_rank(), info.data_parallel_size
        per_rank = global_batch // dp_size
        num_microbatches = per_rank // micro_batch
        losses = []
        for step in range(num_steps):
            # The same global batch for every layout: samples sliced by DP rank.
            (whole,) = make_lm_batches(1, global_batch, SEQ_LENGTH, config.vocab_size, seed=100 + step)
            mine = {key: value[dp_rank * per_rank:(dp_rank + 1) * per_rank] for key, value in whole.items()}
            micro = [{key: value[i * micro_batch:(i + 1) * micro_batch] for key, value in mine.items()}
                     for i in range(num_microbatches)]
            result = train_step(ddp_model, optimizer, lm_forward_step, iter(micro), num_microbatches,
                                SEQ_LENGTH, micro_batch)
            losses.append(result.loss)
        return losses


def rmsprop_against_torch(model_name: str, ckpt_dir: str, num_steps: int = 3) -> float:
    """Largest parameter difference between megatron-core + our RMSprop and torch's RMSprop fed
    the same gradients, after ``num_steps`` steps."""
    config = load_model_config(model_name)
    parallel = ParallelConfig()
    with megatron_runtime(parallel, model=config, seed=99):
        model = build_gpt_model(config, parallel, FP32, SEQ_LENGTH)
        load_model(model, ckpt_dir)
        ddp_model = wrap_ddp(model, use_distributed_optimizer=False)
        settings = OptimizerSettings(name="rmsprop", lr=1e-3, clip_grad=1e9, use_distributed_optimizer=False,
                                     rmsprop_alpha=0.9, rmsprop_momentum=0.5)
        optimizer = build_optimizer(ddp_model, settings)
        params = [p for p in model.parameters() if p.requires_grad]
        reference = [p.detach().clone().requires_grad_(True) for p in params]
        torch_rmsprop = torch.optim.RMSprop(reference, lr=1e-3, alpha=0.9, eps=settings.rmsprop_eps, momentum=0.5)
        for step in range(num_steps):
            (batch,) = make_lm_batches(1, 2, SEQ_LENGTH, config.vocab_size, seed=200 + step)
            ddp_model.zero_grad_buffer()
            optimizer.zero_grad()
            forward_backward(ddp_model, lm_forward_step, iter([batch]), 1, SEQ_LENGTH, 2)
            for ref, param in zip(reference, params, strict=True):
                ref.grad = param.main_grad.detach().clone()
            optimizer.step()
            torch_rmsprop.step()
        return max(float((p.detach() - r.detach()).abs().max()) for p, r in zip(params, reference, strict=True))
