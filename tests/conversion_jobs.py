"""Tiny random HF models of each family, and rank bodies that convert / export / score them."""

from __future__ import annotations

from pathlib import Path

import torch

from megatron_sami.conversion import convert, export
from megatron_sami.conversion.transforms import to_hf as to_hf_tensors
from megatron_sami.conversion.verify import megatron_logits
from megatron_sami.models import checkpoint_dir
from megatron_sami.runtime.distributed import megatron_runtime
from megatron_sami.runtime.layout import ParallelConfig
from megatron_sami.testing.tiny import COMMON, VARIANTS  # noqa: F401 - the tests parametrize over them
from megatron_sami.testing.tiny import make_tiny_hf_model as make_hf_model  # noqa: F401


def hf_logits(hf_dir: Path, tokens_BT: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(tokens_BT).logits


def to_megatron(hf_dir: str, out_dir: str, pipeline: int = 1, expert: int = 1, dtype: str | None = None) -> None:
    parallel = ParallelConfig(pipeline=pipeline, expert=expert)
    with megatron_runtime(parallel):
        convert.hf_to_megatron(Path(hf_dir), Path(out_dir), parallel, dtype=dtype)


def to_hf(ckpt_dir: str, out_dir: str, max_shard_bytes: int = 10**9, dtype: str | None = None) -> None:
    """The export (streaming, in this process: it needs no process group)."""
    export.megatron_to_hf(Path(ckpt_dir), Path(out_dir), max_shard_bytes=max_shard_bytes, dtype=dtype)


def in_model_export(ckpt_dir: str, out_dir: str, max_shard_bytes: int = 10**9, dtype: str | None = None) -> None:
    """The export as it was before it streamed (issue 14), kept as the reference the streaming
    export must equal: build the model at TP=1 in one process, load the checkpoint into it, and
    write each parameter's HF tensors, cast to the output dtype, with ``write_sharded``."""
    import torch.distributed as dist

    from megatron_sami.conversion.hf_io import write_index, write_sharded
    from megatron_sami.models.checkpoint import staged_output

    ckpt, out, parallel = Path(ckpt_dir), Path(out_dir), ParallelConfig()
    with megatron_runtime(parallel):
        _, conversion = checkpoint_dir.read_checkpoint_model(ckpt)
        out_dtype_name = dtype or conversion.get("source_dtype", "bfloat16")
        out_dtype = convert.dtype_named(out_dtype_name)
        stored = conversion.get("params_dtype", "bf16")
        load_dtype = stored if convert.PARAMS_DTYPE_OF.get(out_dtype) == stored else "fp32"
        model, megatron_model = checkpoint_dir.load_checkpoint_model(ckpt, parallel, load_dtype)
        tensors: dict[str, torch.Tensor] = {}
        for local_name, param, rule in convert.local_rules(megatron_model, model):
            if model.tie_word_embeddings and local_name == "output_layer.weight":
                continue
            for key, tensor in zip(rule.hf, to_hf_tensors(rule.transform, convert.shapes_of(model), param.detach()),
                                   strict=True):
                tensors[key] = tensor.to(out_dtype).clone()
        with staged_output(out) as staging:
            weight_map = write_sharded(tensors, staging, f"model-rank{dist.get_rank():04d}", max_shard_bytes)
            write_index(staging, weight_map, sum(t.numel() * t.element_size() for t in tensors.values()))
            export.write_hf_meta(staging, ckpt / checkpoint_dir.HF_DIR, out_dtype_name, conversion.get("source_dtype"))


def logits_at(ckpt_dir: str, tokens_BT: torch.Tensor, tensor: int, pipeline: int, expert: int) -> torch.Tensor:
    parallel = ParallelConfig(tensor=tensor, pipeline=pipeline, expert=expert)
    with megatron_runtime(parallel):
        model, megatron_model = checkpoint_dir.load_checkpoint_model(Path(ckpt_dir), parallel, "fp32", tokens_BT.shape[1])
        return megatron_logits(megatron_model, tokens_BT, model.vocab_size)


def resave_at(ckpt_dir: str, out_dir: str, tensor: int, pipeline: int, expert: int = 1,
              params_dtype: str = "fp32") -> None:
    """Load a checkpoint at a layout and save it again from there (as training does)."""
    parallel = ParallelConfig(tensor=tensor, pipeline=pipeline, expert=expert)
    with megatron_runtime(parallel):
        _, megatron_model = checkpoint_dir.load_checkpoint_model(Path(ckpt_dir), parallel, params_dtype)
        checkpoint_dir.save_checkpoint_dir(megatron_model, Path(ckpt_dir), Path(out_dir))


def expect_conversion_error(kind: str, source: str, out_dir: str) -> str:
    """Run a conversion that must fail; return the error message (or raise if it did not fail)."""
    from megatron_sami.errors import SamiError

    parallel = ParallelConfig()
    with megatron_runtime(parallel):
        try:
            if kind == "hf-to-megatron":
                convert.hf_to_megatron(Path(source), Path(out_dir), parallel)
            else:
                export.megatron_to_hf(Path(source), Path(out_dir))
        except SamiError as err:
            return str(err)
    raise AssertionError(f"{kind} {source} -> {out_dir} did not fail")


def lazy_and_eager_saves(hf_dir: str, out_dir: str, pipeline: int = 1) -> dict:
    """Save one randomly initialised model twice: with megatron-core's own writer, and lazily from
    a meta-device twin whose parameters are produced on demand. Report what differs."""
    import gc
    import weakref

    from torch.distributed.checkpoint import FileSystemReader

    from megatron_sami.conversion.hf_io import model_config_from_hf, read_hf_config
    from megatron_sami.models.build import build_gpt_model
    from megatron_sami.models.checkpoint import load_model, save_weights, save_weights_lazily, unwrap
    from megatron_sami.models.config import PrecisionConfig

    parallel = ParallelConfig(pipeline=pipeline)
    out = Path(out_dir)
    with megatron_runtime(parallel):
        model = model_config_from_hf(read_hf_config(Path(hf_dir)), "tiny")
        precision = PrecisionConfig(params_dtype="fp32")
        real = build_gpt_model(model, parallel, precision, seq_length=1)
        with torch.device("meta"):
            meta = build_gpt_model(model, parallel, precision, seq_length=1, initialize_weights=False,
                                   backend=convert.CONVERSION_BACKEND)
        values = dict(unwrap(real).named_parameters())
        live: set[int] = set()
        most_alive, calls = 0, []

        class Memory(bytearray):
            """A chunk's memory: freed (and its finalizer run) only when no tensor uses it."""

        def materialize(name: str, first: int, count: int) -> torch.Tensor:
            nonlocal most_alive
            gc.collect()
            rows = values[name].detach()[first:first + count]
            memory = Memory(rows.numel() * rows.element_size())
            chunk = torch.frombuffer(memory, dtype=rows.dtype).view(rows.shape) if len(memory) else rows.clone()
            chunk.copy_(rows)
            live.add(id(memory))
            weakref.finalize(memory, live.discard, id(memory))
            most_alive = max(most_alive, len(live))
            calls.append((name, first, count))
            return chunk

        if torch.distributed.get_rank() == 0:
            out.mkdir(parents=True, exist_ok=True)
        torch.distributed.barrier()
        save_weights(real, out / "eager")
        save_weights_lazily(meta, out / "lazy", materialize)
        reloaded = build_gpt_model(model, parallel, precision, seq_length=1, initialize_weights=False)
        load_model(reloaded, out / "lazy")
        differing = [name for name, param in unwrap(reloaded).named_parameters()
                     if not torch.equal(param, values[name])]

        def layout(directory: Path) -> dict:
            metadata = FileSystemReader(str(directory)).read_metadata().state_dict_metadata
            return {key: (tuple(getattr(entry, "size", ())),
                          sorted((tuple(c.offsets), tuple(c.sizes)) for c in getattr(entry, "chunks", [])))
                    for key, entry in metadata.items()}

        return {"differing": differing, "most_alive": most_alive, "calls": calls,
                "rows": {name: value.shape[0] if value.dim() else 1 for name, value in values.items()},
                "num_params": len(values), "same_layout": layout(out / "eager") == layout(out / "lazy"),
                "keys": sorted(layout(out / "lazy"))}


def conversion_with_a_read_error_in_a_writer_thread(hf_dir: str, out_dir: str) -> dict:
    """Convert while every read or copy from a source file made by a writer thread other than
    the main one fails with EIO."""
    import errno
    import os
    import threading

    from megatron_sami.conversion.hf_io import SafetensorsReader
    from megatron_sami.errors import SamiError

    read_rows, copy_file_range = SafetensorsReader.read_rows, os.copy_file_range

    def in_a_writer_thread() -> bool:
        return threading.current_thread() is not threading.main_thread()

    def failing_read(self, key, *args):
        if in_a_writer_thread():
            with self._guard(self.file_of[key]):
                raise OSError(errno.EIO, "Input/output error")
        return read_rows(self, key, *args)

    def failing_copy(*args):
        if in_a_writer_thread():
            raise OSError(errno.EIO, "Input/output error")
        return copy_file_range(*args)

    SafetensorsReader.read_rows, os.copy_file_range = failing_read, failing_copy
    parallel = ParallelConfig()
    try:
        with megatron_runtime(parallel):
            convert.hf_to_megatron(Path(hf_dir), Path(out_dir), parallel)
    except (SamiError, BaseException) as err:  # DCP wraps a rank's failure in a BaseException
        return {"error": f"{type(err).__name__}: {err}"}
    finally:
        SafetensorsReader.read_rows, os.copy_file_range = read_rows, copy_file_range
    return {"error": None}


def save_in_two_shards(tensors: dict, directory: Path) -> dict[str, str]:
    """Save ``tensors`` into ``directory`` as two safetensors shards (as large checkpoints are);
    returns the weight map an index would hold."""
    from safetensors.torch import save_file

    keys = sorted(tensors)
    weight_map = {}
    for number, part in enumerate((keys[: len(keys) // 2], keys[len(keys) // 2:]), start=1):
        name = f"model-0000{number}-of-00002.safetensors"
        save_file({key: tensors[key] for key in part}, str(directory / name))
        weight_map.update({key: name for key in part})
    return weight_map


ARCHITECTURES = {"LlamaConfig": "LlamaForCausalLM", "MistralConfig": "MistralForCausalLM",
                 "MixtralConfig": "MixtralForCausalLM"}


def hf_config_of(variant: str, num_layers: int = 2) -> dict:
    """The config.json of a tiny variant, as a dict (no transformers needed)."""
    config_class, extra = VARIANTS[variant]
    return {"architectures": [ARCHITECTURES[config_class]], **COMMON, "num_hidden_layers": num_layers, **extra}


def write_synthetic_checkpoint(directory: Path, variant: str, dtype: torch.dtype = torch.float32, seed: int = 0,
                               drop: tuple[str, ...] = (), extra: dict | None = None) -> dict[str, torch.Tensor]:
    """A checkpoint directory (model.yaml, conversion.json, hf/, weights/) written in this process
    without megatron-core: random HF tensors of a tiny variant, made into TP=1 Megatron tensors by
    the key map and stacked per layer (and expert) under the names megatron-core saves, then saved
    with torch DCP as one chunk each (without the keys ``drop``, with the tensors ``extra``).
    Returns the HF tensors the export must give back."""
    import json

    from torch.distributed.checkpoint import FileSystemWriter
    from torch.distributed.checkpoint import save as dcp_save

    from megatron_sami.conversion.hf_io import model_config_from_hf
    from megatron_sami.conversion.table import expand_rules
    from megatron_sami.conversion.transforms import to_megatron

    hf_config = hf_config_of(variant)
    model = model_config_from_hf(hf_config, variant)
    generator = torch.Generator().manual_seed(seed)
    hf_tensors, stacked = {}, {}
    for rule in expand_rules(model):
        sources = [torch.randn(export.hf_shape(key, model), generator=generator).to(dtype) for key in rule.hf]
        hf_tensors.update(zip(rule.hf, sources, strict=True))
        tensor = to_megatron(rule.transform, convert.shapes_of(model), *sources)
        stripped, index = export.split_name(rule.megatron)
        names = export.CHECKPOINT_NAMES.get(stripped, (stripped,))
        key = names[-1] if model.is_moe and "pre_mlp" in stripped else names[0]  # as megatron-core names them
        if not index:
            stacked[key] = tensor
            continue
        leading = (model.num_layers, model.num_experts)[:len(index)]
        stacked.setdefault(key, torch.zeros(*leading, *tensor.shape, dtype=dtype))[index] = tensor
    stacked = {key: tensor for key, tensor in stacked.items() if key not in drop} | (extra or {})
    directory.mkdir(parents=True)
    (directory / "hf").mkdir()
    (directory / "hf" / "config.json").write_text(json.dumps(hf_config))
    checkpoint_dir.write_model_files(directory, model, {"source_dtype": str(dtype).removeprefix("torch.")})
    dcp_save(stacked, storage_writer=FileSystemWriter(str(directory / "weights")), no_dist=True)
    (directory / "weights" / "metadata.json").write_text(json.dumps({"sharded_backend": "torch_dist"}))
    return hf_tensors
