"""The streaming export (issue 14): checkpoint -> HF shards in one process, one tensor at a time.

Fast tests use checkpoints written here with torch DCP (no megatron-core); the slow ones prove
the export equal, tensor for tensor, to the in-model export it replaced, from checkpoints
megatron-core saved at TP2xPP2, TP2xEP2 (Mixtral) and PP2 with tied embeddings.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import conversion_jobs as jobs
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from megatron_sami.cli import convert as convert_cli
from megatron_sami.conversion import checkpoint_reader, export
from megatron_sami.conversion.hf_io import StreamingShardWriter, write_sharded
from megatron_sami.conversion.table import Rule
from megatron_sami.errors import CheckpointError
from megatron_sami.testing.multiprocess import run_distributed


def read_dir(directory: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for path in sorted(directory.glob("*.safetensors")):
        tensors.update(load_file(path))
    return tensors


def assert_same_export(new: Path, old: Path) -> None:
    """Every tensor (dtype and values), the index and every other file byte for byte."""
    new_tensors, old_tensors = read_dir(new), read_dir(old)
    assert sorted(new_tensors) == sorted(old_tensors)
    for key, tensor in old_tensors.items():
        assert new_tensors[key].dtype == tensor.dtype and torch.equal(new_tensors[key], tensor), key
    index = "model.safetensors.index.json"
    assert json.loads((new / index).read_text()) == json.loads((old / index).read_text())
    others = sorted(p.name for p in old.iterdir() if p.suffix != ".safetensors" and p.name != index)
    assert sorted(p.name for p in new.iterdir() if p.suffix != ".safetensors" and p.name != index) == others
    assert all((new / name).read_bytes() == (old / name).read_bytes() for name in others), others


# ---------------------------------------------------------------------------------------------
# The parts: names, order, the chunk reader, the shard writer.

@pytest.mark.parametrize(("name", "expected"), [
    ("embedding.word_embeddings.weight", ("embedding.word_embeddings.weight", ())),
    ("decoder.layers.12.self_attention.linear_qkv.weight", ("decoder.layers.self_attention.linear_qkv.weight", (12,))),
    ("decoder.layers.3.mlp.experts.local_experts.5.linear_fc1.weight",
     ("decoder.layers.mlp.experts.local_experts.linear_fc1.weight", (3, 5))),
])
def test_a_key_map_name_splits_into_the_stacked_name_and_its_indices(name, expected):
    assert export.split_name(name) == expected


def test_rules_are_written_in_the_models_parameter_order():
    """The in-model export wrote named_parameters' order; the same order splits files alike."""
    names = ["output_layer.weight", "decoder.final_layernorm.weight", "decoder.layers.1.input_layernorm.weight",
             "decoder.layers.0.mlp.experts.local_experts.1.linear_fc1.weight",
             "decoder.layers.0.mlp.experts.local_experts.0.linear_fc2.weight",
             "decoder.layers.0.mlp.experts.local_experts.0.linear_fc1.weight", "decoder.layers.0.mlp.router.weight",
             "decoder.layers.0.pre_mlp_layernorm.weight", "decoder.layers.0.self_attention.linear_qkv.weight",
             "decoder.layers.0.self_attention.linear_proj.weight", "decoder.layers.0.input_layernorm.weight",
             "embedding.word_embeddings.weight"]
    ordered = sorted((Rule(name, (), "copy") for name in names), key=export.export_order)
    assert [rule.megatron for rule in ordered] == names[::-1]


def test_the_reader_assembles_any_region_from_chunks_reading_only_its_rows(tmp_path, monkeypatch):
    from torch.distributed.checkpoint import FileSystemWriter
    from torch.distributed.checkpoint import save as dcp_save

    stacked = torch.arange(4 * 6 * 5, dtype=torch.float32).reshape(4, 6, 5)
    transposed = torch.arange(35, dtype=torch.bfloat16).reshape(5, 7).t()  # saved as a non-contiguous view
    dcp_save({"stacked": stacked, "transposed": transposed}, storage_writer=FileSystemWriter(str(tmp_path)),
             no_dist=True)
    (tmp_path / "metadata.json").write_text("{}")
    read_bytes = []
    original = checkpoint_reader.read_exactly
    monkeypatch.setattr(checkpoint_reader, "read_exactly",
                        lambda fd, offset, out: (read_bytes.append(out.nbytes), original(fd, offset, out)))
    with checkpoint_reader.CheckpointReader(tmp_path) as reader:
        assert torch.equal(reader.read("stacked", (2, 0, 0), (1, 6, 5)), stacked[2:3])
        assert read_bytes == [6 * 5 * 4]  # one layer's rows, not the stacked tensor
        assert torch.equal(reader.read("stacked", (1, 2, 1), (2, 3, 3)), stacked[1:3, 2:5, 1:4])
        assert torch.equal(reader.read("transposed", (1, 2), (4, 3)), transposed[1:5, 2:5])
        assert reader.dtypes["transposed"] == torch.bfloat16


def test_streaming_shards_split_and_load_as_write_sharded_writes_them(tmp_path):
    generator = torch.Generator().manual_seed(0)
    tensors = {f"t{i}": torch.randn(n, 8, generator=generator).to(torch.bfloat16) for i, n in enumerate([5, 40, 3, 9])}
    (tmp_path / "whole").mkdir()
    (tmp_path / "streamed").mkdir()
    expected = write_sharded(tensors, tmp_path / "whole", "model-rank0000", 700)
    writer = StreamingShardWriter(tmp_path / "streamed", "model-rank0000",
                                  [(key, tuple(t.shape)) for key, t in tensors.items()], torch.bfloat16, 700)
    for key, tensor in tensors.items():
        writer.write(key, tensor)
    writer.close()
    assert writer.weight_map == expected and len(set(expected.values())) == 3
    assert writer.total_size == sum(t.nbytes for t in tensors.values())
    back = read_dir(tmp_path / "streamed")
    assert all(torch.equal(back[key], tensor) for key, tensor in tensors.items())
    with safe_open(tmp_path / "streamed" / expected["t1"], framework="pt") as handle:
        assert handle.metadata() == {"format": "pt"}


def test_the_shard_writer_refuses_a_tensor_out_of_its_plan(tmp_path):
    writer = StreamingShardWriter(tmp_path, "m", [("a", (2, 2)), ("b", (3,))], torch.float32, 10**6)
    with pytest.raises(ValueError, match="not the next tensor"):
        writer.write("b", torch.zeros(3))
    with pytest.raises(ValueError, match="not the next tensor"):
        writer.write("a", torch.zeros(2, 2, dtype=torch.bfloat16))
    writer.abort()


# ---------------------------------------------------------------------------------------------
# Whole exports of checkpoints written without megatron-core (one chunk per stacked tensor).

@pytest.mark.parametrize("variant", ["llama", "llama-tied", "mistral", "mixtral"])
def test_export_gives_back_every_hf_tensor_bitwise_and_the_config(variant, tmp_path):
    original = jobs.write_synthetic_checkpoint(tmp_path / "ckpt", variant, torch.bfloat16)
    jobs.to_hf(str(tmp_path / "ckpt"), str(tmp_path / "out"), max_shard_bytes=20_000)
    back = read_dir(tmp_path / "out")
    assert sorted(back) == sorted(original)
    for key, tensor in original.items():
        assert back[key].dtype == torch.bfloat16 and torch.equal(back[key], tensor), key
    assert len(list((tmp_path / "out").glob("model-rank0000-*.safetensors"))) > 1
    assert (tmp_path / "out" / "config.json").read_bytes() == (tmp_path / "ckpt" / "hf" / "config.json").read_bytes()
    assert not (tmp_path / "out.incomplete").exists()


def test_dtype_casts_each_tensor_once_and_names_it_in_the_config(tmp_path):
    original = jobs.write_synthetic_checkpoint(tmp_path / "ckpt", "llama", torch.float32)
    jobs.to_hf(str(tmp_path / "ckpt"), str(tmp_path / "out"), dtype="float16")
    back = read_dir(tmp_path / "out")
    assert all(back[key].dtype == torch.float16 and torch.equal(back[key], t.half()) for key, t in original.items())
    assert json.loads((tmp_path / "out" / "config.json").read_text())["torch_dtype"] == "float16"


def test_memory_stays_one_tensor_the_stacked_tensors_are_never_read_whole(tmp_path, monkeypatch):
    """Each read is at most the largest single tensor (the embedding); a layer's stacked tensor
    (here larger than the embedding) is read one layer's rows at a time."""
    jobs.write_synthetic_checkpoint(tmp_path / "ckpt", "llama")
    read_bytes = []
    original = checkpoint_reader.read_exactly
    monkeypatch.setattr(checkpoint_reader, "read_exactly",
                        lambda fd, offset, out: (read_bytes.append(out.nbytes), original(fd, offset, out)))
    jobs.to_hf(str(tmp_path / "ckpt"), str(tmp_path / "out"))
    embedding_bytes = 256 * 64 * 4  # the padded vocabulary
    stacked_fc1_bytes = 2 * 192 * 64 * 4
    assert stacked_fc1_bytes > embedding_bytes and max(read_bytes) == embedding_bytes


def test_a_device_budget_below_the_model_fits_the_export_above_its_largest_tensor(tmp_path, monkeypatch):
    """The in-model export built the whole model in one process: over any budget below the model."""
    from megatron_sami.errors import DeviceBudgetError

    original = jobs.write_synthetic_checkpoint(tmp_path / "ckpt", "llama")
    largest = 256 * 64  # the padded embedding
    assert sum(t.numel() for t in original.values()) > 5 * largest
    monkeypatch.setenv("SAMI_DEVICE_BUDGET_PARAMS", str(largest))
    jobs.to_hf(str(tmp_path / "ckpt"), str(tmp_path / "out"))
    monkeypatch.setenv("SAMI_DEVICE_BUDGET_PARAMS", str(largest - 1))
    with pytest.raises(DeviceBudgetError, match="embedding.word_embeddings.weight"):
        jobs.to_hf(str(tmp_path / "ckpt"), str(tmp_path / "out2"))


@pytest.mark.parametrize(("change", "expected"), [
    ({"drop": ("decoder.layers.mlp.linear_fc2.weight",)}, "lacks decoder.layers.mlp.linear_fc2.weight"),
    ({"extra": {"decoder.layers.mlp.linear_fc3.weight": torch.zeros(2, 64, 96)}},
     "holds decoder.layers.mlp.linear_fc3.weight"),
    ({"extra": {"decoder.final_layernorm.weight": torch.zeros(65)}}, "decoder.final_layernorm.weight of shape [65]"),
], ids=["missing", "unknown", "misshapen"])
def test_a_checkpoint_that_does_not_fit_its_model_is_refused_by_name(change, expected, tmp_path, capsys):
    jobs.write_synthetic_checkpoint(tmp_path / "ckpt", "llama", **change)
    with pytest.raises(SystemExit) as stop:
        convert_cli.main(["megatron-to-hf", str(tmp_path / "ckpt"), str(tmp_path / "out")])
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert stop.value.code == 2 and len(errors) == 1 and expected in errors[0] and "different model" in errors[0]
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.incomplete").exists()


def test_a_truncated_checkpoint_file_is_named(tmp_path):
    jobs.write_synthetic_checkpoint(tmp_path / "ckpt", "llama")
    [data] = (tmp_path / "ckpt" / "weights").glob("*.distcp")
    data.write_bytes(data.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match=re.escape(f"{data} is truncated")):
        jobs.to_hf(str(tmp_path / "ckpt"), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.incomplete").exists()


def test_under_a_multi_process_launch_only_the_first_process_exports(tmp_path, monkeypatch):
    jobs.write_synthetic_checkpoint(tmp_path / "ckpt", "llama")
    monkeypatch.setenv("RANK", "1")
    assert convert_cli.main(["megatron-to-hf", str(tmp_path / "ckpt"), str(tmp_path / "out"), "--pipeline", "2"]) == 0
    assert not (tmp_path / "out").exists()
    monkeypatch.setenv("RANK", "0")
    assert convert_cli.main(["megatron-to-hf", str(tmp_path / "ckpt"), str(tmp_path / "out"), "--pipeline", "2"]) == 0
    assert (tmp_path / "out" / "model.safetensors.index.json").is_file()


# ---------------------------------------------------------------------------------------------
# Checkpoints megatron-core saved at parallel layouts: the same output as the in-model export.

SOURCES = {  # name -> (variant, conversion world size / pipeline / expert, re-saved at (TP, PP, EP) or None)
    "llama-TP2xPP2": ("llama", 1, None, (2, 2, 1)),
    "mixtral-TP2xEP2": ("mixtral", 1, None, (2, 1, 2)),
    "tied-PP2": ("llama-tied", 2, (2, 1), None),
}


@pytest.mark.slow
@pytest.mark.parametrize("source", sorted(SOURCES))
def test_streaming_export_equals_the_in_model_export(source, tmp_path):
    variant, world, split, resave = SOURCES[source]
    hf_dir = jobs.make_hf_model(variant, tmp_path / "hf")
    run_distributed(jobs.to_megatron, world, str(hf_dir), str(tmp_path / "megatron"), *(split or ()))
    ckpt = tmp_path / "megatron"
    if resave is not None:
        tensor, pipeline, expert = resave
        ckpt = tmp_path / "resaved"
        run_distributed(jobs.resave_at, tensor * pipeline * expert, str(tmp_path / "megatron"), str(ckpt),
                        tensor, pipeline, expert)
    dtype = "bfloat16" if variant == "mixtral" else None  # one source through the cast
    run_distributed(jobs.in_model_export, 1, str(ckpt), str(tmp_path / "old"), 30_000, dtype)
    jobs.to_hf(str(ckpt), str(tmp_path / "new"), 30_000, dtype)
    assert_same_export(tmp_path / "new", tmp_path / "old")
    assert len(list((tmp_path / "new").glob("*.safetensors"))) > 1
    if dtype is None:  # and both give the HF source back (the source is fp32, as the checkpoint)
        original, new = read_dir(hf_dir), read_dir(tmp_path / "new")
        assert sorted(new) == sorted(original) and all(torch.equal(new[key], original[key]) for key in original)


def test_a_replace_killed_midway_does_not_block_the_next_export(tmp_path):
    """A kill between moving the old output aside and removing it leaves ``out.replaced``; the next
    ``--overwrite`` export clears it (a sibling name no input may have) instead of failing with
    "Directory not empty" on every rerun."""
    original = jobs.write_synthetic_checkpoint(tmp_path / "ckpt", "llama", torch.bfloat16)
    export.megatron_to_hf(tmp_path / "ckpt", tmp_path / "out")
    (tmp_path / "out.replaced").mkdir()
    (tmp_path / "out.replaced" / "leftover.safetensors").write_bytes(b"x")
    export.megatron_to_hf(tmp_path / "ckpt", tmp_path / "out", overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "out"]
    back = read_dir(tmp_path / "out")
    assert all(torch.equal(back[key], tensor) for key, tensor in original.items())
