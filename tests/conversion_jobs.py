"""Tiny random HF models of each family, and rank bodies that convert / export / score them."""

from __future__ import annotations

from pathlib import Path

import torch

from megatron_sami.conversion import convert
from megatron_sami.conversion.verify import megatron_logits
from megatron_sami.runtime.distributed import megatron_runtime
from megatron_sami.runtime.layout import ParallelConfig

COMMON = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=250, rms_norm_eps=1e-5)

VARIANTS = {
    "llama": ("LlamaConfig", dict(max_position_embeddings=256, rope_theta=10000.0)),
    "llama-tied": ("LlamaConfig", dict(max_position_embeddings=256, tie_word_embeddings=True)),
    # Llama 3.1-style band-wise rope scaling and linear interpolation: checked by logits.
    "llama31-rope": ("LlamaConfig", dict(max_position_embeddings=16384, rope_theta=500000.0, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192})),
    "llama-linear-rope": ("LlamaConfig", dict(max_position_embeddings=512, rope_scaling={
        "rope_type": "linear", "factor": 4.0})),
    "mistral": ("MistralConfig", dict(max_position_embeddings=256, sliding_window=64)),
    "mixtral": ("MixtralConfig", dict(max_position_embeddings=256, num_local_experts=4, num_experts_per_tok=2,
                                      rope_theta=1e6)),
}


def make_hf_model(variant: str, directory: Path, seed: int = 0, num_layers: int = 2, **overrides) -> Path:
    """A random HF model of the variant, written with save_pretrained (fp32 safetensors)."""
    import transformers

    config_class, extra = VARIANTS[variant]
    config = getattr(transformers, config_class)(**{**COMMON, "num_hidden_layers": num_layers, **extra, **overrides})
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # norms away from 1 so that a swapped norm shows in the logits
        for name, param in model.named_parameters():
            if "norm" in name:
                param.uniform_(0.5, 1.5)
    model.save_pretrained(directory)
    return directory


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
