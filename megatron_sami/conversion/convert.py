"""HF <-> Megatron conversion, run inside the project's runtime (one or several processes).

The output of ``hf_to_megatron`` (and the input of the export,
:func:`megatron_sami.conversion.export.megatron_to_hf`, which streams in one process) is a checkpoint
directory, whose format :mod:`megatron_sami.models.checkpoint_dir` owns. Conversion runs at
TP=1; pipeline and expert parallelism split the work (each process writes only its layers and
experts, reading only those HF tensors). The model is built on the meta
device; each checkpoint chunk is made from its rows of the HF files when the checkpoint writer
reaches it (copied file to file when the dtype is kept, read and cast otherwise), so a process
holds at most a chunk per writer thread, whatever the model's size. Outputs are staged in
``<out>.incomplete`` and renamed into place by rank 0 once every rank has finished.
"""

from __future__ import annotations

import math
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_sami import __version__
from megatron_sami.conversion.hf_io import (
    TOKENIZER_FILES,
    SafetensorsReader,
    model_config_from_hf,
    read_hf_config,
)
from megatron_sami.conversion.table import Rule, expand_rules, global_name, ignored_hf_keys
from megatron_sami.conversion.transforms import Rows, Shapes, megatron_shape, to_hf, to_rows
from megatron_sami.errors import ConversionError
from megatron_sami.models.build import Backend, build_gpt_model
from megatron_sami.models.checkpoint import FileBytes, is_rank0, save_weights_lazily, staged_output, unwrap
from megatron_sami.models.checkpoint_dir import (
    HF_DIR,
    WEIGHTS_DIR,
    cast_parameters,
    check_output_path,
    write_model_files,
)
from megatron_sami.models.config import ModelConfig, PrecisionConfig
from megatron_sami.models.gpt_ops import layer_and_expert_offsets, tensor_parallel_size
from megatron_sami.runtime.distributed import logger

DTYPE_NAMES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}
# conversion.json's params_dtype: the dtype the checkpoint's weights are stored in.
PARAMS_DTYPE_OF = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
HF_META_FILES = ("config.json", "generation_config.json", *TOKENIZER_FILES)
MAX_SHARD_BYTES = 5 * 1000**3
# Conversion builds the local (non-TE) layer spec on the meta device, on any machine: its
# checkpoint keys are those of the TE spec, and no GPU is needed to convert.
CONVERSION_BACKEND = Backend(use_te=False, on_gpu=False)


def shapes_of(model: ModelConfig) -> Shapes:
    """The sizes the transforms need (heads, query groups, head size, real and padded vocabulary)."""
    return Shapes(model.num_attention_heads, model.num_query_groups, model.kv_channels,
                  model.vocab_size, model.padded_vocab_size())


def check_coverage(rules: list[Rule], reader: SafetensorsReader, model: ModelConfig) -> None:
    """Every HF tensor consumed by exactly one rule; every rule's tensors present.

    Raises:
        ConversionError: a rule's tensor is missing, or an HF tensor is not mapped by any rule.
    """
    keys = set(reader.keys())
    wanted = [key for rule in rules for key in rule.hf]
    missing = [key for key in wanted if key not in keys]
    if missing:
        raise ConversionError(
            f"tensor {missing[0]} is missing from the checkpoint ({len(missing)} missing in all); "
            f"config.json says {model.num_layers} layers" + (f", {model.num_experts} experts" if model.is_moe else "")
            + ": the weights do not match the config.")
    extra = keys - set(wanted) - ignored_hf_keys(sorted(keys))
    if model.tie_word_embeddings:
        extra.discard("lm_head.weight")  # a tied head saved anyway is the embedding itself
    if extra:
        raise ConversionError(
            f"HF tensor {sorted(extra)[0]} is not mapped by conversion/llama_family.yaml ({len(extra)} unmapped); "
            "the checkpoint has more layers/experts than its config or an unsupported architecture variant.")


def local_rules(model_module: torch.nn.Module, model: ModelConfig) -> Iterator[tuple[str, torch.nn.Parameter, Rule]]:
    """(local name, parameter, rule) for each parameter of this rank's part of the model.

    Raises:
        ConversionError: a parameter has no rule in the key map.
    """
    by_name = {rule.megatron: rule for rule in expand_rules(model)}
    layer_offset, expert_offset = layer_and_expert_offsets(model)
    for local_name, param in unwrap(model_module).named_parameters():
        name = global_name(local_name, layer_offset, expert_offset)
        if name == "output_layer.weight" and model.tie_word_embeddings:
            name = "embedding.word_embeddings.weight"  # last stage's copy of the tied embedding
        if name not in by_name:
            raise ConversionError(f"Megatron parameter {name} has no rule in conversion/llama_family.yaml.")
        yield local_name, param, by_name[name]


def _require_tp1() -> None:
    if tensor_parallel_size() != 1:
        raise ConversionError("conversion runs at tensor parallel size 1 (the checkpoint then loads at any TP); "
                              "split the work with --pipeline / --expert instead.")


def _check_shapes(rule: Rule, reader: SafetensorsReader, shapes: Shapes, param: torch.nn.Parameter) -> None:
    """The rule's HF tensors make a tensor of the parameter's shape, and the inverse gives the
    HF shapes back (catches e.g. a vocab size that padding would otherwise hide). Only file
    headers are read; the inverse runs on a meta tensor."""
    source_shapes = [tuple(reader.shape(key)) for key in rule.hf]
    try:
        made_shape = megatron_shape(rule.transform, shapes, source_shapes)
        made_meta = torch.empty(made_shape, dtype=reader.tensor_dtype(rule.hf[0]), device="meta")
        round_trip = [tuple(t.shape) for t in to_hf(rule.transform, shapes, made_meta)]
    except (RuntimeError, ValueError):
        made_shape, round_trip = None, []
    if made_shape is None or made_shape != tuple(param.shape) or round_trip != source_shapes:
        found = ", ".join(f"{key} {reader.shape(key)}" for key in rule.hf)
        made = f"shape {list(made_shape)}" if made_shape is not None else "no tensor"
        raise ConversionError(f"{found} give {rule.megatron} {made}, but the model built "
                              f"from config.json needs {list(param.shape)}; the weights do not match the config.")


def _overlaps(layout: list[Rows], first: int, count: int) -> Iterator[tuple[Rows, int, int]]:
    """(piece, its first source row, number of rows) for rows ``first``..``first + count`` of a
    Megatron tensor with row layout ``layout``, in order."""
    row = 0  # the Megatron row where the current piece starts
    for piece in layout:
        low, high = max(row, first), min(row + piece.count, first + count)
        if low < high:
            yield piece, piece.start + low - row, high - low
        row += piece.count


def read_megatron_rows(reader: SafetensorsReader, rule: Rule, layout: list[Rows], first: int,
                       out: torch.Tensor) -> None:
    """Fill ``out`` with rows ``first``.. of the rule's Megatron tensor, read straight from the
    HF files (each piece of ``layout`` that overlaps is one positional read; padding is zeroed)."""
    position = 0
    for piece, source_row, rows in _overlaps(layout, first, out.shape[0]):
        target = out[position:position + rows]
        if piece.source is None:
            target.zero_()
        else:
            reader.read_rows(rule.hf[piece.source], source_row, rows, target)
        position += rows


def megatron_file_bytes(reader: SafetensorsReader, rule: Rule, layout: list[Rows], first: int,
                        shape: tuple[int, ...], dtype: torch.dtype) -> FileBytes:
    """Where the bytes of rows ``first``.. (``shape[0]`` of them) of the rule's Megatron tensor
    lie in the HF files, for a checkpoint writer to copy them file to file."""
    row_bytes = math.prod(shape[1:]) * dtype.itemsize
    pieces = tuple((None, 0, rows * row_bytes) if piece.source is None
                   else reader.locate_rows(rule.hf[piece.source], source_row, rows)
                   for piece, source_row, rows in _overlaps(layout, first, shape[0]))
    return FileBytes(shape, dtype, pieces)


class Progress:
    """Logs each tenth of a rank's bytes as they are made: GB, GB/s and ETA. Called from the
    checkpoint writer's threads."""

    def __init__(self, total_bytes: int, verb: str = "converting") -> None:
        self.total, self.done, self.next_report = total_bytes, 0, total_bytes / 10
        self.verb = verb
        self.start, self.lock = time.perf_counter(), threading.Lock()

    def record(self, nbytes: int) -> None:
        with self.lock:
            self.done += nbytes
            if self.done < self.next_report:
                return
            self.next_report += self.total / 10
            elapsed = time.perf_counter() - self.start
            rate = self.done / elapsed
            logger.info("%s: %3.0f%%, %.2f of %.2f GB, %.2f GB/s, ETA %.0f s", self.verb, 100 * self.done / self.total,
                        self.done / 1e9, self.total / 1e9, rate / 1e9, (self.total - self.done) / rate)


def check_hf_source(hf_dir: Path, out_dir: Path, overwrite: bool = False,
                    name: str | None = None) -> tuple[ModelConfig, SafetensorsReader]:
    """Everything about an HF source and an output path that can be checked from file headers,
    without a process group: the CLI runs it before starting one, so bad input fails in seconds.

    Returns:
        The model's config (named ``name``, default the directory's name) and an open reader.

    Raises:
        OutputOverlapError: ``out_dir`` is, contains or lies inside ``hf_dir``.
        StorageError: ``out_dir``'s parent directory is not writable (e.g. a read-only mount).
        ConversionError: ``out_dir`` is a file or exists (without ``overwrite``), or config.json
            or the safetensors files are unusable or do not match each other.
    """
    hf_dir, out_dir = Path(hf_dir), Path(out_dir)
    check_output_path(out_dir, overwrite, {"HF source": hf_dir})
    model = model_config_from_hf(read_hf_config(hf_dir), name or hf_dir.name)
    reader = SafetensorsReader(hf_dir)
    check_coverage(expand_rules(model), reader, model)
    reader.dtype()
    return model, reader


def hf_to_megatron(hf_dir: Path, out_dir: Path, parallel, overwrite: bool = False, name: str | None = None,
                   dtype: str | None = None) -> Path:
    """Convert an HF directory into a checkpoint directory (collective); returns ``out_dir``.

    ``parallel`` is the :class:`~megatron_sami.runtime.layout.ParallelConfig` the runtime runs
    (TP=1; pipeline and expert parallelism split the work). The checkpoint keeps the source's
    dtype (BF16, FP16 or FP32; its bytes are copied as they are), so converting back is bitwise;
    ``dtype`` ("bfloat16", "float16", "float32") casts instead.

    Raises:
        OutputOverlapError: ``out_dir`` is, contains or lies inside ``hf_dir``.
        ConversionError: ``out_dir`` is a file or exists (without ``overwrite``), the source is
            unusable or does not match its config, ``dtype`` is unknown, or TP > 1.
        LayoutError: the layout does not fit the model or the world size.
    """
    hf_dir, out_dir = Path(hf_dir), Path(out_dir)
    model, reader = check_hf_source(hf_dir, out_dir, overwrite, name)
    parallel.validate(model, dist.get_world_size(), training=False)
    source_dtype = reader.dtype()
    stored_dtype = dtype_named(dtype) if dtype else source_dtype
    megatron_model = _meta_model(model, parallel, stored_dtype)
    start = time.perf_counter()
    _require_tp1()
    shapes = shapes_of(model)
    parameters = list(local_rules(megatron_model, model))
    for _, param, rule in parameters:
        _check_shapes(rule, reader, shapes, param)
    rule_of = {name: rule for name, _, rule in parameters}
    layout_of = {name: to_rows(rule.transform, shapes, [reader.shape(key) for key in rule.hf])
                 for name, rule in rule_of.items()}
    param_of = {name: param for name, param, _ in parameters}
    progress = Progress(sum(param.numel() * param.element_size() for _, param, _ in parameters))

    def materialize(name: str, first: int, count: int) -> torch.Tensor | FileBytes:
        rule, shape = rule_of[name], (count, *param_of[name].shape[1:])
        progress.record(math.prod(shape) * stored_dtype.itemsize)
        if all(reader.tensor_dtype(key) == stored_dtype for key in rule.hf):  # bytes as they are: file to file
            return megatron_file_bytes(reader, rule, layout_of[name], first, shape, stored_dtype)
        out = torch.empty(shape, dtype=stored_dtype)
        read_megatron_rows(reader, rule, layout_of[name], first, out)
        return out

    with staged_output(out_dir) as staging:
        try:
            save_weights_lazily(megatron_model, staging / WEIGHTS_DIR, materialize)
        finally:
            reader.close()
        if is_rank0():
            _write_metadata(staging, hf_dir, model, {
                "source": str(hf_dir.resolve()), "source_dtype": str(source_dtype).removeprefix("torch."),
                "params_dtype": PARAMS_DTYPE_OF[stored_dtype], "converter": f"megatron-sami {__version__}",
                "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
            })
    logger.info("converted %s -> %s in %.1f s", hf_dir, out_dir, time.perf_counter() - start)
    return out_dir


def dtype_named(name: str) -> torch.dtype:
    """The torch dtype of a ``--dtype`` name; ConversionError naming the choices otherwise."""
    if name not in DTYPE_NAMES:
        raise ConversionError(f"dtype '{name}' is not supported; use one of {', '.join(DTYPE_NAMES)}.")
    return DTYPE_NAMES[name]


def _meta_model(model: ModelConfig, parallel, dtype: torch.dtype) -> torch.nn.Module:
    """This rank's part of the model on the meta device (structure only, no memory), its
    parameters in ``dtype``: each parameter's value is made from its HF tensors when the
    checkpoint writer reaches it. Training precision refuses fp16, so an fp16 checkpoint's
    model is built in bf16 and its parameters recast (the checkpoint holds only weights)."""
    precision = PrecisionConfig(params_dtype="fp32" if dtype == torch.float32 else "bf16")
    with torch.device("meta"):
        megatron_model = build_gpt_model(model, parallel, precision, seq_length=1, initialize_weights=False,
                                         backend=CONVERSION_BACKEND)
    cast_parameters(megatron_model, dtype)
    return megatron_model


def _write_metadata(staging: Path, hf_dir: Path, model: ModelConfig, conversion: dict) -> None:
    write_model_files(staging, model, conversion)
    (staging / HF_DIR).mkdir()
    for file_name in HF_META_FILES:
        if (hf_dir / file_name).is_file():
            shutil.copy2(hf_dir / file_name, staging / HF_DIR / file_name)
