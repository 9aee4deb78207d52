"""Reading a torch_dist checkpoint (Megatron-Core's distributed checkpoint) chunk by chunk, in one
process: no process group, no model, no GPU.

The checkpoint's ``.metadata`` (torch DCP's index) gives, for every tensor key, its global shape
and dtype and the chunks ranks saved, and for each chunk the file, byte offset and byte count of
its item. torch 2.13's ``FileSystemWriter`` writes each tensor item as one ``torch.save`` record
(a stored, uncompressed zip whose ``data/0`` entry holds the tensor's storage bytes) and records
no stream transforms unless an extension (compression) was asked for. A region of a global tensor
is read by loading each overlapping record's header on the meta device (shape, strides, storage
offset; no data is read) and then only the rows of its storage that the region needs.
"""

from __future__ import annotations

import math
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch

from megatron_sami.errors import CheckpointError
from megatron_sami.io import WindowReader
from megatron_sami.models.checkpoint import damaged_file, read_exactly


@dataclass(frozen=True)
class Chunk:
    """One saved piece of a global tensor: where it sits in it, and where its record lies."""

    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    file_name: str
    offset: int
    length: int


class _FileSlice(WindowReader):
    """Bytes ``offset``..``offset + length`` of an open file, as a seekable stream (positional
    reads: several slices of one descriptor may be read in turn)."""

    def __init__(self, descriptor: int, offset: int, length: int) -> None:
        super().__init__(length)
        self.descriptor, self.offset = descriptor, offset

    def read_at(self, position: int, size: int) -> bytes:
        return os.pread(self.descriptor, size, self.offset + position)


def _dcp_metadata(weights_dir: Path):
    """torch DCP's index of the checkpoint at ``weights_dir`` (public API of torch 2.13:
    ``FileSystemReader.read_metadata``), or CheckpointError naming what is damaged."""
    from torch.distributed.checkpoint import FileSystemReader

    damage = damaged_file(weights_dir)
    if damage is not None:
        raise CheckpointError(f"{damage}; the checkpoint at {weights_dir} cannot be read: copy it again from its "
                              "source, or convert or train it again.")
    return FileSystemReader(str(weights_dir)).read_metadata()


def _storage_entry(info) -> tuple[str, int, int, tuple]:
    """(relative file name, byte offset, byte count, stream transforms) of a DCP storage record.
    Attributes of a private class of torch 2.13 (``filesystem._StorageInfo``)."""
    return info.relative_path, info.offset, info.length, tuple(getattr(info, "transform_descriptors", None) or ())


class CheckpointReader:
    """The tensors of a torch_dist checkpoint directory, read region by region.

    Every failure to read is a :class:`~megatron_sami.errors.CheckpointError` naming the file.
    """

    def __init__(self, weights_dir: Path) -> None:
        """Read the checkpoint's index and check that every data file it names is whole.

        Raises:
            CheckpointError: no checkpoint at ``weights_dir``, a damaged or missing file (named),
                or chunks saved with stream transforms (compression), which this reader does not undo.
        """
        from torch.distributed.checkpoint.metadata import TensorStorageMetadata

        self.weights_dir = Path(weights_dir)
        if not self.weights_dir.is_dir():
            raise CheckpointError(f"no checkpoint at {self.weights_dir}; check the path or convert a model first.")
        metadata = _dcp_metadata(self.weights_dir)
        entries = metadata.state_dict_metadata
        self.sizes = {key: tuple(entry.size) for key, entry in entries.items()
                      if isinstance(entry, TensorStorageMetadata)}
        self.dtypes = {key: entries[key].properties.dtype for key in self.sizes}
        self.objects = sorted(key for key in entries if key not in self.sizes)
        self.chunks: dict[str, list[Chunk]] = {key: [] for key in self.sizes}
        for index, info in metadata.storage_data.items():
            if index.fqn not in self.sizes:
                continue
            file_name, offset, length, transforms = _storage_entry(info)
            if transforms:
                raise CheckpointError(f"{index.fqn} in {self.weights_dir} was saved with stream transforms "
                                      f"({', '.join(transforms)}); export a checkpoint saved without compression.")
            sizes = next(tuple(c.sizes) for c in entries[index.fqn].chunks if tuple(c.offsets) == tuple(index.offset))
            self.chunks[index.fqn].append(Chunk(tuple(index.offset), sizes, file_name, offset, length))
        self._descriptors: dict[str, int] = {}

    def close(self) -> None:
        """Close the data files opened for reading."""
        for descriptor in self._descriptors.values():
            os.close(descriptor)
        self._descriptors.clear()

    def __enter__(self) -> CheckpointReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def read(self, key: str, offsets: tuple[int, ...], sizes: tuple[int, ...]) -> torch.Tensor:
        """The region ``offsets``..``offsets + sizes`` of the global tensor ``key``, in its saved
        dtype, assembled from every chunk that overlaps it (only the rows each chunk contributes
        are read).

        Raises:
            CheckpointError: the chunks do not cover the region, or a record is not a whole,
                uncompressed torch.save record of one tensor.
        """
        out = torch.empty(sizes, dtype=self.dtypes[key])
        covered = 0
        for chunk in self.chunks[key]:
            low = [max(o, c) for o, c in zip(offsets, chunk.offsets, strict=True)]
            high = [min(o + s, c + n) for o, s, c, n in zip(offsets, sizes, chunk.offsets, chunk.sizes, strict=True)]
            if any(lo >= hi for lo, hi in zip(low, high, strict=True)):
                continue
            target = out[tuple(slice(lo - o, hi - o) for lo, hi, o in zip(low, high, offsets, strict=True))]
            self._read_chunk_part(chunk, [lo - c for lo, c in zip(low, chunk.offsets, strict=True)], target)
            covered += target.numel()
        if covered != math.prod(sizes):
            raise CheckpointError(f"the chunks of {key} in {self.weights_dir} cover {covered} of the {math.prod(sizes)} "
                                  f"values at {list(offsets)} (size {list(sizes)}); the checkpoint is incomplete: "
                                  "copy it again or train it again.")
        return out

    def _descriptor(self, file_name: str) -> int:
        if file_name not in self._descriptors:
            self._descriptors[file_name] = os.open(self.weights_dir / file_name, os.O_RDONLY)
        return self._descriptors[file_name]

    def _read_chunk_part(self, chunk: Chunk, first: list[int], target: torch.Tensor) -> None:
        """Fill ``target`` with the chunk's elements from ``first`` (per dimension) on: only the
        rows ``first[0]``.. of a contiguous chunk that ``target`` needs are read, straight into
        ``target`` when it takes whole rows of the chunk and is contiguous."""
        count = list(target.shape)
        path = self.weights_dir / chunk.file_name
        descriptor = self._descriptor(chunk.file_name)
        try:
            header, data_start = _record_layout(_FileSlice(descriptor, chunk.offset, chunk.length))
        except Exception as err:  # noqa: BLE001 - zipfile and the unpickler raise several types
            raise CheckpointError(f"{path} is corrupt (the item at byte {chunk.offset} is not a whole torch.save "
                                  f"record: {type(err).__name__}); copy the checkpoint again from its source.") from err
        if tuple(header.shape) != chunk.sizes:
            raise CheckpointError(f"{path} holds a tensor of shape {list(header.shape)} at byte {chunk.offset} where its "
                                  f"index says {list(chunk.sizes)}; the checkpoint is corrupt: copy it again.")
        itemsize = header.dtype.itemsize
        if header.dim() and header.is_contiguous():
            start = chunk.offset + data_start + (header.storage_offset() + first[0] * header.stride(0)) * itemsize
            whole_rows = list(target.shape[1:]) == list(header.shape[1:])
            if whole_rows and target.is_contiguous() and target.dtype == header.dtype:
                read_exactly(descriptor, start, target)  # no copy: the bytes land where they belong
                return
            block = torch.empty((count[0], *header.shape[1:]), dtype=header.dtype)
            read_exactly(descriptor, start, block)
            first = [0, *first[1:]]
        else:  # a view saved with its whole storage: read the storage, then take the view
            storage = torch.empty(header.untyped_storage().nbytes(), dtype=torch.uint8)
            read_exactly(descriptor, chunk.offset + data_start, storage)
            block = storage.view(header.dtype).as_strided(header.shape, header.stride(), header.storage_offset())
        target.copy_(block[tuple(slice(f, f + n) for f, n in zip(first, count, strict=True))])


def _record_layout(record: _FileSlice) -> tuple[torch.Tensor, int]:
    """(the record's tensor on the meta device, the byte offset of its storage in the record).

    ``torch.load`` onto the meta device reads the record's pickle and no storage bytes; the zip
    entry ``data/0``'s local header gives where those bytes start.

    Raises:
        ValueError: the record is not one tensor with one uncompressed storage.
    """
    header = torch.load(record, map_location="meta", weights_only=True)
    if not isinstance(header, torch.Tensor):
        raise ValueError(f"a {type(header).__name__}, not a tensor")
    record.seek(0)
    archive = zipfile.ZipFile(record)
    storages = [info for info in archive.infolist() if info.filename.split("/", 1)[-1].startswith("data/")]
    if len(storages) != 1 or storages[0].compress_type != zipfile.ZIP_STORED:
        raise ValueError(f"{len(storages)} storages")
    if storages[0].file_size < header.untyped_storage().nbytes():
        raise ValueError("a storage shorter than its tensor")
    local = bytearray(30)
    record.seek(storages[0].header_offset)
    record.readinto(local)
    name_length, extra_length = int.from_bytes(local[26:28], "little"), int.from_bytes(local[28:30], "little")
    return header, storages[0].header_offset + 30 + name_length + extra_length
