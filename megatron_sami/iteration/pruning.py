"""What a finished iteration's training leaves behind that nothing reads again: every checkpoint
but its final one, and the final one's optimizer state (``keep_optimizer_state=false``, the default).

Why it is safe: once ``iterT/train`` is recorded complete, the driver never resumes that training
run, and every later reader of the iteration loads weights only: export (``sami-convert
megatron-to-hf``), MI scoring (``sami-score``) and, with ``train_from=previous``, the next
iteration's ``sami-train``, which starts a new run from ``checkpoint=`` (model weights loaded,
optimizer built fresh; only a resume in the same run directory reads ``optimizer/``). The optimizer
state is the bulk of a training checkpoint: AdamW's fp32 main weights and two moments are 12 bytes
per parameter against 2 for the bf16 weights (Llama-3-70B: 0.85 TB, or 0.56 TB with RMSprop's
8, against 0.14 TB per checkpoint).

A training checkpoint (:mod:`megatron_sami.alignment.trainer`) keeps model and optimizer tensors in
separate distributed checkpoints, ``step_N/weights/`` and ``step_N/optimizer/``, so the optimizer
state is dropped file-wise and the weights are never rewritten. Crash safety: nothing is removed
unless the final checkpoint's weights are whole; each doomed directory is first renamed to
``<name>.removing`` (atomic, and a name no reader takes for a checkpoint), the renames made
durable, then deleted; a rerun after a kill finds the ``.removing`` leftovers and finishes.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from megatron_sami.errors import CheckpointError, ConversionError
from megatron_sami.io import fsync_dir, storage_error

REMOVING = ".removing"  # the suffix of a directory this module is deleting
OPTIMIZER_DIR = "optimizer"


def final_checkpoint(checkpoints: Path) -> Path:
    """The checkpoint ``checkpoints/latest`` names, checked to be a whole checkpoint directory.

    Raises:
        CheckpointError: no pointer, a pointer to a missing or staging directory, or weights that
            are incomplete or damaged (then nothing may be removed beside it).
    """
    from megatron_sami.models.checkpoint import damaged_file
    from megatron_sami.models.checkpoint_dir import WEIGHTS_DIR, read_checkpoint_model

    pointer = checkpoints / "latest"
    name = pointer.read_text().strip() if pointer.is_file() else ""
    final = checkpoints / name
    if not name.startswith("step_") or "." in name or "/" in name or not final.is_dir():
        raise CheckpointError(f"{pointer} does not name a complete checkpoint ({name or 'missing'}); nothing was "
                              "removed. Restore the training run's checkpoints, or set keep_optimizer_state=true.")
    try:
        read_checkpoint_model(final)
    except ConversionError as err:
        raise CheckpointError(f"{final} is not a whole checkpoint ({err}); nothing was removed.") from err
    damage = damaged_file(final / WEIGHTS_DIR)
    if damage is not None:
        raise CheckpointError(f"the final checkpoint's weights are damaged ({damage}); nothing was removed. Rerun "
                              f"the iteration's training (delete its train/ directory and its phase from state.json) "
                              f"or restore the files.")
    return final


def prune_training_checkpoints(checkpoints: Path) -> dict:
    """Remove every checkpoint of a finished training run but the final one, and the final
    one's optimizer state; idempotent, and a rerun after a kill completes the removal.

    Args:
        checkpoints: a sami-train run's ``checkpoints/`` directory.

    Returns:
        ``{"kept": "step_N", "removed": [paths relative to checkpoints/], "freed_bytes": bytes}``;
        ``removed`` holds what this call removed (also what an interrupted call had renamed).

    Raises:
        CheckpointError: the final checkpoint is missing or damaged (nothing is removed).
        StorageError: the file system refused a rename or deletion.
    """
    final = final_checkpoint(checkpoints)
    try:
        return _prune(checkpoints, final)
    except OSError as err:
        raise storage_error(err) or err from err


def _prune(checkpoints: Path, final: Path) -> dict:
    targets = [path for path in checkpoints.iterdir() if path.name.startswith("step_") and path != final]
    targets += [final / name for name in (OPTIMIZER_DIR, OPTIMIZER_DIR + REMOVING) if os.path.lexists(final / name)]
    doomed = list(dict.fromkeys(_mark(path) for path in sorted(targets)))  # optimizer and a leftover optimizer.removing
    fsync_dir(checkpoints)
    fsync_dir(final)
    freed = sum(_size(path) for path in doomed)
    for path in doomed:
        _remove(path)
    fsync_dir(checkpoints)
    removed = sorted({str(path.relative_to(checkpoints)).removesuffix(REMOVING) for path in doomed})
    return {"kept": final.name, "removed": removed, "freed_bytes": freed}


def _mark(path: Path) -> Path:
    """``path`` renamed to ``<path>.removing`` (already so named: as it is)."""
    if path.name.endswith(REMOVING):
        return path
    marked = path.with_name(path.name + REMOVING)
    if os.path.lexists(marked):  # an earlier interrupted pass renamed a same-named directory
        _remove(marked)
    path.rename(marked)
    return marked


def _size(path: Path) -> int:
    """Bytes of the files under ``path`` (symbolic links not followed)."""
    if path.is_symlink() or path.is_file():
        return path.lstat().st_size
    return sum(entry.lstat().st_size for entry in path.rglob("*") if not entry.is_dir() or entry.is_symlink())


def _remove(path: Path) -> None:
    if path.is_symlink() or not path.is_dir():
        path.unlink(missing_ok=True)
    else:
        shutil.rmtree(path)
