"""Megatron distributed checkpoints of a model, written atomically.

A checkpoint is written by every rank into ``<dir>.incomplete`` and renamed to ``<dir>`` by
rank 0 only after all ranks finished, so a directory with the final name is always complete.
It loads at any TP/PP/EP/DP layout (megatron-core reshards on load).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
import struct
import threading
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_sami.errors import CheckpointError
from megatron_sami.io import WindowReader, fsync_dir

# Threads writing a lazily saved checkpoint: while one reads a chunk from the source files, the
# other writes; each holds one chunk, so a process holds about two.
WRITER_THREADS = 2


@dataclass(frozen=True)
class FileBytes:
    """A tensor whose bytes already lie in files, in order: each piece is (open file descriptor,
    byte offset, byte count), or (None, 0, byte count) for zeros. A lazily saved checkpoint
    copies such a tensor's bytes file to file inside the kernel (copy_file_range), so they never
    pass through this process's memory."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    pieces: tuple[tuple[int | None, int, int], ...]

    def read(self) -> torch.Tensor:
        """The tensor itself, read into memory."""
        tensor = torch.empty(self.shape, dtype=self.dtype)
        flat = tensor.reshape(-1).view(torch.uint8)
        position = 0
        for descriptor, offset, nbytes in self.pieces:
            piece = flat[position:position + nbytes]
            if descriptor is None:
                piece.zero_()
            else:
                read_exactly(descriptor, offset, piece)
            position += nbytes
        return tensor


def read_exactly(descriptor: int, offset: int, out: torch.Tensor) -> None:
    """Fill the contiguous tensor ``out`` with a file's bytes from ``offset`` (positional reads,
    safe from several threads).

    Raises:
        CheckpointError: the file ends before ``out`` is full.
    """
    buffer = memoryview(out.reshape(-1).view(torch.uint8).numpy())
    done = 0
    while done < len(buffer):  # one read returns at most about 2 GB
        got = os.preadv(descriptor, [buffer[done:]], offset + done)
        if got == 0:
            raise CheckpointError(f"a file ends {len(buffer) - done} bytes before the tensor being read from it; "
                                  "it is truncated or changed while being read.")
        done += got


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The bare ``GPTModel`` inside DDP (or other ``.module``) wrappers."""
    while hasattr(model, "module"):
        model = model.module
    return model


def is_rank0() -> bool:
    """Whether this process is global rank 0 (the one that writes shared files)."""
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
        shutil.rmtree(previous, ignore_errors=True)  # left by a kill inside an earlier replace (never an input)
        if out_dir.exists():
            out_dir.rename(previous)
        fsync_dir(staging)  # the names written into it, then its own new name: durable after a crash
        staging.rename(out_dir)
        fsync_dir(out_dir.parent)
        shutil.rmtree(previous, ignore_errors=True)
    dist.barrier()


def save_model(model: torch.nn.Module, directory: str | Path) -> Path:
    """Save the model's weights as a distributed checkpoint at ``directory`` (collective).

    Raises:
        CheckpointError: ``directory`` already exists.
    """
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
    """Fill the model from a distributed checkpoint saved at any layout and on either lane
    (Transformer Engine or the local spec) (collective).

    The one difference the lanes' checkpoints may have is tolerated: Transformer Engine modules
    (TE >= 1.13 norms among them) carry an ``_extra_state`` entry (FP8 scaling metadata) that a
    checkpoint written without TE lacks; such a module starts with fresh metadata, as in a new
    run. Every other weight the model needs must be in the checkpoint.

    Raises:
        CheckpointError: no checkpoint at ``directory``; a file of it is missing, truncated or
            corrupt (named); or it lacks weights of the model (named) or holds them in other
            shapes (saved from a different model).
    """
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.validation import StrictHandling

    path = Path(directory)
    if not path.is_dir():
        hint = " (an interrupted save left only the .incomplete directory)" if \
            path.with_name(path.name + ".incomplete").exists() else ""
        raise CheckpointError(f"no checkpoint at {path}{hint}; check the path or convert a model first.")
    from torch.distributed.checkpoint.api import CheckpointException

    bare = unwrap(model)
    try:
        # RETURN_UNEXPECTED: keys the model asks for and the checkpoint lacks ("unexpected" in
        # megatron-core's words) are left out of the load and returned, instead of failing in
        # the storage layer with a message that names no fix.
        state, _, absent = dist_checkpointing.load(bare.sharded_state_dict(), str(path),
                                                   strict=StrictHandling.RETURN_UNEXPECTED)
    except (Exception, CheckpointException) as err:  # CheckpointException is a BaseException
        raise CheckpointError(_load_failure(path, err)) from err
    _refuse_absent_weights(path, absent)
    missing, unexpected = bare.load_state_dict(state, strict=False)
    wrong = [key for key in missing if not key.endswith("_extra_state")] + list(unexpected)
    if strict and wrong:
        raise CheckpointError(f"the checkpoint at {path} does not fit the model being loaded ({_some(wrong)}); "
                              "it was saved from a different model: check the model config.")


def _some(keys: list[str], shown: int = 3) -> str:
    more = f" and {len(keys) - shown} more" if len(keys) > shown else ""
    return ", ".join(sorted(keys)[:shown]) + more


def _refuse_absent_weights(path: Path, absent: set[str]) -> None:
    """Raise on every rank when any rank's model asks for a checkpoint key, other than a
    Transformer Engine ``_extra_state``, that the checkpoint at ``path`` lacks (collective:
    pipeline stages ask for different keys, and each must stop, not only the one that noticed).

    Raises:
        CheckpointError: naming the absent keys.
    """
    lacking = sorted(key for key in absent if not key.endswith("_extra_state"))
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, lacking)
    lacking = sorted({key for keys in gathered for key in keys})
    if lacking:
        hint = ""
        if any(key.endswith("pre_mlp_layernorm.weight") for key in lacking):
            hint = (" (an MoE checkpoint converted before the local and Transformer Engine lanes shared "
                    "one key set stores that norm as mlp.linear_fc1.layer_norm_weight: convert it again)")
        raise CheckpointError(f"the checkpoint at {path} lacks {_some(lacking)}, which the model being loaded "
                              f"needs{hint}; it was saved from a different model: check the model config.")
    if any(absent) and is_rank0():
        logging.getLogger(__name__).info(
            "%s was written without Transformer Engine: %d _extra_state entries start fresh", path, len(absent))


def _load_failure(path: Path, err: BaseException) -> str:
    """The sentence for a failed load: a damaged file named when one is (:func:`damaged_file`),
    else the first line of the library's error with the likely cause."""
    damage = damaged_file(path)
    if damage is not None:
        return (f"{damage}; the checkpoint at {path} cannot be read: copy it again from its source, or "
                "convert or train it again.")
    lines = str(err).splitlines() or [type(err).__name__]
    first_line = next((line for line in lines if "Error" in line), lines[0])
    return (f"the checkpoint at {path} does not fit the model being loaded ({first_line.strip()[:300]}); "
            "it was saved from a different model: check the model config.")


def damaged_file(path: Path) -> str | None:
    """What is wrong with the files of the torch_dist checkpoint at ``path``, or None when its
    index and every data file it names look whole: megatron-core's ``metadata.json`` must
    exist, torch's ``.metadata`` index must unpickle, each
    ``.distcp`` file it names must exist and reach the end of its last item, and each item must
    be a whole torch.save record (zip local header at its start, end record at its end).
    Reads the index and a few bytes per item."""
    from torch.distributed.checkpoint import FileSystemReader

    if not (path / "metadata.json").is_file():  # megatron-core's record of the format
        return f"{path / 'metadata.json'} is missing"
    try:
        storage = FileSystemReader(str(path)).read_metadata().storage_data
    except FileNotFoundError:
        return f"{path / '.metadata'} is missing"
    except Exception as err:  # noqa: BLE001 - any failure to unpickle the index is damage
        return f"{path / '.metadata'} is truncated or corrupt ({type(err).__name__})"
    items: dict[str, list[tuple[int, int]]] = {}
    for info in storage.values():
        items.setdefault(info.relative_path, []).append((info.offset, info.length))
    for name, spans in sorted(items.items()):
        damage = _damaged_data_file(path / name, sorted(spans))
        if damage is not None:
            return damage
    return None


def _damaged_data_file(file: Path, spans: list[tuple[int, int]]) -> str | None:
    if not file.is_file():
        return f"{file} is missing"
    size = file.stat().st_size
    end = max(offset + length for offset, length in spans)
    if size < end:
        return f"{file} is truncated ({size} bytes; the checkpoint's index expects at least {end})"
    with open(file, "rb") as handle:
        for offset, length in spans:
            handle.seek(offset)
            head = handle.read(4)
            handle.seek(offset + length - 22)  # a zip end-of-central-directory record without comment
            tail = handle.read(4)
            if head != b"PK\x03\x04" or tail != b"PK\x05\x06":
                return f"{file} is corrupt (the item at byte {offset} is not a whole torch.save record)"
    return None


def save_weights_lazily(model: torch.nn.Module, directory: Path,
                        materialize: Callable[[str, int, int], torch.Tensor | FileBytes]) -> None:
    """Write a distributed checkpoint for a model built on the meta device (collective).

    The checkpoint is the one :func:`save_weights` would write for the same model and layout
    (megatron-core's own sharded state dict, factories and planner decide keys, shapes and
    chunks), but no tensor exists until the writer reaches it: ``materialize(name, first_row,
    num_rows)`` returns rows ``first_row``.. of parameter ``name`` (as in ``named_parameters``;
    a row is everything below the first dimension) as a tensor, or as :class:`FileBytes` when
    those bytes already lie in files (then they are copied file to file, never entering this
    process's memory), and is called then, once per chunk megatron planned (the two halves of a
    gated fc1 are two chunks). Each chunk is dropped once written, so a process holds at most
    one chunk per writer thread instead of its whole model.
    """
    from megatron.core.dist_checkpointing.core import CheckpointingConfig, save_config
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor
    from megatron.core.dist_checkpointing.state_dict_utils import save_preprocess
    from megatron.core.dist_checkpointing.strategies.torch import mcore_to_pyt_state_dict
    from torch.distributed.checkpoint import save as dcp_save

    bare = unwrap(model)
    names = {id(param): name for name, param in bare.named_parameters()}
    sharded, common = save_preprocess(bare.sharded_state_dict(), validate_access_integrity=True)
    sharded["common_state"] = ShardedObject(key="common_state", data=common, global_shape=(1,),
                                            global_offset=(0,), replica_id=dist.get_rank())
    sources = {}
    for item in nested_values(sharded):
        if isinstance(item, ShardedTensor):
            base = _viewed_tensor(item.data)
            sources[(item.key, tuple(item.global_offset))] = (names.get(id(base)), base, item.data)
    by_key = _by_sharded_key(sharded)
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


def _by_sharded_key(sharded: dict) -> dict:
    """The sharded state dict keyed by each tensor's checkpoint key, main replicas only, as
    megatron-core's own torch_dist save strategy keys it. Private API of megatron-core 0.19.x
    (``strategies.torch._replace_state_dict_keys_with_sharded_keys``)."""
    from megatron.core.dist_checkpointing.strategies.torch import _replace_state_dict_keys_with_sharded_keys

    by_key, _, _ = _replace_state_dict_keys_with_sharded_keys(sharded, keep_only_main_replica=True)
    return by_key


def _viewed_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor ``tensor`` is a view of, or ``tensor`` itself. Private attribute of torch 2.13
    (``Tensor._base``)."""
    return tensor if tensor._base is None else tensor._base


def _row_range(base: torch.Tensor, view: torch.Tensor) -> tuple[int, int] | None:
    """(first row, number of rows) when ``view`` is whole consecutive rows of ``base``, else None."""
    row = base[0].numel() if base.dim() > 1 else 1
    offset = view.storage_offset() - base.storage_offset()
    if not view.is_contiguous() or offset % row or view.numel() % row:
        return None
    return offset // row, view.numel() // row


def _lazy_save_planner(sources: dict, materialize: Callable[[str, int, int], torch.Tensor | FileBytes]):
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
            sizes = tuple(write_item.tensor_data.chunk.sizes)
            rows = _row_range(base, view)
            if rows is not None:
                chunk = materialize(name, *rows)
                if isinstance(chunk, FileBytes):
                    return FileBytes(sizes, chunk.dtype, chunk.pieces)
            else:  # not whole rows (no such chunk at TP=1 today): make the parameter, copy the view
                whole = materialize(name, 0, base.shape[0] if base.dim() else 1)
                whole = whole.read() if isinstance(whole, FileBytes) else whole
                chunk = whole.as_strided(view.size(), view.stride(), view.storage_offset()).clone()
            return chunk.reshape(sizes)

    return LazySavePlanner()


def _streaming_writer(directory: Path):
    """torch DCP's file-per-thread writer with its own loop over a file's items: each tensor is
    dropped as soon as it is written (torch's loop keeps a file's tensors until the file is
    closed), and a failure in any writer thread fails the save instead of ending that thread."""
    from torch.distributed.checkpoint import FileSystemWriter
    from torch.distributed.checkpoint.planner import WriteItemType

    class StreamingWriter(FileSystemWriter):
        def _write_data(self, planner, file_queue) -> torch.futures.Future:
            # Overrides a private method of torch 2.13's FileSystemWriter: it receives the queue
            # of (path, file name, write items) and returns a Future of the WriteResults.
            return _write_queued_files(self.thread_count, file_queue,
                                       lambda path, file_name, items: self._write_file(planner, path, file_name, items))

        def _write_file(self, planner, path, file_name: str, items: list) -> list:
            written = []
            ordered = sorted(items, key=lambda item: item.type != WriteItemType.BYTE_IO)
            with self.fs.create_stream(path, "wb") as stream:
                for item in ordered:
                    data = planner.resolve_data(item)
                    if isinstance(data, FileBytes):
                        written.append(_copy_file_bytes(stream, path, data, item, file_name))
                        continue
                    if isinstance(data, torch.Tensor):
                        data = data.detach()
                        if data.untyped_storage().nbytes() != data.nbytes:
                            data = data.clone()  # torch.save writes a view's whole storage
                    written.append(_write_tensor_item(self, stream, data, item, file_name))
                    del data
                if self.sync_files:
                    stream.flush()
                    os.fsync(stream.fileno())
            return written

    return StreamingWriter(str(directory), single_file_per_rank=True, thread_count=WRITER_THREADS)


def _write_queued_files(thread_count: int, file_queue, write_file: Callable[[str, str, list], list]):
    """Run ``write_file(path, file_name, items)`` for each entry of ``file_queue`` on
    ``thread_count`` threads (this one included); a Future of all their results. The first
    failure in any thread is raised here."""
    import queue

    results, errors = [], []

    def work() -> None:
        try:
            while True:
                try:
                    path, file_name, items = file_queue.get_nowait()
                except queue.Empty:
                    return
                results.extend(write_file(path, file_name, items))
        except BaseException as err:  # noqa: BLE001 - re-raised in the calling thread
            errors.append(err)

    threads = [threading.Thread(target=work, daemon=True) for _ in range(thread_count - 1)]
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


def _write_tensor_item(writer, stream, data, write_item, file_name: str):
    """Write one tensor or bytes item as torch DCP's file writer does, with ``writer``'s
    transforms and serialization format; returns its WriteResult. Private API of torch 2.13
    (``torch.distributed.checkpoint.filesystem._write_item`` and the writer's attributes)."""
    from torch.distributed.checkpoint.filesystem import _write_item

    return _write_item(writer.transforms, stream, data, write_item, file_name, writer.serialization_format)


def _storage_info(file_name: str, offset: int, length: int):
    """DCP's record of where an item lies (relative file name, byte offset, byte count). Private
    API of torch 2.13 (``torch.distributed.checkpoint.filesystem._StorageInfo``)."""
    from torch.distributed.checkpoint.filesystem import _StorageInfo

    return _StorageInfo(file_name, offset, length)


def _copy_file_bytes(stream, path, chunk: FileBytes, write_item, file_name: str):
    """Append the record torch.save would write for ``chunk`` to ``stream``, its bytes copied
    from their source files inside the kernel; returns the DCP write result. torch.save under
    ``skip_data`` writes the record with a gap where the bytes go (zero pieces stay that gap)."""
    from torch.distributed.checkpoint.storage import WriteResult

    start = stream.tell()
    with torch.serialization.skip_data():
        # torch.empty only reserves address space: skip_data never touches the values.
        torch.save(torch.empty(chunk.shape, dtype=chunk.dtype), stream)
    stream.flush()
    length = stream.tell() - start
    position = _storage_bytes_offset(path, start, length, sum(nbytes for _, _, nbytes in chunk.pieces))
    for descriptor, offset, nbytes in chunk.pieces:
        if descriptor is not None:
            try:
                _copy_range(descriptor, offset, stream.fileno(), position, nbytes)
            except OSError as err:
                raise CheckpointError(f"copying a tensor's bytes into {path} failed ({err.strerror}); check the "
                                      "source and output file systems and storage, then run again.") from err
        position += nbytes
    return WriteResult(index=write_item.index, size_in_bytes=length,
                       storage_data=_storage_info(file_name, start, length))


def _storage_bytes_offset(path, start: int, length: int, nbytes: int) -> int:
    """File offset of the storage bytes in the torch.save record at ``start``..``start + length``
    (a zip archive: its central directory names the entry, the local header gives the offset)."""
    with open(path, "rb") as handle:
        tail = min(length, 1 << 16)  # the central directory and end record sit at the end
        handle.seek(start + length - tail)
        end = handle.read(tail)
        archive = zipfile.ZipFile(_Padded(end, length))
        [entry] = [info for info in archive.infolist() if info.filename.split("/", 1)[-1] == "data/0"]
        if entry.file_size != nbytes:
            raise CheckpointError(f"torch.save reserved {entry.file_size} bytes for a {nbytes}-byte tensor.")
        handle.seek(start + entry.header_offset)
        header = handle.read(30)
        name_length, extra_length = struct.unpack_from("<HH", header, 26)
        return start + entry.header_offset + 30 + name_length + extra_length


class _Padded(WindowReader):
    """The last bytes of an archive of ``length`` bytes, readable at their offsets in it (zipfile
    reads only the end record and central directory, which lie there)."""

    def __init__(self, end: bytes, length: int) -> None:
        super().__init__(length)
        self.end = end

    def read_at(self, position: int, size: int) -> bytes:
        first = position - (self.length - len(self.end))
        if first < 0:
            raise OSError("zip read outside the archive's last 64 KiB")
        return self.end[first:first + size]


def _copy_range(source: int, source_offset: int, target: int, target_offset: int, nbytes: int) -> None:
    """Copy bytes between files inside the kernel (copy_file_range); where the file systems do
    not support it, through a buffer."""
    done = 0
    while done < nbytes:
        try:
            copied = os.copy_file_range(source, target, nbytes - done, source_offset + done, target_offset + done)
        except OSError as err:
            if err.errno not in (errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL):
                raise
            _copy_range_buffered(source, source_offset + done, target, target_offset + done, nbytes - done)
            return
        if copied == 0:
            raise CheckpointError(f"a source file ends {nbytes - done} bytes early; it is truncated or changed "
                                  "while being read.")
        done += copied


def _copy_range_buffered(source: int, source_offset: int, target: int, target_offset: int, nbytes: int) -> None:
    block = torch.empty(min(nbytes, 64 << 20), dtype=torch.uint8)
    done = 0
    while done < nbytes:
        piece = block[:min(len(block), nbytes - done)]
        read_exactly(source, source_offset + done, piece)
        view = memoryview(piece.numpy())
        written = 0
        while written < len(view):
            written += os.pwrite(target, view[written:], target_offset + done + written)
        done += len(piece)
