"""Megatron distributed checkpoints of a model, written atomically.

A checkpoint is written by every rank into ``<dir>.incomplete`` and renamed to ``<dir>`` by
rank 0 only after all ranks finished, so a directory with the final name is always complete.
It loads at any TP/PP/EP/DP layout (megatron-core reshards on load).
"""

from __future__ import annotations

import contextlib
import shutil
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_sami.errors import SamiError

# Threads writing a lazily saved checkpoint: while one reads a chunk from the source files, the
# other writes; each holds one chunk, so a process holds about two.
WRITER_THREADS = 2


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

    _make_directory(directory)
    dist_checkpointing.save(unwrap(model).sharded_state_dict(), str(directory))


def _make_directory(directory: Path) -> None:
    """Rank 0 creates the checkpoint directory; every rank waits for it (collective)."""
    if is_rank0():
        directory.mkdir(exist_ok=True)
    dist.barrier()


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


def save_weights_lazily(model: torch.nn.Module, directory: Path,
                        materialize: Callable[[str, int, int], torch.Tensor]) -> None:
    """Write a distributed checkpoint for a model built on the meta device (collective).

    The checkpoint is the one :func:`save_weights` would write for the same model and layout
    (megatron-core's own sharded state dict, factories and planner decide keys, shapes and
    chunks), but no tensor exists until the writer reaches it: ``materialize(name, first_row,
    num_rows)`` returns rows ``first_row``.. of parameter ``name`` (as in ``named_parameters``;
    a row is everything below the first dimension) and is called then, once per chunk megatron
    planned (the two halves of a gated fc1 are two chunks). Each chunk is dropped once written,
    so a process holds about one chunk per writer thread instead of its whole model.
    """
    from megatron.core.dist_checkpointing.core import CheckpointingConfig, save_config
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor
    from megatron.core.dist_checkpointing.state_dict_utils import save_preprocess
    from megatron.core.dist_checkpointing.strategies.torch import (
        _replace_state_dict_keys_with_sharded_keys,
        mcore_to_pyt_state_dict,
    )
    from torch.distributed.checkpoint import save as dcp_save

    bare = unwrap(model)
    names = {id(param): name for name, param in bare.named_parameters()}
    sharded, common = save_preprocess(bare.sharded_state_dict(), validate_access_integrity=True)
    sharded["common_state"] = ShardedObject(key="common_state", data=common, global_shape=(1,),
                                            global_offset=(0,), replica_id=dist.get_rank())
    sources = {}
    for item in nested_values(sharded):
        if isinstance(item, ShardedTensor):
            base = item.data if item.data._base is None else item.data._base
            sources[(item.key, tuple(item.global_offset))] = (names.get(id(base)), base, item.data)
    by_key, _, _ = _replace_state_dict_keys_with_sharded_keys(sharded, keep_only_main_replica=True)
    _make_directory(directory)
    # torch.save's per-record CRC32 halves the writing speed, and torch.load never checks it (a
    # flipped data byte loads silently, with or without it), so it protects nothing here.
    crc32 = torch.serialization.get_crc32_options()
    torch.serialization.set_crc32_options(False)
    try:
        dcp_save(mcore_to_pyt_state_dict(by_key, False), storage_writer=_streaming_writer(directory),
                 planner=_lazy_save_planner(sources, materialize))
    finally:
        torch.serialization.set_crc32_options(crc32)
    if is_rank0():
        save_config(CheckpointingConfig("torch_dist", 1), str(directory))
    dist.barrier()


def _row_range(base: torch.Tensor, view: torch.Tensor) -> tuple[int, int] | None:
    """(first row, number of rows) when ``view`` is whole consecutive rows of ``base``, else None."""
    row = base[0].numel() if base.dim() > 1 else 1
    if not view.is_contiguous() or view.storage_offset() % row or view.numel() % row:
        return None
    return (view.storage_offset() - base.storage_offset()) // row, view.numel() // row


def _lazy_save_planner(sources: dict, materialize: Callable[[str, int, int], torch.Tensor]):
    """A megatron-core save planner whose tensors are produced when the writer asks for them."""
    from megatron.core.dist_checkpointing.strategies.torch import MCoreSavePlanner
    from torch.distributed.checkpoint.planner import WriteItemType

    class LazySavePlanner(MCoreSavePlanner):
        """megatron-core's save planner whose tensors are produced when written: each chunk is
        made with the values of the same view of its parameter as the meta view megatron planned."""

        def __init__(self) -> None:
            super().__init__(dedup_replicated_tensors=False, flatten_state_dict=False, flatten_sharded_tensors=False)

        def resolve_data(self, write_item):
            if write_item.type == WriteItemType.BYTE_IO:
                return super().resolve_data(write_item)
            name, base, view = sources[(write_item.index.fqn, tuple(write_item.index.offset))]
            if name is None:
                raise CheckpointError(f"{write_item.index.fqn} is not a view of a model parameter; "
                                      "it cannot be written lazily.")
            rows = _row_range(base, view)
            if rows is not None:
                chunk = materialize(name, *rows)
            else:  # not whole rows (no such chunk at TP=1 today): make the parameter, copy the view
                whole = materialize(name, 0, base.shape[0] if base.dim() else 1)
                chunk = whole.as_strided(view.size(), view.stride(), view.storage_offset()).clone()
            return chunk.reshape(write_item.tensor_data.chunk.sizes)

    return LazySavePlanner()


def _streaming_writer(directory: Path):
    """torch DCP's file-per-thread writer with its own loop over a file's items: each tensor is
    dropped as soon as it is written (torch's loop keeps a file's tensors until the file is
    closed), and a failure in any writer thread fails the save instead of ending that thread."""
    import os
    import queue

    from torch.distributed.checkpoint import FileSystemWriter
    from torch.distributed.checkpoint.filesystem import _write_item
    from torch.distributed.checkpoint.planner import WriteItemType

    class StreamingWriter(FileSystemWriter):
        def _write_data(self, planner, file_queue: queue.Queue) -> torch.futures.Future:
            results, errors = [], []

            def work() -> None:
                try:
                    while True:
                        try:
                            path, file_name, items = file_queue.get_nowait()
                        except queue.Empty:
                            return
                        results.extend(self._write_file(planner, path, file_name, items))
                except BaseException as err:  # noqa: BLE001 - re-raised in the calling thread
                    errors.append(err)

            threads = [threading.Thread(target=work, daemon=True) for _ in range(self.thread_count - 1)]
            for thread in threads:
                thread.start()
            work()
            for thread in threads:
                thread.join()
            if errors:
                raise errors[0]
            future: torch.futures.Future = torch.futures.Future()
            future.set_result(results)
            return future

        def _write_file(self, planner, path, file_name: str, items: list) -> list:
            written = []
            ordered = sorted(items, key=lambda item: item.type != WriteItemType.BYTE_IO)
            with self.fs.create_stream(path, "wb") as stream:
                for item in ordered:
                    data = planner.resolve_data(item)
                    if isinstance(data, torch.Tensor):
                        data = data.detach()
                        if data.untyped_storage().nbytes() != data.nbytes:
                            data = data.clone()  # torch.save writes a view's whole storage
                    written.append(_write_item(self.transforms, stream, data, item, file_name,
                                               self.serialization_format))
                    del data
                if self.sync_files:
                    stream.flush()
                    os.fsync(stream.fileno())
            return written

    return StreamingWriter(str(directory), single_file_per_rank=True, thread_count=WRITER_THREADS)
