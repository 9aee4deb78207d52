"""Rank bodies that only make sense on a CUDA machine. Results come back to the test on the CPU
(the harness moves tensors there)."""

from pathlib import Path

import torch

from megatron_sami.models.build import Backend, build_gpt_model
from megatron_sami.models.catalogue import load_model_config
from megatron_sami.models.checkpoint import load_model, save_model
from megatron_sami.models.config import PrecisionConfig
from megatron_sami.runtime import cpu_compat
from megatron_sami.runtime.distributed import megatron_runtime
from megatron_sami.runtime.layout import ParallelConfig
from megatron_sami.testing.lm import lm_forward_step, make_lm_batches

import te_lane_jobs


def bf16_forward_backward_on_gpu(model_name: str) -> dict:
    config = load_model_config(model_name)
    parallel = ParallelConfig()
    with megatron_runtime(parallel, model=config) as info:
        model = build_gpt_model(config, parallel, PrecisionConfig(params_dtype="bf16"), 32)
        (batch,) = make_lm_batches(1, 2, 32, config.vocab_size, seed=3)
        batch = {key: value.cuda() for key, value in batch.items()}
        output, loss_func = lm_forward_step(iter([batch]), model)
        loss, _ = loss_func(output)
        loss.backward()
        return {
            "backend": info.backend,
            "device": next(model.parameters()).device.type,
            "dtype": str(next(model.parameters()).dtype),
            "loss": float(loss),
            "layer_cpu_compat": cpu_compat.is_active(),
            "uses_te": Backend.detect().use_te,
        }


def lane_entries_and_cross_load(model_name: str, directory: str) -> dict:
    """Checkpoint entries of the local and the real Transformer Engine spec on this GPU, and the
    weights (by checkpoint key) that did not arrive when a local-lane checkpoint is loaded into
    the TE model ("mismatched": empty when all did)."""
    config = load_model_config(model_name)
    parallel = ParallelConfig()
    precision = PrecisionConfig(params_dtype="fp32")
    with megatron_runtime(parallel, model=config):
        backends = {"local": Backend(use_te=False, on_gpu=True), "te": Backend.detect()}
        assert backends["te"].use_te
        models = {}
        for seed, lane in enumerate(("local", "te", "te")):
            torch.manual_seed(seed)
            models[lane if lane not in models else "te-loaded"] = build_gpt_model(
                config, parallel, precision, 32, backend=backends[lane])
        result = {lane: te_lane_jobs.checkpoint_entries(models[lane]) for lane in ("local", "te")}
        save_model(models["local"], Path(directory) / "local")
        load_model(models["te-loaded"], Path(directory) / "local")
        result["mismatched"] = te_lane_jobs.different_values(models["local"], models["te-loaded"])
        return result
