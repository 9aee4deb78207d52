"""Shared test setup: GPU tests are skipped visibly (with a reason) where no GPU exists."""

import pytest


def _has_cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    if _has_cuda():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU; none is visible on this machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


def pytest_configure(config):
    # The same known-harmless library messages the runtime silences (megatron_sami.runtime.quiet).
    from megatron_sami.runtime.quiet import _WARNING_MESSAGES

    for pattern in _WARNING_MESSAGES:
        config.addinivalue_line("filterwarnings", f"ignore:{pattern}")
