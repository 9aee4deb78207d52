"""Megatron -> HF export that streams from the distributed checkpoint to safetensors shards.

The mirror of :func:`~megatron_sami.conversion.convert.hf_to_megatron`: one process, no process
group, no model, no GPU, any source layout (TP/PP/EP/DP). Megatron-Core saves each layer's
tensor as one slice of a stacked global tensor (``decoder.layers.self_attention.linear_qkv.weight``
of shape [num_layers, rows, hidden]; experts [num_layers, num_experts, ...]) in TP=1 row order,
split into chunks by the saving layout. The export takes one key-map rule at a time (one layer,
one expert), reads that slice from the chunks that overlap it
(:class:`~megatron_sami.conversion.checkpoint_reader.CheckpointReader`), applies the inverse
transform (QKV ungrouped, gate/up split, padded vocabulary rows dropped), casts and appends the HF
tensors to their shard. A process holds at most one rule's tensors (the largest: the embedding),
whatever the model's size, and never a whole stacked tensor.

The output is what the in-model export wrote: the same tensors bit for bit, the same shard names
(``model-rank0000-NNNNN.safetensors``) and split, index, config.json (dtype set when
``--dtype`` changes it) and tokenizer files, staged in ``<out>.incomplete`` and renamed into place.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from megatron_sami.conversion.checkpoint_reader import CheckpointReader
from megatron_sami.conversion.convert import HF_META_FILES, MAX_SHARD_BYTES, Progress, dtype_named, shapes_of
from megatron_sami.conversion.hf_io import StreamingShardWriter, write_index
from megatron_sami.conversion.table import Rule, expand_rules
from megatron_sami.conversion.transforms import Shapes, megatron_shape, to_hf
from megatron_sami.device_budget import check_device_budget
from megatron_sami.errors import CheckpointError
from megatron_sami.io import atomic_write_json, fsync_dir, fsync_file
from megatron_sami.models.checkpoint_dir import HF_DIR, WEIGHTS_DIR, check_output_path, read_checkpoint_model
from megatron_sami.models.config import ModelConfig
from megatron_sami.runtime.distributed import logger

# The one process's shard prefix: the name the in-model export's rank 0 gave its files.
SHARD_PREFIX = "model-rank0000"
# The checkpoint keys of a key-map name whose layer (and expert) index is taken out, in the order
# tried: the norms are saved under the Transformer Engine names by both layer specs (dense models;
# an MoE layer keeps pre_mlp_layernorm), experts under the sequential or grouped expert name.
CHECKPOINT_NAMES = {
    "decoder.layers.input_layernorm.weight": ("decoder.layers.self_attention.linear_qkv.layer_norm_weight",
                                              "decoder.layers.input_layernorm.weight"),
    "decoder.layers.pre_mlp_layernorm.weight": ("decoder.layers.mlp.linear_fc1.layer_norm_weight",
                                                "decoder.layers.pre_mlp_layernorm.weight"),
    "decoder.layers.mlp.experts.local_experts.linear_fc1.weight": (
        "decoder.layers.mlp.experts.experts.linear_fc1.weight", "decoder.layers.mlp.experts.local_experts.linear_fc1.weight"),
    "decoder.layers.mlp.experts.local_experts.linear_fc2.weight": (
        "decoder.layers.mlp.experts.experts.linear_fc2.weight", "decoder.layers.mlp.experts.local_experts.linear_fc2.weight"),
}
# Within a layer, the order of the model's named_parameters, which the in-model export wrote in
# (so files split where they did): (group, position); an expert's fc1 and fc2 share its group.
_LAYER_ORDER = {
    "input_layernorm.weight": (0, 0), "self_attention.linear_proj.weight": (1, 0),
    "self_attention.linear_qkv.weight": (2, 0), "pre_mlp_layernorm.weight": (3, 0),
    "mlp.linear_fc1.weight": (4, 0), "mlp.linear_fc2.weight": (5, 0), "mlp.router.weight": (4, 0),
    "mlp.experts.local_experts.linear_fc1.weight": (6, 0), "mlp.experts.local_experts.linear_fc2.weight": (6, 1),
}
_TOP_ORDER = {"embedding.word_embeddings.weight": 0, "decoder.final_layernorm.weight": 2, "output_layer.weight": 3}
_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.*)$")
_EXPERT = re.compile(r"^(.*\.local_experts)\.(\d+)\.(.*)$")


@dataclass(frozen=True)
class ExportItem:
    """One key-map rule located in the checkpoint: the slice ``index`` (layer, expert) of the
    global tensor ``key``, a TP=1 Megatron tensor of ``shape``, made into the rule's HF tensors."""

    rule: Rule
    key: str
    index: tuple[int, ...]
    shape: tuple[int, ...]

    def read(self, reader: CheckpointReader) -> torch.Tensor:
        """The Megatron tensor, read from the chunks holding it (its saved dtype)."""
        zeros = (0,) * len(self.shape)
        return reader.read(self.key, (*self.index, *zeros), (1,) * len(self.index) + self.shape).reshape(self.shape)


def split_name(name: str) -> tuple[str, tuple[int, ...]]:
    """A key-map Megatron name -> (the name without its layer and expert index, those indices):
    ``decoder.layers.3.mlp.experts.local_experts.5.linear_fc1.weight`` ->
    (``decoder.layers.mlp.experts.local_experts.linear_fc1.weight``, (3, 5))."""
    layer = _LAYER.match(name)
    if layer is None:
        return name, ()
    rest, index = layer.group(2), (int(layer.group(1)),)
    expert = _EXPERT.match(rest)
    if expert is not None:
        rest, index = f"{expert.group(1)}.{expert.group(3)}", (*index, int(expert.group(2)))
    return f"decoder.layers.{rest}", index


def export_order(rule: Rule) -> tuple[int, ...]:
    """The rule's place in the in-model export's order: embedding, each layer, final norm, head."""
    stripped, index = split_name(rule.megatron)
    if not index:
        return (_TOP_ORDER[stripped],)
    group, position = _LAYER_ORDER[stripped.removeprefix("decoder.layers.")]
    return (1, index[0], group, index[1] if len(index) > 1 else 0, position)


def hf_shape(key: str, model: ModelConfig) -> tuple[int, ...]:
    """The shape config.json gives HF tensor ``key`` (e.g. q_proj [heads * head_dim, hidden])."""
    hidden, head_dim, ffn = model.hidden_size, model.kv_channels, model.ffn_hidden_size
    part = key.split(".")[-2]
    if part.endswith("norm"):
        return (hidden,)
    return {
        "embed_tokens": (model.vocab_size, hidden), "lm_head": (model.vocab_size, hidden),
        "q_proj": (model.num_attention_heads * head_dim, hidden),
        "k_proj": (model.num_query_groups * head_dim, hidden), "v_proj": (model.num_query_groups * head_dim, hidden),
        "o_proj": (hidden, model.num_attention_heads * head_dim),
        "gate_proj": (ffn, hidden), "up_proj": (ffn, hidden), "down_proj": (hidden, ffn),
        "w1": (ffn, hidden), "w3": (ffn, hidden), "w2": (hidden, ffn), "gate": (model.num_experts or 0, hidden),
    }[part]


def _locate(rule: Rule, reader: CheckpointReader, model: ModelConfig, shapes: Shapes) -> ExportItem:
    """The rule's tensor in the checkpoint, its shape checked against the model's config.

    Raises:
        CheckpointError: the checkpoint lacks the tensor, or holds it in another shape; names it.
    """
    stripped, index = split_name(rule.megatron)
    candidates = CHECKPOINT_NAMES.get(stripped, (stripped,))
    key = next((name for name in candidates if name in reader.sizes), None)
    where = reader.weights_dir.parent
    if key is None:
        raise CheckpointError(f"the checkpoint at {where} lacks {candidates[0]} (the Megatron parameter "
                              f"{rule.megatron}), which the model of its model.yaml needs; it was saved from a "
                              "different model: check the model config.")
    shape = megatron_shape(rule.transform, shapes, [hf_shape(name, model) for name in rule.hf])
    leading = (model.num_layers,) + ((model.num_experts,) if len(index) > 1 else ()) if index else ()
    if reader.sizes[key] != (*leading, *shape):
        raise CheckpointError(f"the checkpoint at {where} holds {key} of shape {list(reader.sizes[key])}, but the "
                              f"model of its model.yaml needs {list((*leading, *shape))}; it was saved from a "
                              "different model: check the model config.")
    return ExportItem(rule, key, index, shape)


def export_plan(model: ModelConfig, reader: CheckpointReader) -> list[ExportItem]:
    """Every key-map rule of ``model`` located in the checkpoint, in the in-model export's order.

    Raises:
        CheckpointError: a tensor the model needs is missing or has another shape, or the
            checkpoint holds a tensor no rule reads (a different model, or an unsupported
            variant); the message names the key.
    """
    shapes = shapes_of(model)
    plan = [_locate(rule, reader, model, shapes) for rule in sorted(expand_rules(model), key=export_order)]
    unread = set(reader.sizes) - {item.key for item in plan}
    if model.tie_word_embeddings:
        unread.discard("output_layer.weight")  # a tied head saved anyway is the embedding itself
    if unread:
        raise CheckpointError(f"the checkpoint at {reader.weights_dir.parent} holds {sorted(unread)[0]} "
                              f"({len(unread)} tensors in all), which conversion/llama_family.yaml does not map for "
                              "the model of its model.yaml; it was saved from a different model or an unsupported "
                              "architecture variant: check the model config.")
    return plan


@contextlib.contextmanager
def staged_locally(out_dir: Path) -> Iterator[Path]:
    """Yield ``<out>.incomplete`` to write into; on success rename it to ``out_dir`` (replacing an
    existing one, after fsync), so a directory with the final name is always complete; on failure
    remove it. The one-process form of :func:`megatron_sami.models.checkpoint.staged_output`."""
    staging = out_dir.with_name(out_dir.name + ".incomplete")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    previous = out_dir.with_name(out_dir.name + ".replaced")
    shutil.rmtree(previous, ignore_errors=True)  # left by a kill inside an earlier replace (never an input)
    if out_dir.exists():
        out_dir.rename(previous)
    fsync_dir(staging)
    staging.rename(out_dir)
    fsync_dir(out_dir.parent)
    shutil.rmtree(previous, ignore_errors=True)


def megatron_to_hf(ckpt_dir: Path, out_dir: Path, overwrite: bool = False, dtype: str | None = None,
                   max_shard_bytes: int = MAX_SHARD_BYTES) -> Path:
    """Export a checkpoint directory (saved at any layout) to an HF directory that
    ``from_pretrained`` loads, streaming one tensor at a time (one process, no process group).

    Args:
        dtype: "bfloat16", "float16" or "float32"; default: the dtype of the original HF weights.
            Each tensor is cast once from the dtype it is saved in (bitwise when they agree).
        max_shard_bytes: the largest safetensors file (bytes; a larger single tensor gets its own).

    Returns:
        ``out_dir``.

    Raises:
        OutputOverlapError: ``out_dir`` is, contains or lies inside ``ckpt_dir``.
        ConversionError: ``ckpt_dir`` is not a checkpoint directory, ``out_dir`` exists (without
            ``overwrite``), or ``dtype`` is not supported.
        CheckpointError: a file of the checkpoint is damaged, or its weights do not fit its model
            (a missing, unmapped or misshapen tensor, named).
        StorageError: the output's file system refuses a write (full, read-only, size limit).
        DeviceBudgetError: the largest tensor is above ``SAMI_DEVICE_BUDGET_PARAMS``.
    """
    ckpt_dir, out_dir = Path(ckpt_dir), Path(out_dir)
    check_output_path(out_dir, overwrite, {"checkpoint": ckpt_dir})
    model, conversion = read_checkpoint_model(ckpt_dir)
    out_dtype_name = dtype or conversion.get("source_dtype", "bfloat16")
    out_dtype = dtype_named(out_dtype_name)
    start = time.perf_counter()
    with CheckpointReader(ckpt_dir / WEIGHTS_DIR) as reader:
        plan = export_plan(model, reader)
        largest = max(plan, key=lambda item: math.prod(item.shape))
        check_device_budget(math.prod(largest.shape), f"the export's largest tensor ({largest.rule.megatron})",
                            "an export holds one tensor at a time and cannot split one: raise the budget to it")
        shapes = shapes_of(model)
        entries = [(key, hf_shape(key, model)) for item in plan for key in item.rule.hf]
        with staged_locally(out_dir) as staging:
            writer = StreamingShardWriter(staging, SHARD_PREFIX, entries, out_dtype, max_shard_bytes)
            progress = Progress(writer.total_size, "exporting")
            try:
                for item in plan:
                    for key, tensor in zip(item.rule.hf, to_hf(item.rule.transform, shapes, item.read(reader)),
                                           strict=True):
                        writer.write(key, tensor.to(out_dtype))
                        progress.record(writer.nbytes[key])
                writer.close()
            finally:
                writer.abort()
            write_index(staging, writer.weight_map, writer.total_size)
            write_hf_meta(staging, ckpt_dir / HF_DIR, out_dtype_name, conversion.get("source_dtype"))
    logger.info("exported %s -> %s (%s) in %.1f s", ckpt_dir, out_dir, out_dtype_name, time.perf_counter() - start)
    return out_dir


def write_hf_meta(staging: Path, meta_dir: Path, dtype_name: str, source_dtype: str | None) -> None:
    """Copy config.json, generation_config.json and the tokenizer files; config.json's dtype
    names ``dtype_name`` when it is not the source's."""
    for file_name in HF_META_FILES:
        if (meta_dir / file_name).is_file():
            shutil.copy2(meta_dir / file_name, staging / file_name)
            fsync_file(staging / file_name)  # durable before the directory is renamed into place
    if dtype_name != source_dtype:
        config = json.loads((staging / "config.json").read_text())
        config["dtype" if "dtype" in config else "torch_dtype"] = dtype_name
        atomic_write_json(staging / "config.json", config)
