"""Training state beyond the weights: the optimizer's sharded state and every RNG a step draws from.

A trainer checkpoints the model with :mod:`megatron_sami.models.checkpoint` and the rest with
these, so that a resumed run continues bit for bit: the optimizer state goes through
megatron-core's distributed checkpointing (each rank writes its shard), and the RNG states
(python, numpy, torch, megatron-core's CUDA RNG tracker) are small per-rank tensors that load
with ``torch.load(weights_only=True)`` (no pickle: a planted file cannot run code).

Optimizer checkpoint formats of the distributed optimizer (megatron-core 0.19):

- ``dp_reshardable`` (the default): each rank writes its own shard of the flat buffers, no
  gather; a resume may change the data-parallel size but must keep TP, PP and EP.
- ``fully_reshardable``: the state is gathered per parameter (over the data-parallel group, with
  gloo, on its first rank) and stored in model space, so a resume may change TP, PP, EP and DP;
  the save costs one gather of a model-parallel shard's optimizer state (12 bytes per parameter).

Without the distributed optimizer the state is always stored in model space (any layout).
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch

from megatron_sami.models.checkpoint import load_model
from megatron_sami.training.engine import materialize_optimizer_state

OPTIMIZER_FORMATS = ("dp_reshardable", "fully_reshardable")


def optimizer_metadata(optimizer_format: str) -> dict:
    """megatron-core's ``sharded_state_dict`` metadata for one of :data:`OPTIMIZER_FORMATS`."""
    metadata = {"distrib_optim_sharding_type": optimizer_format}
    if optimizer_format == "fully_reshardable":
        # Gather over the gloo data-parallel group onto its first rank only, in host memory, instead
        # of the whole state on every rank of the group on the device.
        metadata["distrib_optim_fully_reshardable_mem_efficient"] = True
    return metadata


def rng_state() -> dict[str, torch.Tensor | dict[str, torch.Tensor]]:
    """This rank's RNG states as tensors only (``torch.load(weights_only=True)`` reads them):
    ``python`` (the Mersenne-Twister words and position), ``numpy`` (key, position, Gaussian
    cache), ``torch`` (CPU generator), ``tracker`` (megatron-core's model-parallel RNG tracker,
    which dropout and initialisation draw from; name -> state)."""
    from megatron.core import tensor_parallel

    version, words, gauss = random.getstate()
    _, key, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": torch.tensor([version, *words], dtype=torch.int64),
        "python_gauss": torch.tensor([] if gauss is None else [gauss], dtype=torch.float64),
        "numpy": torch.from_numpy(key.astype(np.int64)),
        "numpy_rest": torch.tensor([pos, has_gauss, cached], dtype=torch.float64),
        "torch": torch.get_rng_state(),
        "tracker": {name: state.cpu() for name, state in tensor_parallel.get_cuda_rng_tracker().get_states().items()},
    }


def set_rng_state(state: dict) -> None:
    """Restore the RNG states that :func:`rng_state` returned (on the same rank of the same layout)."""
    from megatron.core import tensor_parallel

    version, *words = state["python"].tolist()
    gauss = state["python_gauss"].tolist()
    random.setstate((version, tuple(words), gauss[0] if gauss else None))
    pos, has_gauss, cached = state["numpy_rest"].tolist()
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), int(pos), int(has_gauss), cached))
    torch.set_rng_state(state["torch"])
    tracker = tensor_parallel.get_cuda_rng_tracker()
    current = tracker.get_states()
    # The tracker keeps its states where its generator lives (the GPU on CUDA machines).
    tracker.set_states({name: value.to(current[name].device) if name in current else value
                        for name, value in state["tracker"].items()})


def save_optimizer(ddp_model: torch.nn.Module, optimizer, directory: Path, optimizer_format: str) -> None:
    """Write the optimizer's state as a distributed checkpoint into the existing ``directory``
    (collective; every rank writes its shard) in ``optimizer_format`` (:data:`OPTIMIZER_FORMATS`;
    used by the distributed optimizer only)."""
    from megatron.core import dist_checkpointing

    model = ddp_model.module
    sharded = optimizer.sharded_state_dict(model.sharded_state_dict(), metadata=optimizer_metadata(optimizer_format))
    dist_checkpointing.save(sharded, str(directory))


def load_model_and_optimizer(ddp_model: torch.nn.Module, optimizer, weights_dir: Path, optimizer_dir: Path,
                             optimizer_format: str) -> None:
    """Fill the model from ``weights_dir`` and the optimizer from ``optimizer_dir`` (collective).

    ``optimizer_format`` is the one the checkpoint was saved in; with ``dp_reshardable`` the
    optimizer must be built at the saved TP/PP/EP (the data-parallel size may differ; the caller
    checks the layout). Its fp32 main copies are reloaded from the loaded weights, its lazily
    created state is materialised, then filled in place. The update count (torch's per-parameter
    ``step``, TE FusedAdam's per-group one) is not restored here: see
    :func:`~megatron_sami.training.engine.set_optimizer_step_count`.

    Raises:
        CheckpointError: the weights do not fit the model (from :func:`load_model`).
    """
    from megatron.core import dist_checkpointing

    load_model(ddp_model, weights_dir)
    # The optimizer was built from the initial weights: its fp32 main copies must follow the load.
    optimizer.reload_model_params()
    model = ddp_model.module
    materialize_optimizer_state(optimizer)
    metadata = optimizer_metadata(optimizer_format)
    state = dist_checkpointing.load(optimizer.sharded_state_dict(model.sharded_state_dict(), is_loading=True,
                                                                 metadata=metadata), str(optimizer_dir))
    inners = getattr(optimizer, "chained_optimizers", [optimizer])
    states = [state] if len(inners) == 1 else [value for _, value in sorted(state.items())]
    with torch.no_grad():  # megatron-core copies into the (grad-requiring) main params in place
        for inner, inner_state in zip(inners, states, strict=True):
            _load_inner_state(inner, inner_state)


def _load_inner_state(inner, state: dict) -> None:
    """One (unchained) megatron-core optimizer's load. megatron-core 0.19.2's
    ``DistributedOptimizer.load_parameter_state_from_fully_reshardable`` leaves torch Adam's
    ``step`` out of what it copies but then copies every state key the optimizer holds, ``step``
    included (KeyError, distrib_optimizer.py:1222): load the rest first, drop ``step`` for the
    parameter-state copy (the caller restores it), as megatron-core's own loader intends."""
    if state.get("param_state_sharding_type") != "fully_reshardable":
        inner.load_state_dict(state)
        return
    param_state = state.pop("param_state")
    state.pop("param_state_sharding_type")
    inner.load_state_dict(state)
    for values in inner.optimizer.state.values():
        values.pop("step", None)
    inner.load_parameter_state_from_fully_reshardable(param_state)
