"""Run megatron-core's own code on a CPU-only machine (gloo), unchanged.

megatron-core hard-codes CUDA in many places: ``torch.cuda.current_device()`` as a device,
``device="cuda"`` literals, the CUDA RNG behind its RNG tracker, streams/events/synchronize,
and ``Tensor.type()`` checks against ``'torch.cuda.FloatTensor'``. On a machine without CUDA
this module redirects exactly those calls to their CPU equivalents, so the CPU lane of this
project (tests, CI, laptops) runs the same Megatron models, schedules, optimizers and
checkpoints as the GPU lane; without it, each call listed above fails where there is no CUDA.

Rules:
- :func:`install` does nothing when ``torch.cuda.is_available()``, unless asked to hide the GPUs
  (``install(hide_cuda=True)``, what the runtime does for the gloo backend): the process then
  reports no CUDA (``torch.cuda.is_available()`` is False) and runs as on a machine without
  GPUs. Hiding is refused once the process has initialised CUDA, since tensors may already
  live on a GPU. Without hiding, the layer is never active on a GPU machine.
- Installing is idempotent and process-wide (it patches ``torch.cuda`` attributes and enters a
  global :class:`~torch.overrides.TorchFunctionMode`); there is no uninstall, because
  megatron-core may keep references to what it created under the layer.
- It touches nothing megatron-specific except the two private RNG helpers of
  ``megatron.core.tensor_parallel.random``, which bypass ``torch.cuda.get_rng_state``.

On CPU there is one random generator per process, so the "CUDA" RNG that Megatron's tracker
forks between (data-parallel, tensor-parallel and expert streams) is the CPU default generator.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

from megatron_sami.errors import EnvironmentSetupError

_installed = False

_CPU = torch.device("cpu")


def is_active() -> bool:
    """True when the layer has been installed in this process."""
    return _installed


def _is_cuda_device(device: Any) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.split(":")[0] == "cuda"
    # A bare int names a CUDA ordinal (``device=torch.cuda.current_device()``).
    return isinstance(device, int) and not isinstance(device, bool)


class _CudaToCpuMode(TorchFunctionMode):
    """Rewrites CUDA device arguments of tensor factories and ``.to()`` into the CPU."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        device = kwargs.get("device")
        if device is not None and _is_cuda_device(device):
            kwargs = {**kwargs, "device": _CPU}
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda_device(args[1]):
            args = (args[0], _CPU, *args[2:])
        return func(*args, **kwargs)


class _CpuStream:
    """Stands in for ``torch.cuda.Stream``: CPU work is already ordered."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.device = _CPU

    def wait_stream(self, stream: Any) -> None:
        pass

    def wait_event(self, event: Any) -> None:
        pass

    def record_event(self, event: Any = None) -> _CpuEvent:
        return event if event is not None else _CpuEvent()

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True

    def __enter__(self) -> _CpuStream:
        return self

    def __exit__(self, *exc: Any) -> None:
        return None


class _CpuEvent:
    """Stands in for ``torch.cuda.Event``; timing events report zero elapsed time."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def record(self, stream: Any = None) -> None:
        pass

    def wait(self, stream: Any = None) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True

    def elapsed_time(self, other: Any) -> float:
        return 0.0


_DEFAULT_STREAM = _CpuStream()

_CUDA_TYPE_NAMES = {
    torch.float32: "torch.cuda.FloatTensor",
    torch.float16: "torch.cuda.HalfTensor",
    torch.bfloat16: "torch.cuda.BFloat16Tensor",
}


def _patch_torch_cuda() -> None:
    cuda = torch.cuda
    cuda.current_device = lambda: 0
    cuda.set_device = lambda device: None
    cuda.device_count = lambda: 0
    cuda.synchronize = lambda device=None: None
    cuda.empty_cache = lambda: None
    cuda.Stream = _CpuStream
    cuda.Event = _CpuEvent
    cuda.current_stream = lambda device=None: _DEFAULT_STREAM
    cuda.default_stream = lambda device=None: _DEFAULT_STREAM
    cuda.stream = lambda stream=None: stream if stream is not None else _DEFAULT_STREAM
    cuda.set_stream = lambda stream: None
    cuda.memory_allocated = lambda device=None: 0
    cuda.max_memory_allocated = lambda device=None: 0
    cuda.memory_reserved = lambda device=None: 0
    cuda.max_memory_reserved = lambda device=None: 0
    cuda.reset_peak_memory_stats = lambda device=None: None
    cuda.memory_stats = lambda device=None: {}
    # One generator per CPU process: the "CUDA" RNG is the CPU default generator.
    cuda.get_rng_state = lambda device="cuda": torch.get_rng_state()
    cuda.set_rng_state = lambda new_state, device="cuda": torch.set_rng_state(new_state)
    # torch.manual_seed itself calls torch.cuda.manual_seed_all: seed the CPU generator directly.
    cuda.manual_seed = lambda seed: torch.default_generator.manual_seed(int(seed))
    cuda.manual_seed_all = lambda seed: None
    cuda.random.get_rng_state = cuda.get_rng_state
    cuda.random.set_rng_state = cuda.set_rng_state
    cuda.nvtx.range_push = lambda msg: 0
    cuda.nvtx.range_pop = lambda: 0


def _patch_tensor_methods() -> None:
    plain_type = torch.Tensor.type

    def type_with_cuda_names(self: torch.Tensor, dtype: Any = None, non_blocking: bool = False, **kwargs: Any):
        # Megatron's optimizers assert CUDA type names; report CPU tensors as such.
        if dtype is None and not kwargs and self.device.type == "cpu" and self.dtype in _CUDA_TYPE_NAMES:
            return _CUDA_TYPE_NAMES[self.dtype]
        return plain_type(self, dtype, non_blocking, **kwargs)

    torch.Tensor.type = type_with_cuda_names
    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    torch.Tensor.record_stream = lambda self, stream: None
    torch.nn.Module.cuda = lambda self, *args, **kwargs: self


def _patch_autograd_backward(mode: TorchFunctionMode) -> None:
    """Run custom autograd backward functions under the mode too.

    The autograd engine does not carry Python function modes into backward, so a CUDA literal
    reached there (megatron-core's activation recomputation rebuilds the causal mask with
    ``device="cuda"``) would escape the redirect.
    """
    from torch.autograd.function import BackwardCFunction

    plain_apply = BackwardCFunction.apply

    def apply_under_mode(self, *args):
        with mode:
            return plain_apply(self, *args)

    BackwardCFunction.apply = apply_under_mode


def _patch_megatron_rng() -> None:
    """Megatron-Core's RNG tracker reads and writes the CUDA RNG through two private functions of
    ``megatron.core.tensor_parallel.random`` (``_get_cuda_rng_state``, ``_set_cuda_rng_state``,
    as of megatron-core 0.19.x); on CPU they read and write torch's CPU generator instead."""
    from megatron.core.tensor_parallel import random as megatron_random

    megatron_random._get_cuda_rng_state = lambda *args, **kwargs: torch.get_rng_state()
    megatron_random._set_cuda_rng_state = lambda new_state, *args, **kwargs: torch.set_rng_state(new_state)


class _DropForkWarning(logging.Filter):
    """The RNG tracker warns when the CPU RNG moves inside a fork; on CPU that is the fork itself."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "CPU RNG state changed within GPU RNG context" not in record.getMessage()


def _hide_cuda() -> None:
    """Make this process report no GPU, so every ``torch.cuda.is_available()`` reader (ours and
    megatron-core's) takes its CPU path; the layer's stand-ins replace the rest of ``torch.cuda``."""
    if torch.cuda.is_initialized():
        raise EnvironmentSetupError(
            "the gloo backend runs on the CPU, but this process has already used CUDA; choose the "
            "backend before any GPU work, or hide the GPUs with CUDA_VISIBLE_DEVICES=''."
        )
    torch.cuda.is_available = lambda: False


def install(hide_cuda: bool = False) -> bool:
    """Install the layer when CUDA is unavailable (with ``hide_cuda``: after hiding the GPUs).

    Returns True when the layer is active.

    Raises:
        EnvironmentSetupError: ``hide_cuda`` in a process that has already initialised CUDA.
    """
    global _installed
    if torch.cuda.is_available():
        if not hide_cuda:
            return False
        _hide_cuda()
    if _installed:
        return True
    _patch_torch_cuda()
    _patch_tensor_methods()
    _patch_megatron_rng()
    logging.getLogger("megatron.core.tensor_parallel.random").addFilter(_DropForkWarning())
    _CudaToCpuMode().__enter__()
    _patch_autograd_backward(_CudaToCpuMode())
    _installed = True
    return True
