"""FP8 reaches the model or is refused, FLOP counts and peaks are honest, the TransformerConfig
carries what the GPU lane needs (issue 15, items 5, 6, 8, 10). One process, no GPU, no TE."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

import megatron_sami.alignment.trainer as trainer
import megatron_sami.models.build as build
import megatron_sami.models.config as config_module
from megatron_sami.alignment.flops import (
    RowLengths,
    microbatch_rows,
    per_token_flops,
    step_flops,
    training_flops,
)
from megatron_sami.alignment.shared_prompt import share_microbatches
from megatron_sami.errors import ConfigError
from megatron_sami.models.catalogue import load_model_config
from megatron_sami.models.config import PrecisionConfig, fp8_refusal
from megatron_sami.runtime.layout import ParallelConfig
from megatron_sami.training.engine import OptimizerSettings, StepResult, ddp_config, peak_tflops

CPU = build.Backend(use_te=False, on_gpu=False)


# --- item 5: FP8 ---------------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("recipe", "capability", "cuda", "refused"),
    [
        ("tensorwise", (9, 0), "12.4", None),
        ("delayed", (8, 9), "12.1", None),
        ("delayed", (8, 9), "12.0", "CUDA 12.1"),
        ("tensorwise", (8, 6), "12.8", "8.9"),
        ("blockwise", (9, 0), "12.9", None),
        ("blockwise", (9, 0), "12.8", "CUDA 12.9"),
        ("blockwise", (8, 9), "13.0", "9.0"),
        ("mxfp8", (10, 0), "12.8", None),
        ("mxfp8", (9, 0), "12.9", "10.0"),
        ("mxfp8", (12, 0), "12.9", "12.0"),
        ("blockwise", (9, 4), None, None),  # ROCm build: no CUDA version to check
    ],
)
def test_fp8_guard_refuses_what_transformer_engine_refuses(recipe, capability, cuda, refused):
    reason = fp8_refusal(recipe, capability, cuda)
    assert reason is None if refused is None else refused in reason


@pytest.mark.parametrize(("recipe", "capability", "cuda", "ok"),
                         [("blockwise", (8, 9), "12.9", False), ("blockwise", (9, 0), "12.8", False),
                          ("mxfp8", (12, 0), "12.9", False), ("tensorwise", (9, 0), "12.8", True)])
def test_check_hardware_on_a_fake_gpu(monkeypatch, recipe, capability, cuda, ok):
    monkeypatch.setattr(config_module, "transformer_engine_import_error", lambda: None)
    monkeypatch.setattr(config_module, "_te_fp8_refusal", lambda recipe: None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.version, "cuda", cuda)
    precision = PrecisionConfig(fp8="hybrid", fp8_recipe=recipe)
    if ok:
        precision.check_hardware()
    else:
        with pytest.raises(ConfigError, match=f"precision.fp8_recipe={recipe} cannot run on this GPU"):
            precision.check_hardware()


def test_short_runs_default_to_current_scaling():
    assert PrecisionConfig().fp8_recipe == "tensorwise"
    with pytest.raises(ConfigError, match="peak_tflops must be positive"):
        PrecisionConfig(peak_tflops=0.0)


def test_fp8_where_transformer_engine_does_not_import_is_refused_naming_the_import(monkeypatch):
    monkeypatch.setattr(config_module, "transformer_engine_import_error", lambda: "ImportError: libcudart.so.13")
    with pytest.raises(ConfigError, match=r"does not import here \(ImportError: libcudart.so.13\).*precision.fp8=null"):
        PrecisionConfig(fp8="e4m3").check_hardware()


def test_sami_train_refuses_fp8_before_any_work(tmp_path):
    """Before the fix the run read the checkpoint (here: missing) and, given one, trained in BF16."""
    if config_module.transformer_engine_import_error() is None:
        pytest.skip("Transformer Engine imports here")
    cfg = trainer.TrainConfig(checkpoint=str(tmp_path / "absent"), run_dir=str(tmp_path / "run"),
                              precision=PrecisionConfig(fp8="e4m3"))
    with pytest.raises(ConfigError, match="precision.fp8 needs Transformer Engine"):
        trainer.train(cfg, "")
    assert not (tmp_path / "run").exists()


def test_setup_builds_the_model_with_the_whole_precision_config(monkeypatch, tmp_path):
    captured = {}

    class Built(Exception):
        pass

    def load_checkpoint_model(*args, **kwargs):
        captured.update(kwargs)
        raise Built

    monkeypatch.setattr(trainer, "read_training_data", lambda cfg: ([], 2))
    monkeypatch.setattr(trainer, "claim_run_dir", lambda cfg, info, resolved: (None, trainer.Resume()))
    monkeypatch.setattr(trainer.StopRequest, "install", lambda self: None)
    monkeypatch.setattr(trainer, "load_checkpoint_model", load_checkpoint_model)
    precision = PrecisionConfig(fp8="hybrid", fp8_recipe="delayed")
    cfg = trainer.TrainConfig(checkpoint=str(tmp_path), run_dir=str(tmp_path / "run"), precision=precision)
    with pytest.raises(Built):
        trainer.setup(cfg, SimpleNamespace(data_parallel_size=1, is_rank0=False), load_model_config("tiny-llama"), "")
    assert captured["precision"] is precision


def test_fp8_settings_reach_the_transformer_config(monkeypatch):
    """The TE lane's config, built here with the local kernels (TE's fused RoPE needs TE)."""
    monkeypatch.setattr(PrecisionConfig, "check_hardware", lambda self: None)
    local_kernels = build._kernels
    monkeypatch.setattr(build, "_kernels", lambda model, backend: local_kernels(model, CPU))
    config = build.transformer_config(load_model_config("tiny-llama"), ParallelConfig(),
                                      PrecisionConfig(fp8="hybrid", fp8_recipe="delayed"),
                                      build.Backend(use_te=True, on_gpu=False))
    assert (config.fp8, config.fp8_recipe) == ("hybrid", "delayed")


# --- items 8 and 10: router dtype, weight-gradient fusion, DDP overlap ----------------------------

def test_moe_router_runs_in_fp32_as_hf_mixtral():
    config = build.transformer_config(load_model_config("tiny-mixtral"), ParallelConfig(),
                                      PrecisionConfig(params_dtype="bf16"), CPU)
    assert config.moe_router_dtype == "fp32"


@pytest.mark.parametrize(("use_te", "apex", "fused"), [(True, True, True), (True, False, False), (False, True, False)])
def test_gradient_accumulation_fusion_on_the_te_lane(monkeypatch, use_te, apex, fused):
    monkeypatch.setattr(build, "_wgrad_fusion_available", lambda: apex)
    kernels = build._kernels(load_model_config("tiny-llama"), build.Backend(use_te=use_te, on_gpu=True))
    assert kernels["gradient_accumulation_fusion"] is fused


def test_ddp_overlaps_the_gradient_reduction_on_gpus(monkeypatch):
    """Defaults: both overlaps on with CUDA (the parameter gather with the distributed optimizer
    only), off on CPU (gloo); tests/test_engine_config.py has the whole table."""
    assert not ddp_config(OptimizerSettings()).overlap_grad_reduce  # CPU / gloo: one reduction after backward
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    on_gpu = ddp_config(OptimizerSettings())
    assert on_gpu.overlap_grad_reduce and on_gpu.overlap_param_gather and on_gpu.grad_reduce_in_fp32
    reduce_only = ddp_config(OptimizerSettings(overlap_param_gather=False))
    assert reduce_only.overlap_grad_reduce and not reduce_only.overlap_param_gather
    with pytest.raises(ConfigError, match="needs optimizer.use_distributed_optimizer=true"):
        OptimizerSettings(use_distributed_optimizer=False, overlap_param_gather=True)


# --- item 6: FLOPs and peaks --------------------------------------------------------------------

TINY = dict(num_layers=2, hidden_size=8, ffn_hidden_size=12, num_attention_heads=2, num_query_groups=1,
            vocab_size=20, make_vocab_size_divisible_by=4)


def test_flops_of_a_tiny_model_by_hand():
    """One causal row of 3 real tokens, logits at 2 of them; multiply-adds of the forward pass:"""
    model = load_model_config("tiny-llama", **TINY)  # h 8, q = 2 x 4 = 8, kv = 1 x 4 = 4, f 12, V 20
    projections = 3 * 8 * 8 + 3 * 8 * 4 + 3 * 8 * 4 + 3 * 8 * 8  # Q, K, V, output: 576
    mlp = 3 * (3 * 8 * 12)  # gate, up, down: 864
    attention = 2 * (3 * 3 / 2) * 8  # QK^T and AV over L^2/2 = 4.5 pairs: 72
    logits = 2 * 8 * 20  # 320
    forward_macs = 2 * (projections + mlp + attention) + logits
    assert training_flops(model, [RowLengths(prompt=3)], logit_tokens=2) == 3 * 2 * forward_macs == 20064
    moe = load_model_config("tiny-llama", **TINY, num_experts=4, moe_router_topk=2)
    assert training_flops(moe, [RowLengths(prompt=3)], 2) - 20064 == 3 * 2 * (2 * mlp)  # a second expert per layer


def megatron_lm_flops(model, batch_size: int, seq_length: int) -> float:
    """Megatron-LM ``num_floating_point_operations`` (megatron/training/training.py,
    ``transformer_flops``) for this family: GQA, SwiGLU, every layer dense or every layer MoE,
    no MTP/MLA; restated here from its terms."""
    fwd_bwd, fma, swiglu = 3, 2, 3
    q = model.kv_channels * model.num_attention_heads
    kv = model.kv_channels * model.num_query_groups
    attention = fwd_bwd * fma * (model.hidden_size * (q + 2 * kv) + q * seq_length / 2 * 2 + q * model.hidden_size)
    routed = model.moe_router_topk if model.is_moe else 1
    mlp = fwd_bwd * fma * model.hidden_size * model.ffn_hidden_size * routed * swiglu
    logits = fwd_bwd * fma * model.hidden_size * model.padded_vocab_size()
    return batch_size * seq_length * (model.num_layers * (mlp + attention) + logits)


@pytest.mark.parametrize("name", ["llama3-8b", "llama3-70b", "mixtral-8x7b", "mistral-7b", "smollm2-135m"])
def test_flops_equal_megatron_lm_without_padding(name):
    model = load_model_config(name)
    batch, length = 4, 320
    mask = torch.ones(batch, length)  # every position scored: no padding, logits everywhere
    micro = [{"tokens": torch.zeros(batch, length, dtype=torch.long), "loss_mask": mask}]
    expected = megatron_lm_flops(model, batch, length)
    assert math.isclose(training_flops(model, [RowLengths(prompt=length)] * batch, batch * length), expected,
                        rel_tol=1e-12)
    assert math.isclose(step_flops(model, micro), expected, rel_tol=1e-12)


def pairs(prompt_lengths: list[int], response_lengths: list[int], width: int) -> dict[str, torch.Tensor]:
    """One query's C x C pairs as alignment.data lays them out (inputs shifted by one, the mask
    from the prompt's last position), padded to ``width``."""
    C = len(prompt_lengths)
    tokens = torch.zeros(C * C, width, dtype=torch.long)
    mask = torch.zeros(C * C, width)
    for k, prompt in enumerate(prompt_lengths):
        for j, response in enumerate(response_lengths):
            used = prompt + response - 1
            tokens[k * C + j, :prompt] = torch.arange(1, prompt + 1) + 100 * k
            tokens[k * C + j, prompt:used] = torch.arange(1, response) + 1000 * j
            mask[k * C + j, prompt - 1:used] = 1
    return {"tokens": tokens, "labels": tokens.clone(), "loss_mask": mask}


def test_padding_and_unscored_logits_are_not_counted_and_shared_prompts_count_their_blocks():
    model = load_model_config("llama3-8b")
    prompts, responses = [110, 112], [201, 81]
    micro = pairs(prompts, responses, 320)
    per_token = per_token_flops(model)
    rows = [RowLengths(prompt=p + r - 1) for p in prompts for r in responses]
    scored = sum(r for _ in prompts for r in responses)
    assert step_flops(model, [micro]) == training_flops(model, rows, scored)
    (shared,), _ = share_microbatches([micro], 2, 16, each=True)
    saved_tokens = sum(p * (len(responses) - 1) for p in prompts)  # each prompt processed once
    attention_per_pair = training_flops(model, [RowLengths(prompt=2)], 0) - 2 * per_token
    attention_per_pair /= 2  # a 2-token row has 2^2 / 2 = 2 query-key pairs
    saved_pairs = sum(p * p / 2 * (len(responses) - 1) for p in prompts)
    assert math.isclose(step_flops(model, [micro]) - step_flops(model, [shared]),
                        saved_tokens * per_token + saved_pairs * attention_per_pair, rel_tol=1e-12)


@pytest.mark.parametrize(
    ("name", "dtype", "peak"),
    [("NVIDIA H100 80GB HBM3", "bf16", 989.4), ("NVIDIA H200", "fp8", 1978.9), ("NVIDIA H100 PCIe", "bf16", 756.0),
     ("NVIDIA H100 NVL", "bf16", 835.0), ("NVIDIA H200 NVL", "fp8", 1671.0), ("NVIDIA GB200", "bf16", 2500.0),
     ("NVIDIA B200", "bf16", 2250.0), ("NVIDIA A100-SXM4-80GB", "bf16", 312.0), ("NVIDIA A100-SXM4-80GB", "fp8", None),
     ("NVIDIA H800", "bf16", None)],
)
def test_peak_table_matches_exact_gpu_names(name, dtype, peak):
    assert peak_tflops(dtype, device_name=name) == peak


def test_peak_override_wins():
    assert peak_tflops("bf16", override=700.0, device_name="NVIDIA H100 80GB HBM3") == 700.0


def test_metrics_row_reports_model_flops_of_real_tokens(monkeypatch):
    monkeypatch.setattr(trainer, "sum_over_data_parallel", lambda values: values)
    model = load_model_config("llama3-8b")
    micro = [pairs([110, 112], [201, 81], 320)]
    run = SimpleNamespace(model_config=model, info=SimpleNamespace(launch=SimpleNamespace(world_size=2)),
                          cfg=SimpleNamespace(parallel=ParallelConfig()), peak_tflops=989.4, step=1)
    logs = dict.fromkeys(trainer.METRIC_KEYS, 0.0)
    row = trainer.metrics_row(run, StepResult(loss=0.0, grad_norm=1.0, logs=logs), 1e-6, micro, 320,
                              data_s=0.0, step_time_s=2.0)
    expected = step_flops(model, micro) / 2.0 / 2 / 1e12
    assert math.isclose(row["tflops_per_gpu"], expected, rel_tol=1e-12)
    assert math.isclose(row["mfu"], expected / 989.4, rel_tol=1e-12)


def test_flops_count_logits_at_scored_tokens_under_sequence_parallelism_too(monkeypatch):
    """The SAMI step selects the scored rows under SP as well (issue 15 item 10); the count used
    to put the output layer at every real token there."""
    monkeypatch.setattr(trainer, "sum_over_data_parallel", lambda values: values)
    model = load_model_config("llama3-8b")
    micro = [pairs([110, 112], [201, 81], 320)]
    scored = int(micro[0]["loss_mask"].sum())
    assert step_flops(model, micro) == training_flops(model, microbatch_rows(micro[0]), scored)
    logs = dict.fromkeys(trainer.METRIC_KEYS, 0.0)
    rows = {}
    for sp in (False, True):
        run = SimpleNamespace(model_config=model, info=SimpleNamespace(launch=SimpleNamespace(world_size=2)),
                              cfg=SimpleNamespace(parallel=ParallelConfig(tensor=2, sequence_parallel=sp)),
                              peak_tflops=989.4, step=1)
        rows[sp] = trainer.metrics_row(run, StepResult(loss=0.0, grad_norm=1.0, logs=logs), 1e-6, micro, 320,
                                       data_s=0.0, step_time_s=2.0)
    expected = step_flops(model, micro) / 2.0 / 2 / 1e12
    assert math.isclose(rows[True]["tflops_per_gpu"], expected, rel_tol=1e-12)
    assert math.isclose(rows[False]["tflops_per_gpu"], expected, rel_tol=1e-12)
