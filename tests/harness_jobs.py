"""Small rank bodies that exercise the multi-process harness itself and the CPU layer."""

import collections
import os
import time


def rank_and_world() -> tuple[int, int]:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}",
                            rank=int(os.environ["RANK"]), world_size=int(os.environ["WORLD_SIZE"]))
    import torch

    total = torch.tensor([dist.get_rank() + 1])
    dist.all_reduce(total)
    dist.destroy_process_group()
    return dist_rank_env(), int(total)


def dist_rank_env() -> int:
    return int(os.environ["RANK"])


def fail_on_rank_one() -> str:
    if os.environ["RANK"] == "1":
        raise ValueError("rank one was told to fail")
    time.sleep(600)  # stands for a rank stuck waiting in a collective for its failed peer
    return "unreachable"


def hang() -> None:
    time.sleep(600)


def die_without_result() -> None:
    os._exit(3)


def cuda_calls_under_the_cpu_layer() -> dict:
    """What megatron-style CUDA calls do once the layer is installed (CPU machine)."""
    import torch

    from megatron_sami.runtime import cpu_compat

    active = cpu_compat.install()
    made = torch.zeros(3, device="cuda")
    by_ordinal = torch.empty(2, device=torch.cuda.current_device())
    moved = torch.ones(2).to("cuda:0")
    torch.cuda.synchronize()
    with torch.cuda.stream(torch.cuda.Stream()):
        event = torch.cuda.Event(enable_timing=True)
        event.record()
    torch.cuda.manual_seed(11)
    first = torch.rand(3)
    state = torch.cuda.get_rng_state()
    second = torch.rand(3)
    torch.cuda.set_rng_state(state)
    again = torch.rand(3)
    class CudaLiteralInBackward(torch.autograd.Function):
        # As megatron-core's activation recomputation does when it rebuilds the causal mask.
        @staticmethod
        def forward(ctx, x):
            return x * 2

        @staticmethod
        def backward(ctx, grad):
            return grad * torch.full((1,), 2.0, device="cuda")

    leaf = torch.ones(2, requires_grad=True)
    CudaLiteralInBackward.apply(leaf).sum().backward()
    return {
        "active": active,
        "backward_grad": leaf.grad.tolist(),
        "devices": {made.device.type, by_ordinal.device.type, moved.device.type, torch.ones(1).cuda().device.type},
        "type_name": torch.zeros(1).type(),
        "bf16_type_name": torch.zeros(1, dtype=torch.bfloat16).type(),
        "rng_replays": bool((second == again).all()) and not bool((first == second).all()),
    }


def layer_inactive_when_cuda_is_available() -> dict:
    """Pretend a GPU exists: install() must leave torch.cuda alone."""
    import torch

    from megatron_sami.runtime import cpu_compat

    original = torch.cuda.current_device
    torch.cuda.is_available = lambda: True
    active = cpu_compat.install()
    return {"active": active, "untouched": torch.cuda.current_device is original,
            "type_name": torch.zeros(1).type()}


def backend_variables() -> dict:
    """What the harness told this rank about its backend."""
    return {name: os.environ.get(name) for name in ("SAMI_DIST_BACKEND", "CUDA_VISIBLE_DEVICES")}


Pair = collections.namedtuple("Pair", "first second")


def tensors_in_containers():
    import torch

    return {"pair": Pair(torch.ones(2), [torch.zeros(1), 3]), "plain": "text"}


def gloo_on_a_machine_that_shows_a_gpu() -> dict:
    """Pretend a GPU is visible: the gloo runtime must still run on the CPU (GPUs hidden, CPU
    layer installed), and refuse to once CUDA has been initialised."""
    import torch

    from megatron_sami.errors import EnvironmentSetupError
    from megatron_sami.runtime import cpu_compat
    from megatron_sami.runtime.distributed import megatron_runtime
    from megatron_sami.runtime.layout import ParallelConfig

    torch.cuda.is_available = lambda: True
    plain_is_initialized = torch.cuda.is_initialized
    torch.cuda.is_initialized = lambda: True
    try:
        cpu_compat.install(hide_cuda=True)
        refused = ""
    except EnvironmentSetupError as error:
        refused = str(error)
    torch.cuda.is_initialized = plain_is_initialized
    with megatron_runtime(ParallelConfig(), backend="gloo") as info:
        zeros = torch.zeros(2, device="cuda")
        report = {"device": info.device, "backend": info.backend, "layer": cpu_compat.is_active(),
                  "cuda_visible": torch.cuda.is_available(), "tensor_device": zeros.device.type,
                  "dist_backend": torch.distributed.get_backend()}
    return {"refused": refused, **report}
