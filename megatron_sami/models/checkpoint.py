"""Megatron distributed checkpoints of a model, written atomically.

A checkpoint is written by every rank into ``<dir>.incomplete`` and renamed to ``<dir>`` by
rank 0 only after all ranks finished, so a directory with the final name is always complete.
It loads at any TP/PP/EP/DP layout (megatron-core reshards on load).
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_sami.errors import SamiError


class CheckpointError(SamiError):
    """A checkpoint is missing, incomplete, or does not match the model."""


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The bare ``GPTModel`` inside DDP (or other ``.module``) wrappers."""
    while hasattr(model, "module"):
        model = model.module
    return model


def is_rank0() -> bool:
    return dist.get_rank() == 0


@contextlib.contextmanager
def staged_output(out_dir: Path) -> Iterator[Path]:
    """Yield ``<out>.incomplete`` for every rank to write into; once all ranks are done, rank 0
    renames it to ``out_dir`` (replacing an existing one), so a directory with the final name is
    always complete. On failure the staging directory is removed (collective)."""
    staging = out_dir.with_name(out_dir.name + ".incomplete")
    if is_rank0():
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
    dist.barrier()
    try:
        yield staging
        dist.barrier()
    except BaseException:
        if is_rank0():
            shutil.rmtree(staging, ignore_errors=True)
        raise
    if is_rank0():
        previous = out_dir.with_name(out_dir.name + ".replaced")
        if out_dir.exists():
            out_dir.rename(previous)
        staging.rename(out_dir)
        shutil.rmtree(previous, ignore_errors=True)
    dist.barrier()


def save_model(model: torch.nn.Module, directory: str | Path) -> Path:
    """Save the model's weights as a distributed checkpoint at ``directory`` (collective)."""
    final = Path(directory)
    if final.exists():
        raise CheckpointError(f"{final} already exists; remove it or choose another directory.")
    with staged_output(final) as staging:
        save_weights(model, staging)
    return final


def save_weights(model: torch.nn.Module, directory: Path) -> None:
    """Write the model's weights as a distributed checkpoint into ``directory``, usually a
    sub-directory of a staged output (collective)."""
    from megatron.core import dist_checkpointing

    if is_rank0():
        directory.mkdir(exist_ok=True)
    dist.barrier()
    dist_checkpointing.save(unwrap(model).sharded_state_dict(), str(directory))


def load_model(model: torch.nn.Module, directory: str | Path, strict: bool = True) -> None:
    """Fill the model from a distributed checkpoint saved at any layout (collective)."""
    from megatron.core import dist_checkpointing

    path = Path(directory)
    if not path.is_dir():
        hint = " (an interrupted save left only the .incomplete directory)" if \
            path.with_name(path.name + ".incomplete").exists() else ""
        raise CheckpointError(f"no checkpoint at {path}{hint}; check the path or convert a model first.")
    from torch.distributed.checkpoint.api import CheckpointException

    bare = unwrap(model)
    try:
        state = dist_checkpointing.load(bare.sharded_state_dict(), str(path))
        bare.load_state_dict(state, strict=strict)
    except (Exception, CheckpointException) as err:  # CheckpointException is a BaseException
        first_line = next((line for line in str(err).splitlines() if "Error" in line), str(err).splitlines()[0])
        raise CheckpointError(
            f"the checkpoint at {path} does not fit the model being loaded ({first_line.strip()[:300]}); "
            "it was saved from a different model: check the model config."
        ) from err
