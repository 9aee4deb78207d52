"""The training half of the seam around megatron-core: DDP, optimizer, one training step.

Everything here runs the same megatron-core code on GPU (NCCL) and CPU (gloo):
``DistributedDataParallel`` with optional distributed optimizer, ``get_megatron_optimizer``,
and ``get_forward_backward_func`` for any pipeline size. The loss is supplied by the caller
as a ``forward_step_func(data_iterator, model) -> (output, loss_func)``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist

from megatron_sami.errors import ConfigError
from megatron_sami.runtime.distributed import collective_device


@dataclass
class OptimizerSettings:
    """Optimizer and gradient settings (the learning-rate schedule lives with the trainer).

    Raises:
        ConfigError: an unknown optimizer, a negative learning rate, or RMSprop with the
            distributed optimizer.
    """

    name: str = "adam"  # adam (AdamW: decoupled weight decay), rmsprop, sgd
    lr: float = 5e-7  # the peak learning rate; lr_schedule shapes it over the run
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    rmsprop_alpha: float = 0.99  # smoothing constant of the squared-gradient average
    rmsprop_eps: float = 1e-8
    rmsprop_momentum: float = 0.0
    clip_grad: float = 1.0
    use_distributed_optimizer: bool = True
    # How the distributed optimizer's state is checkpointed (training/checkpointing.py):
    # dp_reshardable (each rank writes its shard; a resume may change DP only) or fully_reshardable
    # (gathered into model space; a resume may change TP, PP, EP and DP).
    checkpoint_format: str = "dp_reshardable"
    # megatron-core DDP's communication overlapped with compute; null: on where CUDA (NCCL) is used,
    # off on CPU (gloo: one reduction after backward). overlap_grad_reduce: each gradient bucket is
    # reduced as soon as backward has filled it. overlap_param_gather (distributed optimizer only):
    # the updated parameters are all-gathered bucket by bucket during the next forward pass, not
    # after the optimizer step (the trainer gathers them before a checkpoint reads them).
    overlap_grad_reduce: bool | None = None
    overlap_param_gather: bool | None = None

    def __post_init__(self) -> None:
        if self.name not in ("adam", "rmsprop", "sgd"):
            raise ConfigError(f"optimizer.name '{self.name}' is not supported; use adam, rmsprop or sgd.")
        if self.lr < 0:
            raise ConfigError(f"optimizer.lr must be >= 0, got {self.lr}.")
        if self.checkpoint_format not in ("dp_reshardable", "fully_reshardable"):
            raise ConfigError(f"optimizer.checkpoint_format '{self.checkpoint_format}' is unknown; use dp_reshardable "
                              "or fully_reshardable.")
        if self.name == "rmsprop" and self.use_distributed_optimizer:
            # megatron-core's distributed optimizer shards and checkpoints Adam-shaped state only.
            raise ConfigError("optimizer.name=rmsprop needs optimizer.use_distributed_optimizer=false (megatron-core's "
                              "distributed optimizer only checkpoints Adam-style state).")
        if self.overlap_param_gather and not self.use_distributed_optimizer:
            raise ConfigError("optimizer.overlap_param_gather=true needs optimizer.use_distributed_optimizer=true (only "
                              "the distributed optimizer gathers parameters); set one of them, or leave "
                              "overlap_param_gather null.")
        if self.overlap_param_gather and self.overlap_grad_reduce is False:
            # Megatron-LM's own rule (arguments.py): the gather is scheduled around the overlapped reduction.
            raise ConfigError("optimizer.overlap_param_gather=true needs optimizer.overlap_grad_reduce=true (as "
                              "Megatron-LM requires); set one of them, or leave them null.")

    def overlap(self, on_gpu: bool) -> tuple[bool, bool]:
        """(overlap_grad_reduce, overlap_param_gather) as resolved for a run with or without CUDA:
        a null ``overlap_grad_reduce`` is ``on_gpu`` (or true when the gather is set on); a null
        ``overlap_param_gather`` is on with CUDA, the distributed optimizer and the overlapped
        reduction."""
        grad = self.overlap_grad_reduce
        if grad is None:
            grad = on_gpu or bool(self.overlap_param_gather)
        param = self.overlap_param_gather
        if param is None:
            param = on_gpu and self.use_distributed_optimizer and grad
        return grad, param


def ddp_config(settings: OptimizerSettings, on_gpu: bool | None = None):
    """megatron-core's ``DistributedDataParallelConfig`` for ``settings``: FP32 gradient buffers,
    the distributed optimizer if set, and the overlap of :meth:`OptimizerSettings.overlap`
    (``on_gpu`` None: whether CUDA is available).

    With ``overlap_param_gather`` the parameters are current only after the next forward pass
    began gathering them; whoever reads them before (a checkpoint save) first calls
    :func:`gather_parameters`.
    """
    from megatron.core.distributed import DistributedDataParallelConfig

    grad, param = settings.overlap(torch.cuda.is_available() if on_gpu is None else on_gpu)
    return DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=grad,
        overlap_param_gather=param,
        use_distributed_optimizer=settings.use_distributed_optimizer,
    )


def wrap_ddp(model: torch.nn.Module, settings: OptimizerSettings | bool | None = None, *,
             use_distributed_optimizer: bool | None = None) -> torch.nn.Module:
    """Wrap a GPTModel in megatron-core DDP configured by :func:`ddp_config` from ``settings``
    (the trainer's ``optimizer``); a bool (or ``use_distributed_optimizer``) stands for settings
    with that distributed-optimizer flag and every other key at its default."""
    from megatron.core.distributed import DistributedDataParallel

    if not isinstance(settings, OptimizerSettings):
        flag = settings if use_distributed_optimizer is None else use_distributed_optimizer
        settings = OptimizerSettings(use_distributed_optimizer=bool(flag))
    return DistributedDataParallel(config=model.config, ddp_config=ddp_config(settings), module=model)


def gather_parameters(ddp_model: torch.nn.Module) -> None:
    """Finish the parameter all-gather that ``overlap_param_gather`` leaves to the next forward
    pass, so that the weights are current before a checkpoint save reads them (collective over
    the data-parallel group; nothing to do without the overlap). What Megatron-LM's loop does
    before saving (``disable_forward_pre_hook(param_sync=True)``); the next step's gradient
    reduction marks the buckets for gathering again (megatron-core 0.19 ``finish_grad_sync``)."""
    if getattr(ddp_model, "ddp_config", None) is None or not ddp_model.ddp_config.overlap_param_gather:
        return
    with torch.no_grad():
        ddp_model.start_param_sync(force_sync=True)


def build_optimizer(ddp_model: torch.nn.Module, settings: OptimizerSettings):
    """megatron-core's optimizer over the DDP-wrapped model, wired into its config."""
    from megatron.core.distributed import finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    model_config = ddp_model.config
    config = OptimizerConfig(
        # megatron-core has no RMSprop: it builds its wrappers around SGD, whose torch optimizer
        # is then replaced by torch's RMSprop over the same parameter groups.
        optimizer="sgd" if settings.name == "rmsprop" else settings.name,
        # A placeholder: megatron-core keeps it as each group's ``max_lr``, one of the keys it matches
        # parameter groups by on load (optimizer.py ``param_group_identifier_keys``), so the configured
        # peak would make a resume with another optimizer.lr unloadable. The groups' working ``lr``
        # is set below (and the trainer sets it before every step from alignment/schedule.py).
        lr=1.0,
        weight_decay=settings.weight_decay,
        adam_beta1=settings.adam_beta1,
        adam_beta2=settings.adam_beta2,
        adam_eps=settings.adam_eps,
        clip_grad=settings.clip_grad,
        bf16=model_config.bf16,
        params_dtype=model_config.params_dtype,
        use_distributed_optimizer=settings.use_distributed_optimizer,
    )
    optimizer = get_megatron_optimizer(config, [ddp_model])
    for group in optimizer.param_groups:
        group["lr"] = settings.lr
    if settings.name == "rmsprop":
        _use_rmsprop(optimizer, settings)
    # What megatron's own training loop wires up: gradient all-reduce (DP, embeddings tied
    # across pipeline stages, layer norms under sequence parallelism) after backward.
    model_config.finalize_model_grads_func = finalize_model_grads
    model_config.no_sync_func = ddp_model.no_sync
    model_config.grad_scale_func = optimizer.scale_loss
    return optimizer


def _use_rmsprop(optimizer, settings: OptimizerSettings) -> None:
    for inner in getattr(optimizer, "chained_optimizers", [optimizer]):
        groups = [{key: value for key, value in group.items() if key not in ("momentum", "dampening", "nesterov")}
                  for group in inner.optimizer.param_groups]
        inner.optimizer = torch.optim.RMSprop(groups, lr=settings.lr, alpha=settings.rmsprop_alpha,
                                              eps=settings.rmsprop_eps, weight_decay=settings.weight_decay,
                                              momentum=settings.rmsprop_momentum)
        inner.init_state_fn = _init_rmsprop_state


def _init_rmsprop_state(torch_optimizer, config=None) -> None:
    """The state torch's RMSprop creates on its first step, for a checkpoint load to fill."""
    for group in torch_optimizer.param_groups:
        for param in group["params"]:
            state = torch_optimizer.state[param]
            if not state:
                state["step"] = torch.tensor(0.0)
                state["square_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
                if group["momentum"] > 0:
                    state["momentum_buffer"] = torch.zeros_like(param, memory_format=torch.preserve_format)


def materialize_optimizer_state(optimizer) -> None:
    """Give a fresh optimizer the state tensors a checkpoint load fills in place.

    torch's Adam creates its state lazily on the first step, and megatron-core's optimizer
    state dict asserts it exists; a step on zero gradients creates it without changing the
    parameters (Adam's update is 0 for zero moments; weight decay is restored by the load).
    """
    for inner in getattr(optimizer, "chained_optimizers", [optimizer]):
        if _init_distributed_optimizer_state(inner):
            continue
        for group in inner.optimizer.param_groups:
            for param in group["params"]:
                param.grad = torch.zeros_like(param)
        inner.optimizer.step()
        inner.optimizer.zero_grad()


def _init_distributed_optimizer_state(inner) -> bool:
    """Let megatron-core's distributed optimizer fill its state with placeholders; False for an
    optimizer without that method. Private API of megatron-core 0.19.x
    (``DistributedOptimizer._init_optimizer_states_with_dummy_values``)."""
    if not hasattr(inner, "_init_optimizer_states_with_dummy_values"):
        return False
    inner._init_optimizer_states_with_dummy_values()
    return True


def _torch_optimizers(optimizer):
    """The torch optimizers inside megatron-core's (chained) optimizer."""
    for inner in getattr(optimizer, "chained_optimizers", [optimizer]):
        yield inner.optimizer


def counts_per_group(torch_optimizer) -> bool:
    """Whether ``torch_optimizer`` keeps its update count per parameter group (``group["step"]``,
    an int, or a tensor when capturable): Transformer Engine's ``FusedAdam``, which megatron-core
    uses when TE imports, and Apex's ("assume same step across group", TE
    ``pytorch/optimizers/fused_adam.py`` ``step``; their per-parameter state holds only moments and
    master weights). torch's own optimizers count per parameter (``state[p]["step"]``); their
    groups may carry a stale ``step`` too, which megatron-core's distributed optimizer writes into
    the groups it saves and loads, so the class decides, not the keys."""
    return not type(torch_optimizer).__module__.startswith("torch.")


def optimizer_step_count(optimizer) -> int:
    """How many updates the optimizer has applied, read where it keeps the count
    (:func:`counts_per_group`); 0 before any update."""
    counts = []
    for torch_optimizer in _torch_optimizers(optimizer):
        if counts_per_group(torch_optimizer):
            counts += [int(group["step"]) for group in torch_optimizer.param_groups
                       if group["params"] and "step" in group]
        else:
            counts += [int(state["step"]) for state in torch_optimizer.state.values() if "step" in state]
    return max(counts, default=0)


def set_optimizer_step_count(optimizer, count: int) -> None:
    """Restore the update count after a checkpoint load where the optimizer keeps it
    (:func:`counts_per_group`): in each non-empty group (in the type it had; TE would try to
    checkpoint a per-parameter ``step`` as one of its scaled states), or one ``step`` tensor per
    parameter.

    megatron-core 0.19's ``DistributedOptimizer.load_state_dict`` (torch Adam, no Apex/TE) puts
    one and the same ``step`` tensor into every parameter's state, and its dp_reshardable load
    then copies the materialised placeholder (1) into it; its fully_reshardable load leaves it out
    (see :mod:`megatron_sami.training.checkpointing`). torch's Adam increments ``step`` in place
    once per parameter, so a shared tensor would advance by the number of parameters per update
    and give every parameter but the first a wrong bias correction: a fresh float32 tensor each
    (torch's own dtype for it, on the device of an existing one), not a fill of a shared one.
    """
    for torch_optimizer in _torch_optimizers(optimizer):
        if counts_per_group(torch_optimizer):
            for group in torch_optimizer.param_groups:
                step = group.get("step")
                if group["params"]:
                    group["step"] = torch.full_like(step, count) if isinstance(step, torch.Tensor) else int(count)
            continue
        for state in torch_optimizer.state.values():
            if not state:
                continue
            device = state["step"].device if "step" in state else torch.device("cpu")
            state["step"] = torch.tensor(float(count), dtype=torch.float32, device=device)


@dataclass
class StepResult:
    """One optimizer step: the mean loss (nats) and logs over microbatches and data-parallel
    ranks, the gradient norm (None when not computed) and the phases' wall-clock seconds."""

    loss: float
    grad_norm: float | None
    logs: dict[str, float]
    forward_backward_s: float = 0.0
    optimizer_s: float = 0.0


def forward_backward(
    model: torch.nn.Module,
    forward_step_func: Callable,
    data_iterator: Iterator,
    num_microbatches: int,
    seq_length: int,
    micro_batch_size: int,
    forward_only: bool = False,
    collect_non_loss_data: bool = False,
) -> list:
    """Run megatron-core's schedule for this pipeline layout (the one place that calls it).

    Args:
        model: the (DDP-wrapped or bare) model of this rank's pipeline stage.
        forward_step_func: ``forward_step(data_iterator, model) -> (output, loss_func)``, the
            Megatron contract; ``loss_func(output)`` returns ``(loss, logs)``.
        data_iterator: yields one microbatch per call of ``forward_step_func``.
        num_microbatches: microbatches in this step (on this data-parallel rank).
        seq_length: tokens per sequence (the shape pipeline stages exchange).
        micro_batch_size: sequences per microbatch.
        forward_only: no backward pass (evaluation, scoring).
        collect_non_loss_data: with ``forward_only``, call ``loss_func(output, non_loss_data=True)``
            and return what it returns for each microbatch instead of the loss logs.

    Returns:
        One entry per microbatch on the last pipeline stage (the loss logs, or the collected
        values); an empty list on the other stages.
    """
    from megatron.core.pipeline_parallel import get_forward_backward_func

    return get_forward_backward_func()(
        forward_step_func=forward_step_func,
        data_iterator=data_iterator,
        model=[model],
        num_microbatches=num_microbatches,
        seq_length=seq_length,
        micro_batch_size=micro_batch_size,
        forward_only=forward_only,
        collect_non_loss_data=collect_non_loss_data,
    )


def last_stage_result(tensor: torch.Tensor | None, shape: tuple[int, ...]) -> torch.Tensor:
    """The last pipeline stage's ``tensor`` on every rank of its pipeline group (collective).

    Args:
        tensor: the value on the last stage (fp32, ``shape``); ignored on the other stages,
            which may pass None.
        shape: its shape, which every stage knows.

    Returns:
        fp32 ``shape`` on :func:`~megatron_sami.runtime.distributed.collective_device` (or the
        last stage's own device); a sum over the pipeline group in which the other stages add
        zeros. Without pipeline parallelism the last stage's tensor itself.
    """
    from megatron.core import parallel_state

    if parallel_state.is_pipeline_last_stage():
        # contiguous: GPTModel returns transposed views, and gloo reduces raw storage.
        result = tensor.float().contiguous()
    else:
        result = torch.zeros(shape, device=collective_device())
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        dist.all_reduce(result, group=parallel_state.get_pipeline_model_parallel_group())
    return result


def data_parallel_rank() -> int:
    """This rank's index among the data-parallel replicas (0-based)."""
    from megatron.core import parallel_state

    return parallel_state.get_data_parallel_rank()


def sum_over_data_parallel(values: torch.Tensor) -> torch.Tensor:
    """``values`` summed in place over the data-parallel group (collective); returns it.

    The tensor must be on :func:`~megatron_sami.runtime.distributed.collective_device`.
    """
    from megatron.core import parallel_state

    if parallel_state.get_data_parallel_world_size() > 1:
        dist.all_reduce(values, group=parallel_state.get_data_parallel_group())
    return values


def any_rank(flag: bool) -> bool:
    """Whether ``flag`` is true on at least one rank of the job (collective over all ranks)."""
    value = torch.tensor([1.0 if flag else 0.0], device=collective_device())
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def reduce_logs(microbatch_logs: list[dict]) -> dict[str, float]:
    """Mean of each logged value over microbatches and data-parallel ranks, on every rank.

    Only the last pipeline stage holds losses; a sum over the pipeline group carries them to
    the other stages (whose contribution is zero).
    """
    from megatron.core import parallel_state

    keys = sorted(microbatch_logs[0]) if microbatch_logs else []
    keys = _broadcast_keys(keys)
    values = torch.zeros(len(keys), dtype=torch.float64)
    for logs in microbatch_logs:
        values += torch.tensor([float(logs[key]) for key in keys], dtype=torch.float64)
    if microbatch_logs:
        values /= len(microbatch_logs)
    values = values.to(collective_device())
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        dist.all_reduce(values, group=parallel_state.get_pipeline_model_parallel_group())
    dist.all_reduce(values, group=parallel_state.get_data_parallel_group())
    values /= parallel_state.get_data_parallel_world_size()
    return dict(zip(keys, values.tolist(), strict=True))


def _broadcast_keys(keys: list[str]) -> list[str]:
    """The last pipeline stage knows the log keys; give them to every rank."""
    from megatron.core import parallel_state

    if parallel_state.get_pipeline_model_parallel_world_size() == 1:
        return keys
    holder = [keys]
    group = parallel_state.get_pipeline_model_parallel_group()
    last_rank = parallel_state.get_pipeline_model_parallel_last_rank()
    dist.broadcast_object_list(holder, src=last_rank, group=group)
    return holder[0]


def train_step(
    ddp_model: torch.nn.Module,
    optimizer,
    forward_step_func: Callable,
    data_iterator: Iterator,
    num_microbatches: int,
    seq_length: int,
    micro_batch_size: int,
) -> StepResult:
    """One optimizer step: zero grads, forward/backward over all microbatches, step."""
    ddp_model.zero_grad_buffer()
    optimizer.zero_grad()
    start = time.perf_counter()
    microbatch_logs = forward_backward(
        ddp_model, forward_step_func, data_iterator, num_microbatches, seq_length, micro_batch_size
    )
    _synchronize()
    middle = time.perf_counter()
    _, grad_norm, _ = optimizer.step()
    _synchronize()
    end = time.perf_counter()
    logs = reduce_logs(microbatch_logs)
    return StepResult(loss=logs.get("loss", float("nan")), grad_norm=grad_norm, logs=logs,
                      forward_backward_s=middle - start, optimizer_s=end - middle)


def _synchronize() -> None:
    """Wait for queued GPU work so that wall-clock phases are measured, not kernel launches."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


# Dense peak TFLOP/s per GPU by dtype (tensor cores, no sparsity: the data sheets' sparse
# figures halved), keyed by the exact ``torch.cuda.get_device_name()``. Variants differ: the
# PCIe and NVL boards run lower clocks than SXM, GB200's B200 more than the HGX B200.
_SXM_HOPPER = {"bf16": 989.4, "fp8": 1978.9}
_NVL_HOPPER = {"bf16": 835.0, "fp8": 1671.0}
_A100 = {"bf16": 312.0}
PEAK_TFLOPS = {
    "NVIDIA H100 80GB HBM3": _SXM_HOPPER,  # H100 SXM5
    "NVIDIA H200": _SXM_HOPPER,  # H200 SXM
    "NVIDIA H100 PCIe": {"bf16": 756.0, "fp8": 1513.0},
    "NVIDIA H100 NVL": _NVL_HOPPER,
    "NVIDIA H200 NVL": _NVL_HOPPER,
    "NVIDIA A100-SXM4-80GB": _A100,
    "NVIDIA A100-SXM4-40GB": _A100,
    "NVIDIA A100 80GB PCIe": _A100,
    "NVIDIA A100-PCIE-40GB": _A100,
    "NVIDIA B200": {"bf16": 2250.0, "fp8": 4500.0},
    "NVIDIA GB200": {"bf16": 2500.0, "fp8": 5000.0},
}


def peak_tflops(dtype: str, override: float | None = None, device_name: str | None = None) -> float | None:
    """The dense peak (TFLOP/s per GPU) that MFU divides by: ``override`` where given
    (``precision.peak_tflops``), else the visible GPU's entry for ``dtype`` (bf16 or fp8) in
    ``PEAK_TFLOPS``, matched by its exact name; None on CPU or for a GPU the table does not
    name (then no MFU is logged: set ``precision.peak_tflops``).

    ``device_name`` stands in for ``torch.cuda.get_device_name()`` (tests).
    """
    if override is not None:
        return override
    if device_name is None:
        if not torch.cuda.is_available():
            return None
        device_name = torch.cuda.get_device_name()
    return PEAK_TFLOPS.get(device_name.strip(), {}).get(dtype)
