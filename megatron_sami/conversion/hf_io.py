"""Hugging Face model directories: config -> ModelConfig, lazy safetensors reading, sharded writing.

Only safetensors are read or written (no pickle). Tensors are read one at a time, on demand,
so a process holds only what it converts.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import struct
import threading
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from megatron_sami.errors import ConfigError, ConversionError
from megatron_sami.io import atomic_write_json, storage_error
from megatron_sami.models.catalogue import model_config_from_dict
from megatron_sami.models.checkpoint import read_exactly
from megatron_sami.models.config import ModelConfig

FAMILY_OF_ARCHITECTURE = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "MixtralForCausalLM": "mixtral",
}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja")
INDEX_NAME = "model.safetensors.index.json"
_SAFETENSORS_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}
SINGLE_NAME = "model.safetensors"


def read_hf_config(hf_dir: Path) -> dict:
    """``hf_dir/config.json`` as a dict.

    Raises:
        ConversionError: the file is missing, not UTF-8 JSON, or not a JSON object.
    """
    path = hf_dir / "config.json"
    if not path.is_file():
        raise ConversionError(f"{hf_dir} has no config.json; point at a Hugging Face model directory.")
    try:
        config = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as err:
        raise ConversionError(f"{path} is not UTF-8 text (byte {err.start}); restore the file.") from err
    except json.JSONDecodeError as err:
        raise ConversionError(f"{path} is not valid JSON ({err.msg} at line {err.lineno}); restore the file.") from err
    if not isinstance(config, dict):
        raise ConversionError(f"{path} holds a JSON {type(config).__name__}, not an object of settings; "
                              "restore the model's config.json.")
    return config


# The config.json fields the converter reads: (accepted types, required, smallest value). The types
# are those transformers' own strict config classes accept (an int is also taken where a float is
# expected: it is exact); a bool is never taken for an int, nor a string for anything else.
_INT, _FLOAT, _BOOL, _STR = (int,), (float, int), (bool,), (str,)
HF_FIELDS: dict[str, tuple[tuple[type, ...], bool, float | None]] = {
    "num_hidden_layers": (_INT, True, 1),
    "hidden_size": (_INT, True, 1),
    "intermediate_size": (_INT, True, 1),
    "num_attention_heads": (_INT, True, 1),
    "vocab_size": (_INT, True, 1),
    "max_position_embeddings": (_INT, True, 1),
    "num_key_value_heads": (_INT + (type(None),), False, 1),
    "head_dim": (_INT + (type(None),), False, 1),
    "rms_norm_eps": (_FLOAT, False, 0),
    "rope_theta": (_FLOAT, False, 0),
    "tie_word_embeddings": (_BOOL, False, None),
    "attention_bias": (_BOOL, False, None),
    "mlp_bias": (_BOOL, False, None),
    "hidden_act": (_STR, False, None),
    "sliding_window": (_INT + (type(None),), False, 1),
    "use_sliding_window": (_BOOL, False, None),
    "num_local_experts": (_INT, False, 2),
    "num_experts_per_tok": (_INT, False, 1),
    "architectures": ((list,), False, None),
    "rope_scaling": ((dict, type(None)), False, None),
    "rope_parameters": ((dict, type(None)), False, None),
}


def _check_field(name: str, value, types: tuple[type, ...], minimum: float | None) -> None:
    is_bool = isinstance(value, bool)
    if not isinstance(value, types) or (is_bool and bool not in types):
        wanted = " or ".join("null" if t is type(None) else t.__name__ for t in types)
        raise ConversionError(f"config.json's {name} is {json.dumps(value)} ({type(value).__name__}), but "
                              f"transformers expects {wanted}; correct config.json.")
    if minimum is None or is_bool or not isinstance(value, (int, float)):
        return
    if not (value > 0 if minimum == 0 else value >= minimum):  # NaN fails both
        bound = "positive" if minimum == 0 else f">= {minimum}"
        raise ConversionError(f"config.json's {name} is {value}; it must be {bound}: correct config.json.")


def check_hf_fields(hf: dict, moe: bool) -> None:
    """Presence, type and range of every config.json field the converter reads (:data:`HF_FIELDS`).

    Raises:
        ConversionError: a required field is missing (``num_local_experts``: for Mixtral), or a
            field has a type transformers refuses or a value out of range; the message names it.
    """
    for name, (types, required, minimum) in HF_FIELDS.items():
        if name not in hf:
            if required or (moe and name == "num_local_experts"):
                raise ConversionError(f"config.json lacks {name}; it is not a complete Hugging Face model config "
                                      "(restore it from the model's source).")
            continue
        _check_field(name, hf[name], types, minimum)


def _rope(hf: dict) -> tuple[float, dict]:
    """(theta, scaling) from either transformers-5 ``rope_parameters`` or older top-level keys."""
    parameters = hf.get("rope_parameters") or {}
    theta = parameters.get("rope_theta", hf.get("rope_theta", 10000.0))
    _check_field("rope_parameters.rope_theta", theta, _FLOAT, 0)
    scaling = dict(hf.get("rope_scaling") or {})
    if parameters.get("rope_type", "default") != "default":
        scaling = dict(parameters)
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return theta, {"type": "none"}
    for key in ("factor", "low_freq_factor", "high_freq_factor"):
        if key in scaling:
            _check_field(f"rope scaling's {key}", scaling[key], _FLOAT, 0)
    if "original_max_position_embeddings" in scaling:
        _check_field("rope scaling's original_max_position_embeddings", scaling["original_max_position_embeddings"],
                     _INT, 1)
    if kind in ("llama3", "linear") and "factor" not in scaling:
        raise ConversionError(f"config.json's {kind} rope scaling lacks its factor; correct config.json.")
    if kind == "llama3":
        return theta, {"type": "llama3", **{key: scaling[key] for key in (
            "factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings") if key in scaling}}
    if kind == "linear":
        return theta, {"type": "linear", "factor": scaling["factor"]}
    raise ConversionError(f"rope scaling type '{kind}' is not supported (supported: llama3, linear, none).")


def model_config_from_hf(hf: dict, name: str) -> ModelConfig:
    """The project's ModelConfig for an HF config.json, refusing what cannot be represented.

    Args:
        hf: the parsed ``config.json`` (:func:`read_hf_config`).
        name: the model's name in the new config.

    Raises:
        ConversionError: an unsupported architecture, activation, bias or rope scaling, or values
            that do not make a valid ModelConfig.
    """
    architectures = hf.get("architectures") or []
    _check_field("architectures", architectures, (list,), None)
    architecture = architectures[0] if architectures else None
    if not isinstance(architecture, str) or architecture not in FAMILY_OF_ARCHITECTURE:
        raise ConversionError(
            f"architecture {architecture!r} is not supported; supported: {', '.join(FAMILY_OF_ARCHITECTURE)}."
        )
    is_moe = architecture == "MixtralForCausalLM"
    check_hf_fields(hf, is_moe)
    if hf.get("hidden_act", "silu") != "silu":
        raise ConversionError(f"hidden_act '{hf['hidden_act']}' is not supported; only silu (SwiGLU) is.")
    if hf.get("attention_bias", False) or hf.get("mlp_bias", False):
        raise ConversionError("attention or MLP biases are not supported by this converter.")
    theta, scaling = _rope(hf)
    heads = hf["num_attention_heads"]
    head_dim = hf.get("head_dim")
    kv_heads = hf.get("num_key_value_heads")
    values = {
        "name": name,
        "family": FAMILY_OF_ARCHITECTURE[architecture],
        "hf_architecture": architecture,
        "num_layers": hf["num_hidden_layers"],
        "hidden_size": hf["hidden_size"],
        "ffn_hidden_size": hf["intermediate_size"],
        "num_attention_heads": heads,
        "num_query_groups": heads if kv_heads is None else kv_heads,
        "head_dim": head_dim if head_dim is not None and head_dim != hf["hidden_size"] // heads else None,
        "vocab_size": hf["vocab_size"],
        "max_position_embeddings": hf["max_position_embeddings"],
        "norm_epsilon": hf.get("rms_norm_eps", 1e-5),
        "rotary_base": float(theta),
        "rope_scaling": scaling,
        "tie_word_embeddings": hf.get("tie_word_embeddings", False),
        "sliding_window": hf.get("sliding_window") if hf.get("use_sliding_window", True) else None,
        "num_experts": hf["num_local_experts"] if is_moe else None,
        "moe_router_topk": hf.get("num_experts_per_tok", 2),
    }
    try:
        return model_config_from_dict(values)
    except ConfigError as err:
        raise ConversionError(f"config.json cannot be converted: {err}") from err


class SafetensorsReader:
    """Lazy access to the tensors of an HF directory (single file or sharded with an index).

    Every failure to read a file is a :class:`~megatron_sami.errors.ConversionError` naming it.
    """

    def __init__(self, hf_dir: Path) -> None:
        """Read the index (or the single file's keys) and check every file's header.

        Raises:
            ConversionError: no safetensors weights (pickle only, or nothing), a broken index, a
                missing shard, or a truncated or corrupt file.
        """
        self.hf_dir = hf_dir
        self.file_of = self._weight_map()
        self._headers: dict[str, tuple[int, dict]] = {}
        self._descriptors: dict[str, int] = {}
        self._lock = threading.Lock()
        for file_name in sorted(set(self.file_of.values())):
            self._validate(file_name)
        self._check_index_against_headers()

    def _weight_map(self) -> dict[str, str]:
        index = self.hf_dir / INDEX_NAME
        if index.is_file():
            try:
                weight_map = json.loads(index.read_bytes().decode("utf-8"))["weight_map"]
            except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as err:
                raise ConversionError(f"{index} is not a valid safetensors index (JSON with a weight_map); "
                                      "restore it.") from err
            if not isinstance(weight_map, dict) or not all(
                    isinstance(key, str) and isinstance(file, str) and Path(file).name == file and file
                    for key, file in weight_map.items()):
                raise ConversionError(f"{index}'s weight_map must map each tensor name to a file name in "
                                      f"{self.hf_dir}, got a {type(weight_map).__name__}; restore the index.")
            missing = sorted({f for f in weight_map.values() if not (self.hf_dir / f).is_file()})
            if missing:
                raise ConversionError(f"{index} names {', '.join(missing)}, which is missing from {self.hf_dir}; "
                                      "download or copy the complete checkpoint.")
            return dict(weight_map)
        single = self.hf_dir / SINGLE_NAME
        if single.is_file():
            with self._guard(SINGLE_NAME):
                with safe_open(single, framework="pt") as handle:
                    return {key: SINGLE_NAME for key in handle.keys()}  # noqa: SIM118 - not a dict
        if any(self.hf_dir.glob("*.bin")) or any(self.hf_dir.glob("*.pt")):
            raise ConversionError(f"{self.hf_dir} holds only pickle weights (.bin/.pt), which are not loaded "
                                  "for safety; re-save the model with safetensors (save_pretrained).")
        raise ConversionError(f"{self.hf_dir} has no {SINGLE_NAME} or {INDEX_NAME}; point at a complete HF model.")

    @contextlib.contextmanager
    def _guard(self, file_name: str):
        """Turn any failure reading ``file_name`` into one sentence naming the file."""
        try:
            yield
        except ConversionError:
            raise
        except Exception as err:  # noqa: BLE001 - safetensors raises several types for bad files
            raise ConversionError(
                f"{self.hf_dir / file_name} cannot be read ({type(err).__name__}: {err}); "
                "the file is truncated or corrupt: download it again.") from err

    def _validate(self, file_name: str) -> None:
        """safetensors' own checks of a file (header, sizes); tensors are read with plain reads."""
        with self._guard(file_name), safe_open(self.hf_dir / file_name, framework="pt"):
            pass

    def _check_index_against_headers(self) -> None:
        """Every tensor lies in the file the index names for it (the headers are read, not the data).

        Raises:
            ConversionError: a tensor is not in its file's header; names it, the file the index
                gives, and the file that holds it (if any).
        """
        for key, file_name in sorted(self.file_of.items()):
            if key in self._header(file_name)[1]:
                continue
            holder = next((other for other in sorted(set(self.file_of.values()))
                           if key in self._header(other)[1]), None)
            found = f"it is in {holder}" if holder else "no file of the index holds it"
            raise ConversionError(f"{self.hf_dir / INDEX_NAME} says tensor {key} is in {file_name}, but that file "
                                  f"does not hold it ({found}); restore the index or download the checkpoint again.")

    def keys(self) -> list[str]:
        """Every tensor name, sorted."""
        return sorted(self.file_of)

    def shape(self, key: str) -> list[int]:
        """``key``'s shape from its file header (nothing is read); ConversionError if ``key`` is missing."""
        return list(self._checked_entry(key)[1]["shape"])

    def get(self, key: str) -> torch.Tensor:
        """The tensor ``key``, read into fresh memory (no mapping of the file stays resident)."""
        tensor = torch.empty(self.shape(key), dtype=self.tensor_dtype(key))
        self.read_rows(key, 0, tensor.shape[0] if tensor.dim() else 1, tensor)
        return tensor

    def locate_rows(self, key: str, start: int, count: int) -> tuple[int, int, int]:
        """(open file descriptor, byte offset, byte count) of rows ``start``..``start + count`` of
        ``key`` (a row: everything below the first dimension), checked against the header.

        Raises:
            ConversionError: ``key`` is missing or its dtype unsupported.
            ValueError: the rows are out of range, or the header's byte count does not fit the shape.
        """
        data_start, entry = self._checked_entry(key)
        row_bytes = math.prod(entry["shape"][1:]) * self.tensor_dtype(key).itemsize
        num_rows = (entry["shape"] or [1])[0]
        if start < 0 or count < 0 or start + count > num_rows:
            raise ValueError(f"rows {start}..{start + count} of {key} {entry['shape']}")
        begin, end = entry["data_offsets"]
        file_name = self.file_of[key]
        with self._guard(file_name):
            if end - begin != num_rows * row_bytes:
                raise ValueError(f"{key} has {end - begin} bytes for shape {entry['shape']}")
            return self._descriptor(file_name), data_start + begin + start * row_bytes, count * row_bytes

    def read_rows(self, key: str, start: int, count: int, out: torch.Tensor) -> None:
        """Read rows ``start``..``start + count`` of ``key`` straight into ``out``, a contiguous
        tensor of that many elements, converting the dtype if ``out``'s differs. Positional reads:
        safe from several threads at once.

        Raises:
            ConversionError: as :meth:`locate_rows`, or the file is shorter than its header says.
            ValueError: ``out`` is not contiguous or has another number of elements, or as
                :meth:`locate_rows`.
        """
        if not out.is_contiguous():
            raise ValueError("read_rows needs a contiguous output tensor")
        descriptor, offset, nbytes = self.locate_rows(key, start, count)
        dtype = self.tensor_dtype(key)
        target = out if out.dtype == dtype else torch.empty(out.shape, dtype=dtype)
        if target.numel() * dtype.itemsize != nbytes:
            raise ValueError(f"rows {start}..{start + count} of {key} {self.shape(key)} do not fit {list(out.shape)}")
        with self._guard(self.file_of[key]):
            read_exactly(descriptor, offset, target)
        if target is not out:
            out.copy_(target)

    def tensor_dtype(self, key: str) -> torch.dtype:
        """``key``'s dtype from the header.

        Raises:
            ConversionError: ``key`` is missing, or its dtype is not BF16, F16 or F32.
        """
        name = self._checked_entry(key)[1]["dtype"]
        if name not in _SAFETENSORS_DTYPES:
            raise ConversionError(f"{key} has dtype {name}; only BF16, F16 and F32 checkpoints are supported.")
        return _SAFETENSORS_DTYPES[name]

    def _checked_entry(self, key: str) -> tuple[int, dict]:
        if key not in self.file_of:
            raise ConversionError(f"tensor {key} is missing from {self.hf_dir}; the checkpoint does not match "
                                  "its config.json (layers, experts or tied embeddings).")
        return self._entry(key)

    def _descriptor(self, file_name: str) -> int:
        with self._lock:
            if file_name not in self._descriptors:
                self._descriptors[file_name] = os.open(self.hf_dir / file_name, os.O_RDONLY)
            return self._descriptors[file_name]

    def close(self) -> None:
        """Close the files opened for reading tensors."""
        with self._lock:
            for descriptor in self._descriptors.values():
                os.close(descriptor)
            self._descriptors.clear()

    def dtype(self) -> torch.dtype:
        """The dtype of the first tensor, from the file header (no tensor is read)."""
        return self.tensor_dtype(self.keys()[0])

    def _entry(self, key: str) -> tuple[int, dict]:
        """(offset of its file's data section, the header entry: dtype, shape, data_offsets) of ``key``."""
        data_start, header = self._header(self.file_of[key])
        return data_start, header[key]

    def _header(self, file_name: str) -> tuple[int, dict]:
        """(offset of the data section, the parsed header) of one file, read once."""
        if file_name not in self._headers:
            with self._guard(file_name), open(self.hf_dir / file_name, "rb") as stream:
                (length,) = struct.unpack("<Q", stream.read(8))
                self._headers[file_name] = (8 + length, json.loads(stream.read(length)))
        return self._headers[file_name]


def shard_names(sizes: list[tuple[str, int]], prefix: str, max_shard_bytes: int) -> dict[str, str]:
    """Which file each tensor goes to (key -> ``{prefix}-{n:05d}.safetensors``), in order: a new
    file starts when the next tensor would take a non-empty one past ``max_shard_bytes``.

    Args:
        sizes: (key, bytes) of every tensor, in the order they are written.
    """
    names, number, size = {}, 1, 0
    for key, nbytes in sizes:
        if size and size + nbytes > max_shard_bytes:
            number, size = number + 1, 0
        names[key] = f"{prefix}-{number:05d}.safetensors"
        size += nbytes
    return names


def write_sharded(tensors: dict[str, torch.Tensor], directory: Path, prefix: str,
                  max_shard_bytes: int) -> dict[str, str]:
    """Write tensors into safetensors files of at most ``max_shard_bytes``; returns key -> file."""
    weight_map = shard_names([(key, t.numel() * t.element_size()) for key, t in tensors.items()], prefix,
                             max_shard_bytes)
    for file_name in dict.fromkeys(weight_map.values()):
        _save_file({key: tensors[key].contiguous() for key, name in weight_map.items() if name == file_name},
                   directory / file_name)
    return weight_map


_SAFETENSORS_NAMES = {dtype: name for name, dtype in _SAFETENSORS_DTYPES.items()}


class StreamingShardWriter:
    """Safetensors shards written one tensor at a time, each tensor's bytes dropped once written.

    Every tensor's name and shape is known before any is made, so each file's header (JSON: dtype,
    shape and byte range of each tensor, then spaces to a multiple of 8 bytes, after its 8-byte
    little-endian length, as the safetensors format specifies) is written first and the tensors
    are appended in order. Files are split as :func:`write_sharded` splits them.
    """

    def __init__(self, directory: Path, prefix: str, entries: list[tuple[str, tuple[int, ...]]], dtype: torch.dtype,
                 max_shard_bytes: int) -> None:
        """Plan the files of ``entries`` ((key, shape) in writing order), all in ``dtype``."""
        self.directory, self.dtype, self.shapes = directory, dtype, dict(entries)
        self.order = [key for key, _ in entries]
        self.nbytes = {key: math.prod(shape) * dtype.itemsize for key, shape in entries}
        self.weight_map = shard_names([(key, self.nbytes[key]) for key in self.order], prefix, max_shard_bytes)
        self.total_size = sum(self.nbytes.values())
        self._next, self._stream, self._file_name = 0, None, None

    def write(self, key: str, tensor: torch.Tensor) -> None:
        """Append ``key``, the next tensor of the plan (a ValueError otherwise)."""
        if self._next >= len(self.order) or key != self.order[self._next] or tuple(tensor.shape) != self.shapes[key] \
                or tensor.dtype != self.dtype:
            raise ValueError(f"{key} {list(tensor.shape)} {tensor.dtype} is not the next tensor of the plan")
        if self.weight_map[key] != self._file_name:
            self._finish_file()
            self._start_file(self.weight_map[key])
        with _refusals_named(self.directory / self._file_name):
            self._stream.write(memoryview(tensor.contiguous().reshape(-1).view(torch.uint8).numpy()))
        self._next += 1

    def close(self) -> None:
        """Finish the last file (flushed and fsynced); every planned tensor must have been written."""
        self._finish_file()
        if self._next != len(self.order):
            raise ValueError(f"{len(self.order) - self._next} planned tensors were not written")

    def abort(self) -> None:
        """Close the open file without checks (after a failure; the caller removes the directory)."""
        if self._stream is not None:
            self._stream.close()
            self._stream = None

    def _start_file(self, file_name: str) -> None:
        keys = [key for key in self.order if self.weight_map[key] == file_name]
        header, position = {"__metadata__": {"format": "pt"}}, 0
        for key in keys:
            header[key] = {"dtype": _SAFETENSORS_NAMES[self.dtype], "shape": list(self.shapes[key]),
                           "data_offsets": [position, position + self.nbytes[key]]}
            position += self.nbytes[key]
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)
        with _refusals_named(self.directory / file_name):
            self._stream = open(self.directory / file_name, "xb")  # noqa: SIM115 - closed in _finish_file
            self._stream.write(struct.pack("<Q", len(text)) + text)
        self._file_name = file_name

    def _finish_file(self) -> None:
        if self._stream is None:
            return
        try:
            with _refusals_named(self.directory / self._file_name):
                self._stream.flush()
                os.fsync(self._stream.fileno())
        finally:
            self.abort()


@contextlib.contextmanager
def _refusals_named(path: Path):
    """A file-system refusal (disk full, file-size limit, read-only) while writing ``path`` as
    the one-sentence StorageError naming it; other errors as they are."""
    try:
        yield
    except OSError as err:
        refusal = storage_error(err, path)
        if refusal is None:
            raise
        raise refusal from err


def _save_file(shard: dict[str, torch.Tensor], path: Path) -> None:
    """safetensors' ``save_file``, whose I/O failures (a Rust ``SafetensorError`` that carries
    only the errno in its text) become the file-system sentence an ``OSError`` gets.

    Raises:
        StorageError: disk full, quota, file-size limit, read-only or permission refusal.
    """
    try:
        save_file(shard, str(path), metadata={"format": "pt"})
    except SafetensorError as err:
        code = re.search(r"\(os error (\d+)\)", str(err))
        refusal = storage_error(OSError(int(code.group(1)), os.strerror(int(code.group(1))), str(path))) \
            if code else None
        if refusal is None:
            raise
        raise refusal from err


def write_index(directory: Path, weight_map: dict[str, str], total_size: int) -> None:
    """Write ``model.safetensors.index.json`` (``total_size`` in bytes, keys sorted) atomically."""
    index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
    atomic_write_json(directory / INDEX_NAME, index)
