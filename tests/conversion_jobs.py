"""Tiny random HF models of each family, and rank bodies that convert / export / score them."""

from __future__ import annotations

from pathlib import Path

import torch

from megatron_sami.conversion import convert
from megatron_sami.conversion.verify import megatron_logits
from megatron_sami.runtime.distributed import megatron_runtime
from megatron_sami.runtime.layout import ParallelConfig
from megatron_sami.testing.tiny import COMMON, VARIANTS  # noqa: F401 - the tests parametrize over them
from megatron_sami.testing.tiny import make_tiny_hf_model as make_hf_model  # noqa: F401


def hf_logits(hf_dir: Path, tokens_BT: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(tokens_BT).logits


def to_megatron(hf_dir: str, out_dir: str, pipeline: int = 1, expert: int = 1) -> None:
    parallel = ParallelConfig(pipeline=pipeline, expert=expert)
    with megatron_runtime(parallel):
        convert.hf_to_megatron(Path(hf_dir), Path(out_dir), parallel)


def to_hf(ckpt_dir: str, out_dir: str, pipeline: int = 1, expert: int = 1, max_shard_bytes: int = 10**9) -> None:
    parallel = ParallelConfig(pipeline=pipeline, expert=expert)
    with megatron_runtime(parallel):
        convert.megatron_to_hf(Path(ckpt_dir), Path(out_dir), parallel, max_shard_bytes=max_shard_bytes)


def logits_at(ckpt_dir: str, tokens_BT: torch.Tensor, tensor: int, pipeline: int, expert: int) -> torch.Tensor:
    parallel = ParallelConfig(tensor=tensor, pipeline=pipeline, expert=expert)
    with megatron_runtime(parallel):
        model, megatron_model = convert.load_checkpoint_model(Path(ckpt_dir), parallel, "fp32", tokens_BT.shape[1])
        return megatron_logits(megatron_model, tokens_BT, model.vocab_size)


def resave_at(ckpt_dir: str, out_dir: str, tensor: int, pipeline: int) -> None:
    """Load a checkpoint at a layout and save it again from there (as training does)."""
    parallel = ParallelConfig(tensor=tensor, pipeline=pipeline)
    with megatron_runtime(parallel):
        _, megatron_model = convert.load_checkpoint_model(Path(ckpt_dir), parallel, "fp32")
        convert.save_checkpoint_dir(megatron_model, Path(ckpt_dir), Path(out_dir))


def expect_conversion_error(kind: str, source: str, out_dir: str) -> str:
    """Run a conversion that must fail; return the error message (or raise if it did not fail)."""
    from megatron_sami.errors import SamiError

    parallel = ParallelConfig()
    with megatron_runtime(parallel):
        try:
            if kind == "hf-to-megatron":
                convert.hf_to_megatron(Path(source), Path(out_dir), parallel)
            else:
                convert.megatron_to_hf(Path(source), Path(out_dir), parallel)
        except SamiError as err:
            return str(err)
    raise AssertionError(f"{kind} {source} -> {out_dir} did not fail")
