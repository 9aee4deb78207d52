"""Shared test setup: GPU tests are skipped visibly (with a reason) where too few GPUs exist.

``@pytest.mark.gpu`` needs one CUDA GPU; ``@pytest.mark.gpu(2)`` needs two (the NCCL parameter
of :data:`megatron_sami.testing.backends.BACKENDS`).
"""

import pytest

from megatron_sami.testing.backends import visible_gpu_count


def _skip_reason(needed: int, visible: int) -> str:
    if needed == 1:
        return "needs a CUDA GPU; none is visible on this machine"
    return f"needs {needed} CUDA GPUs; {visible} visible on this machine"


def pytest_collection_modifyitems(config, items):
    visible = visible_gpu_count()
    for item in items:
        marker = item.get_closest_marker("gpu")
        if marker is None:
            continue
        needed = int(marker.args[0]) if marker.args else int(marker.kwargs.get("count", 1))
        if visible < needed:
            item.add_marker(pytest.mark.skip(reason=_skip_reason(needed, visible)))


def pytest_configure(config):
    # The same known-harmless library messages the runtime silences (megatron_sami.runtime.quiet).
    from megatron_sami.runtime.quiet import _WARNING_MESSAGES

    for pattern in _WARNING_MESSAGES:
        config.addinivalue_line("filterwarnings", f"ignore:{pattern}")
    # A tensor that a rank pickles names megatron-core's storage loader, so reading a rank's
    # result imports megatron-core here, and that import warns about its own module layout.
    config.addinivalue_line("filterwarnings", "ignore:The following imports from `dynamic_context.py`:DeprecationWarning")
