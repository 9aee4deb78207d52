"""The torch.distributed backends a multi-process test runs under, as pytest parameters.

``BACKENDS`` feeds ``run_distributed(..., backend=backend)``, so one test body checks the
same invariants on the CPU lane (gloo, every machine, CI) and on the GPU lane (NCCL, one GPU
per rank). The NCCL parameter carries the ``gpu`` mark with a count of 2 (tests/conftest.py
skips it, with the reason, where fewer GPUs are visible); a job of more ranks than that calls
:func:`require_gpus_for` to skip where the machine has fewer GPUs than ranks. A pytest helper:
it needs the ``dev`` extra (``pip install 'megatron-sami[dev]'``).
"""

from __future__ import annotations

import pytest

GLOO = "gloo"
NCCL = "nccl"
MIN_NCCL_GPUS = 2

BACKENDS = [
    pytest.param(GLOO, id=GLOO),
    pytest.param(NCCL, id=NCCL, marks=pytest.mark.gpu(MIN_NCCL_GPUS)),
]


def visible_gpu_count() -> int:
    """CUDA devices this process can see (0 without torch or CUDA); asks NVML where it can, so
    the caller's process stays fit to fork ranks that use CUDA."""
    try:
        import torch
    except ImportError:
        return 0
    return torch.cuda.device_count()


def require_gpus_for(backend: str, world_size: int) -> None:
    """Skip the calling test, with the reason, when an NCCL job of ``world_size`` ranks (one GPU
    each) would find fewer GPUs than ranks on this machine. Gloo jobs always run.

    Raises:
        pytest.skip.Exception: NCCL and fewer than ``world_size`` visible GPUs.
    """
    if backend != NCCL:
        return
    visible = visible_gpu_count()
    if visible < world_size:
        pytest.skip(f"{world_size} NCCL ranks need {world_size} CUDA GPUs; {visible} visible on this machine")
