"""Training state beyond the weights: the optimizer's sharded state and every RNG a step draws from.

A trainer checkpoints the model with :mod:`megatron_sami.models.checkpoint` and the rest with
these, so that a resumed run continues bit for bit: the optimizer state goes through
megatron-core's distributed checkpointing (each rank writes its shard), and the RNG states
(python, numpy, torch, megatron-core's CUDA RNG tracker) are small per-rank values the trainer
stores beside its own counters.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch

from megatron_sami.models.checkpoint import load_model
from megatron_sami.training.engine import materialize_optimizer_state

# Optimizer state as the distributed optimizer holds it: a resumed run keeps TP/PP (DP may change).
# ("fully_reshardable" would allow any layout, but megatron-core 0.19 fails to load it with torch
# Adam: the per-parameter "step" tensor is skipped on load and then looked up.)
OPTIMIZER_FORMAT = {"distrib_optim_sharding_type": "dp_reshardable"}


def rng_state() -> dict:
    """This rank's RNG states: ``python``, ``numpy``, ``torch`` (CPU) and ``tracker`` (megatron-core's
    model-parallel CUDA RNG tracker, which dropout and initialisation draw from). Picklable."""
    from megatron.core import tensor_parallel

    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "tracker": tensor_parallel.get_cuda_rng_tracker().get_states()}


def set_rng_state(state: dict) -> None:
    """Restore the RNG states that :func:`rng_state` returned (on the same rank of the same layout)."""
    from megatron.core import tensor_parallel

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def save_optimizer(ddp_model: torch.nn.Module, optimizer, directory: Path) -> None:
    """Write the optimizer's state as a distributed checkpoint into the existing ``directory``
    (collective; every rank writes its shard, in :data:`OPTIMIZER_FORMAT`)."""
    from megatron.core import dist_checkpointing

    model = ddp_model.module
    dist_checkpointing.save(optimizer.sharded_state_dict(model.sharded_state_dict(), metadata=OPTIMIZER_FORMAT),
                            str(directory))


def load_model_and_optimizer(ddp_model: torch.nn.Module, optimizer, weights_dir: Path, optimizer_dir: Path) -> None:
    """Fill the model from ``weights_dir`` and the optimizer from ``optimizer_dir`` (collective).

    The optimizer must be the one built over ``ddp_model`` (same TP/PP as at save; the data-
    parallel size may differ). Its fp32 main copies are reloaded from the loaded weights, its
    lazily created state is materialised, then filled in place.

    Raises:
        CheckpointError: the weights do not fit the model (from :func:`load_model`).
    """
    from megatron.core import dist_checkpointing

    load_model(ddp_model, weights_dir)
    # The optimizer was built from the initial weights: its fp32 main copies must follow the load.
    optimizer.reload_model_params()
    model = ddp_model.module
    materialize_optimizer_state(optimizer)
    state = dist_checkpointing.load(
        optimizer.sharded_state_dict(model.sharded_state_dict(), is_loading=True, metadata=OPTIMIZER_FORMAT),
        str(optimizer_dir))
    with torch.no_grad():  # megatron-core copies into the (grad-requiring) main params in place
        optimizer.load_state_dict(state)
