"""Silence a fixed list of harmless library messages so that real warnings stand out.

Each entry is a message megatron-core or torch prints on every run of this project's normal
paths (local layer spec without apex/TE, torch_dist checkpoints, DDP with the distributed
optimizer). Nothing else is filtered. Importing this module installs the filters.
"""

from __future__ import annotations

import logging
import warnings

_WARNING_MESSAGES = (
    # On a GPU this is the only sign megatron-core gives that Transformer Engine is missing or
    # broken, and it names neither the failed import nor the consequence; models.build says both
    # once on GPU runs (Backend.detect), and runtime.megatron_import stops on a TE that breaks
    # megatron-core's own import.
    r"Transformer Engine and Apex are not installed",
    r"Apex is not installed\. Falling back to Torch Norm",
    r"torch\.distributed is disabled, unavailable or uninitialized, assuming the intent",
    r"Please use DTensor instead and we are deprecating ShardedTensor",
    r"full scope is deprecated",
    r"`torch\.distributed\.all_gather_into_tensor` is deprecated",
    r"`torch\.distributed\._all_gather_base` is a private function",
    r"`torch\.distributed\._reduce_scatter_base` is a private function",
    r"`torch\.distributed\.reduce_scatter_tensor` is deprecated",
    r"MimoModelConfig is experimental",
    r"The argument order of load has been changed",
    # megatron-core DDP's gradient hooks read .grad of an expanded parameter view.
    r"The \.grad attribute of a Tensor that is not a leaf Tensor is being accessed",
)

_LOG_MESSAGES = (
    "MCore's async save is deprecated",
    "DistributedDataParallel: full_param_layout not provided",
    "No CUDA runtime is found",
    "GPTModel IS DEPRECATED",
)


class _DropKnownMessages(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(known in message for known in _LOG_MESSAGES)


_installed = False


def install() -> None:
    """Silence the known, harmless warnings and log lines of torch, megatron-core and transformers
    listed above (once per process)."""
    global _installed
    if _installed:
        return
    for pattern in _WARNING_MESSAGES:
        warnings.filterwarnings("ignore", message=pattern)
    drop = _DropKnownMessages()
    for handler in logging.getLogger().handlers:
        handler.addFilter(drop)
    for name in ("megatron.core.dist_checkpointing.strategies.torch",
                 "megatron.core.distributed.distributed_data_parallel",
                 "megatron.core.models.gpt.gpt_model",
                 "torch.utils.cpp_extension"):
        logging.getLogger(name).addFilter(drop)
    _installed = True


def quiet_transformers() -> None:
    """transformers draws a progress bar for every model load; our own logs show progress."""
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()


install()
