"""The row layouts of the conversion transforms, against straightforward implementations, and
row ranges read straight from safetensors files. Pure torch, one process."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from megatron_sami.conversion.convert import read_megatron_rows
from megatron_sami.conversion.hf_io import SafetensorsReader
from megatron_sami.conversion.table import Rule
from megatron_sami.conversion.transforms import Shapes, megatron_shape, to_hf, to_megatron, to_rows

HIDDEN = 6


def reference_qkv(shapes: Shapes, q, k, v) -> torch.Tensor:
    """Megatron's fused QKV, one KV group at a time: its q heads, then its k head and v head."""
    d, per_group = shapes.head_dim, shapes.num_heads // shapes.num_query_groups
    blocks = []
    for group in range(shapes.num_query_groups):
        blocks += [q[group * per_group * d:(group + 1) * per_group * d], k[group * d:(group + 1) * d],
                   v[group * d:(group + 1) * d]]
    return torch.cat(blocks)


def sources_for(transform: str, shapes: Shapes) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)

    def random(*shape):
        return torch.randn(*shape, generator=generator)

    d = shapes.head_dim
    return {
        "qkv": [random(shapes.num_heads * d, HIDDEN), random(shapes.num_query_groups * d, HIDDEN),
                random(shapes.num_query_groups * d, HIDDEN)],
        "gate_up": [random(5, HIDDEN), random(5, HIDDEN)],
        "vocab_rows": [random(shapes.vocab_size, HIDDEN)],
        "copy": [random(7)],
    }[transform]


def reference(transform: str, shapes: Shapes, sources: list[torch.Tensor]) -> torch.Tensor:
    if transform == "qkv":
        return reference_qkv(shapes, *sources)
    if transform == "gate_up":
        return torch.cat(sources)
    if transform == "vocab_rows":
        padding = torch.zeros(shapes.padded_vocab_size - shapes.vocab_size, HIDDEN)
        return torch.cat([sources[0], padding])
    return sources[0]


SHAPES = [Shapes(num_heads=4, num_query_groups=2, head_dim=3, vocab_size=11, padded_vocab_size=16),
          Shapes(num_heads=6, num_query_groups=1, head_dim=2, vocab_size=16, padded_vocab_size=16),
          Shapes(num_heads=3, num_query_groups=3, head_dim=2, vocab_size=9, padded_vocab_size=12)]
TRANSFORMS = ["qkv", "gate_up", "vocab_rows", "copy"]


@pytest.mark.parametrize("shapes", SHAPES)
@pytest.mark.parametrize("transform", TRANSFORMS)
def test_layouts_equal_straightforward_implementations_and_invert(transform, shapes):
    sources = sources_for(transform, shapes)
    fused = to_megatron(transform, shapes, *sources)
    assert torch.equal(fused, reference(transform, shapes, sources))
    assert megatron_shape(transform, shapes, [tuple(source.shape) for source in sources]) == tuple(fused.shape)
    assert all(torch.equal(back, source) for back, source in zip(to_hf(transform, shapes, fused), sources, strict=True))


@pytest.mark.parametrize("transform", TRANSFORMS)
def test_any_row_range_read_from_the_files_equals_the_same_rows_of_the_whole_tensor(transform, tmp_path):
    shapes = SHAPES[0]
    sources = [source.to(torch.bfloat16) for source in sources_for(transform, shapes)]
    keys = [f"t{number}" for number in range(len(sources))]
    save_file({key: source for key, source in zip(keys, sources, strict=True)}, str(tmp_path / "model.safetensors"))
    reader = SafetensorsReader(tmp_path)
    rule = Rule("m", tuple(keys), transform)
    layout = to_rows(transform, shapes, [reader.shape(key) for key in keys])
    whole = to_megatron(transform, shapes, *sources)
    rows = whole.shape[0]
    try:
        for first in range(rows):
            for count in range(1, rows - first + 1):
                for dtype in (torch.bfloat16, torch.float32):
                    out = torch.full((count, *whole.shape[1:]), float("nan"), dtype=dtype)
                    read_megatron_rows(reader, rule, layout, first, out)
                    assert torch.equal(out, whole[first:first + count].to(dtype)), (first, count, dtype)
    finally:
        reader.close()


def test_a_layout_reading_past_its_tensor_is_refused():
    shapes = SHAPES[0]
    q, k, v = sources_for("qkv", shapes)
    with pytest.raises(ValueError, match="rows"):
        to_rows("qkv", shapes, [tuple(q.shape), (k.shape[0] - 1, HIDDEN), tuple(v.shape)])
    with pytest.raises(ValueError, match="different shapes"):
        to_rows("gate_up", shapes, [(5, HIDDEN), (5, HIDDEN + 1)])


@pytest.mark.parametrize("kernel_copy", [True, False])
def test_file_bytes_records_load_as_the_tensor_with_and_without_kernel_copies(kernel_copy, tmp_path, monkeypatch):
    """A record written from FileBytes (source pieces and a zero piece) is the tensor torch.load
    gives back, whether the bytes move by copy_file_range or, where a file system refuses it,
    through a buffer."""
    import errno
    import io
    import os

    from torch.distributed.checkpoint.metadata import MetadataIndex
    from torch.distributed.checkpoint.planner import WriteItem, WriteItemType

    from megatron_sami.models.checkpoint import FileBytes, _copy_file_bytes

    if not kernel_copy:
        def refuse(*args):
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        monkeypatch.setattr(os, "copy_file_range", refuse)
    source = torch.arange(40, dtype=torch.bfloat16).reshape(10, 4)
    (tmp_path / "source.bin").write_bytes(b"header" + bytes(source.view(torch.uint8).numpy()))
    descriptor = os.open(tmp_path / "source.bin", os.O_RDONLY)
    row = 4 * 2
    chunk = FileBytes((6, 4), torch.bfloat16, ((descriptor, 6 + 7 * row, 2 * row), (None, 0, 2 * row),
                                               (descriptor, 6 + 1 * row, 2 * row)))
    expected = torch.cat([source[7:9], torch.zeros(2, 4, dtype=torch.bfloat16), source[1:3]])
    path = tmp_path / "out.distcp"
    item = WriteItem(index=MetadataIndex("w"), type=WriteItemType.TENSOR)
    try:
        with path.open("wb") as stream:
            stream.write(b"earlier records")
            result = _copy_file_bytes(stream, path, chunk, item, "out.distcp")
            stream.write(b"later records")
        assert torch.equal(chunk.read(), expected)
    finally:
        os.close(descriptor)
    storage = result.storage_data
    record = path.read_bytes()[storage.offset:storage.offset + storage.length]
    assert torch.equal(torch.load(io.BytesIO(record), weights_only=True), expected)
    assert path.read_bytes().endswith(b"later records")
