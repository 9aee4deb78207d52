"""The checkpoint-directory format that conversion, training and export share (its one owner).

A checkpoint directory holds:

    model.yaml        the ModelConfig the model is rebuilt from
    conversion.json   source, dtypes, converter version (optional)
    hf/               the source config.json, generation_config.json and tokenizer files
    weights/          a Megatron-Core distributed checkpoint (loads at any TP/PP/EP/DP)

``sami-convert hf-to-megatron`` creates one, ``sami-train`` writes one per saved step (the
description copied from the checkpoint it started from, its own weights), and
``sami-convert megatron-to-hf`` exports any of them. Every directory is written through
:func:`~megatron_sami.models.checkpoint.staged_output`, so one with the final name is complete.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist
import yaml

from megatron_sami.errors import ConversionError, StorageError
from megatron_sami.io import atomic_write_json, atomic_write_text, check_output_apart
from megatron_sami.models.build import build_gpt_model
from megatron_sami.models.catalogue import model_config_from_dict
from megatron_sami.models.checkpoint import is_rank0, load_model, save_weights, staged_output
from megatron_sami.models.config import ModelConfig, PrecisionConfig

MODEL_FILE = "model.yaml"
RECORD_FILE = "conversion.json"
HF_DIR = "hf"
WEIGHTS_DIR = "weights"


# What a staged write (models.checkpoint.staged_output) creates or removes beside its output.
STAGING_SUFFIXES = (".incomplete", ".replaced")


def check_output_path(out_dir: Path, overwrite: bool, inputs: dict[str, Path] | None = None) -> None:
    """Refuse an output path that overlaps an input, is a file, or is an existing directory
    unless ``overwrite``.

    Args:
        inputs: what each input is called (``"HF source"``) -> its path; the output, and the
            staging paths beside it, must neither be, contain nor lie inside any of them (checked
            first: ``--overwrite`` would otherwise delete the input).

    Raises:
        OutputOverlapError: the output overlaps an input (:func:`megatron_sami.io.check_output_apart`).
        ConversionError: the path is a file, exists and ``overwrite`` is false, or exists and holds
            something other than an earlier output (a non-empty directory without model.yaml or
            config.json), which is never replaced.
    """
    out_dir = Path(out_dir)
    check_output_apart(out_dir, inputs or {}, STAGING_SUFFIXES)
    if out_dir.exists() and not out_dir.is_dir():
        raise ConversionError(f"output path {out_dir} is a file; choose a directory path.")
    if out_dir.exists() and not _replaceable(out_dir):
        # --overwrite replaces an earlier output, never a directory of something else.
        raise ConversionError(f"{out_dir} exists and holds neither a checkpoint (model.yaml) nor an HF model "
                              f"(config.json), so it is not replaced even with --overwrite; choose another path.")
    if out_dir.exists() and not overwrite:
        raise ConversionError(f"{out_dir} already exists; pass --overwrite to replace it or choose another path.")
    check_writable_parent(out_dir)


def _replaceable(out_dir: Path) -> bool:
    """An empty directory, or what a conversion writes (a checkpoint or an HF model directory)."""
    return not any(out_dir.iterdir()) or (out_dir / "model.yaml").is_file() or (out_dir / "config.json").is_file()


def check_writable_parent(out_dir: Path) -> None:
    """Refuse an output whose nearest existing parent directory cannot be written (a read-only
    file system or missing permission), before anything starts. ``os.access`` reports a
    read-only mount even to root.

    Raises:
        StorageError: the directory the output would be created in is not writable.
    """
    parent = Path(out_dir).absolute().parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not os.access(parent, os.W_OK | os.X_OK):
        read_only = bool(os.statvfs(parent).f_flag & os.ST_RDONLY)
        why = "is on a read-only file system" if read_only else "is not writable by this user"
        raise StorageError(f"cannot write {out_dir}: {parent} {why}; choose an output path on a writable file "
                           "system.")


def write_model_files(directory: Path, model: ModelConfig, record: dict) -> None:
    """Write ``model.yaml`` (the config) and ``conversion.json`` (``record``) into ``directory``."""
    atomic_write_text(directory / MODEL_FILE, yaml.safe_dump(asdict(model), sort_keys=False))
    atomic_write_json(directory / RECORD_FILE, record)


def read_checkpoint_model(ckpt_dir: Path) -> tuple[ModelConfig, dict]:
    """The ModelConfig and conversion record (``{}`` when absent) of a converted or trained
    checkpoint directory; reads only its small files.

    Raises:
        ConversionError: ``ckpt_dir`` lacks model.yaml, weights/ or hf/ (not a checkpoint
            directory, or an interrupted write left only ``<dir>.incomplete``), or model.yaml or
            conversion.json is not valid YAML/JSON or not a mapping.
        ConfigError: model.yaml does not describe a valid model.
    """
    ckpt_dir = Path(ckpt_dir)
    if not (ckpt_dir / MODEL_FILE).is_file() or not (ckpt_dir / WEIGHTS_DIR).is_dir():
        hint = " (an interrupted run left only .incomplete)" if ckpt_dir.with_name(ckpt_dir.name + ".incomplete").exists() else ""
        raise ConversionError(f"{ckpt_dir} is not a converted checkpoint (needs model.yaml and weights/){hint}; "
                              "run sami-convert hf-to-megatron first.")
    if not (ckpt_dir / HF_DIR).is_dir():
        # Training copies hf/ into every checkpoint it writes, and exports read the tokenizer there.
        raise ConversionError(f"{ckpt_dir} lacks hf/ (the source model's config and tokenizer files); convert it "
                              "again with sami-convert hf-to-megatron, or copy the HF directory's *.json and "
                              "tokenizer files into it.")
    values = _read_small_file(ckpt_dir / MODEL_FILE, yaml.safe_load, "YAML")
    if not isinstance(values, dict):
        raise ConversionError(f"{ckpt_dir / MODEL_FILE} holds a YAML {type(values).__name__}, not the model's "
                              "settings; restore it or convert the model again.")
    model = model_config_from_dict(values)
    record_path = ckpt_dir / RECORD_FILE
    conversion = _read_small_file(record_path, json.loads, "JSON") if record_path.is_file() else {}
    if not isinstance(conversion, dict):
        raise ConversionError(f"{record_path} is not a JSON object; restore it or delete it (it is optional).")
    return model, conversion


def _read_small_file(path: Path, parse, kind: str):
    """A checkpoint directory's small file, parsed; its failures as one sentence naming it.

    Raises:
        ConversionError: the file is not UTF-8 text or not valid ``kind``.
    """
    try:
        return parse(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, yaml.YAMLError, json.JSONDecodeError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConversionError(f"{path} is not valid {kind} ({first}); restore it from the checkpoint's source "
                              "or convert the model again.") from err


def cast_parameters(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Give every floating-point parameter of ``model`` (any device, meta included) ``dtype``."""
    for param in model.parameters():
        if param.is_floating_point() and param.dtype != dtype:
            param.data = param.data.to(dtype)


def load_checkpoint_model(ckpt_dir: Path, parallel, params_dtype: str | None = None, seq_length: int = 1,
                          recompute_activations: str | bool = "none",
                          precision: PrecisionConfig | None = None) -> tuple[ModelConfig, torch.nn.Module]:
    """Build the model of a checkpoint directory at a layout and load its weights (collective).

    Args:
        ckpt_dir: a checkpoint directory (see the module docstring).
        parallel: the :class:`~megatron_sami.runtime.layout.ParallelConfig` the runtime was
            started with; the weights load at any layout.
        params_dtype: "bf16", "fp32" or "fp16" (fp16: for reading weights, e.g. an export; not for
            training); default: the dtype the checkpoint was converted to.
        seq_length: the longest sequence (tokens) the model will run on.
        recompute_activations: none, selective or full (models/config.py RECOMPUTE_MODES).
        precision: the whole precision config (FP8, its recipe), which then sets the dtype
            instead of ``params_dtype`` (training passes its ``precision``).

    Returns:
        The ModelConfig and this rank's part of the ``GPTModel``, weights loaded.

    Raises:
        ConversionError: ``ckpt_dir`` is not a checkpoint directory.
        CheckpointError: its weights do not fit the model.
        LayoutError: the layout does not fit the model or the world size.
        ConfigError: the model cannot be built (e.g. ``seq_length`` beyond its positions).
    """
    model, conversion = read_checkpoint_model(ckpt_dir)
    parallel.validate(model, dist.get_world_size(), training=False)
    dtype = params_dtype or conversion.get("params_dtype", "bf16")
    # Training precision refuses fp16 (no loss scaling here): an fp16 model, for reading an fp16
    # checkpoint's weights bit for bit, is built in bf16 and its parameters recast.
    build_dtype = "bf16" if dtype == "fp16" else dtype
    precision = precision or PrecisionConfig(params_dtype=build_dtype)
    megatron_model = build_gpt_model(model, parallel, precision, seq_length=seq_length,
                                     recompute_activations=recompute_activations, initialize_weights=False)
    if dtype == "fp16":
        cast_parameters(megatron_model, torch.float16)
    load_model(megatron_model, Path(ckpt_dir) / WEIGHTS_DIR)
    return model, megatron_model


def write_checkpoint_description(source_ckpt_dir: Path, target: Path) -> None:
    """Copy what describes the model (model.yaml, conversion.json, hf/) to a new checkpoint dir
    (one process; usually rank 0 into a staging directory)."""
    for name in (MODEL_FILE, RECORD_FILE):
        if (source_ckpt_dir / name).is_file():
            shutil.copy2(source_ckpt_dir / name, target / name)
    shutil.copytree(source_ckpt_dir / HF_DIR, target / HF_DIR)


def save_checkpoint_dir(megatron_model: torch.nn.Module, source_ckpt_dir: Path, out_dir: Path,
                        overwrite: bool = False) -> Path:
    """Save a (trained) model as a checkpoint directory that exports like a converted one.

    The model description (model.yaml, conversion.json, hf/) comes from the checkpoint the
    model was loaded from; the weights are this model's, at whatever layout it runs (collective).
    Returns ``out_dir``.

    Raises:
        ConversionError: ``source_ckpt_dir`` is not a checkpoint directory, or ``out_dir``
            exists and ``overwrite`` is false.
    """
    source_ckpt_dir, out_dir = Path(source_ckpt_dir), Path(out_dir)
    read_checkpoint_model(source_ckpt_dir)
    check_output_path(out_dir, overwrite, {"source checkpoint": source_ckpt_dir})
    with staged_output(out_dir) as staging:
        if is_rank0():
            write_checkpoint_description(source_ckpt_dir, staging)
        save_weights(megatron_model, staging / WEIGHTS_DIR)
    return out_dir
