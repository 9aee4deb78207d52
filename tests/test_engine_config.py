"""What the training seam hands megatron-core (issue 15, items 10 and 11), checked on CPU in one
process: the recompute mode in the TransformerConfig, the DDP overlap settings in the
DistributedDataParallelConfig, and the optimizer's update count in either layout (torch's
per-parameter ``step``, Transformer Engine FusedAdam's per-group one)."""

from __future__ import annotations

import pytest
import torch

import megatron_sami.models.build as build
from megatron_sami.alignment.trainer import TrainConfig
from megatron_sami.errors import ConfigError
from megatron_sami.models.catalogue import load_model_config
from megatron_sami.models.config import PrecisionConfig
from megatron_sami.runtime.layout import ParallelConfig
from megatron_sami.training import engine
from megatron_sami.training.engine import OptimizerSettings

CPU = build.Backend(use_te=False, on_gpu=False)


# --- recomputation ------------------------------------------------------------------------------

@pytest.mark.filterwarnings("ignore:If you are using transformer_engine")  # megatron-core's note on selective
@pytest.mark.parametrize(("mode", "granularity", "method", "num_layers", "modules"), [
    ("none", None, None, None, ["core_attn"]),  # megatron-core fills recompute_modules; unused without granularity
    ("selective", "selective", None, None, ["core_attn"]),
    ("full", "full", "uniform", 1, ["core_attn"]),
    (True, "full", "uniform", 1, ["core_attn"]),  # the boolean of older configs
    (False, None, None, None, ["core_attn"]),
])
def test_the_recompute_mode_reaches_the_transformer_config(mode, granularity, method, num_layers, modules):
    config = build.transformer_config(load_model_config("tiny-llama"), ParallelConfig(),
                                      PrecisionConfig(params_dtype="fp32"), CPU, mode)
    assert (config.recompute_granularity, config.recompute_method, config.recompute_num_layers) == \
        (granularity, method, num_layers)
    assert config.recompute_modules == modules


@pytest.mark.parametrize(("value", "mode"), [("none", "none"), ("selective", "selective"), ("full", "full"),
                                             ("True", "full"), ("False", "none"), (True, "full")])
def test_train_config_reads_recompute_modes_and_the_old_booleans(value, mode):
    assert TrainConfig(checkpoint="c", run_dir="r", recompute_activations=value).recompute_activations == mode


def test_an_unknown_recompute_mode_is_refused_with_the_choices():
    with pytest.raises(ConfigError, match="recompute_activations 'some' is unknown; use one of none, selective, full"):
        TrainConfig(checkpoint="c", run_dir="r", recompute_activations="some")


@pytest.mark.slow
def test_selective_and_full_recomputation_train_as_without_it_with_shared_prompts(tmp_path):
    """megatron-core's checkpointed core attention runs the project's SDPA attention with the
    shared-prompt block mask: same loss and gradient norm as without recomputation."""
    import sami_jobs

    from megatron_sami.testing.multiprocess import run_distributed

    hf_dir, ckpt = (str(path) for path in sami_jobs.make_tiny_sami_model(tmp_path, "llama"))
    (reference,) = run_distributed(sami_jobs.loss_and_grad_norm, 1, ckpt, hf_dir, 4, 2, 1, 1, 1, "none", True)
    for mode in ("selective", "full"):
        (got,) = run_distributed(sami_jobs.loss_and_grad_norm, 1, ckpt, hf_dir, 4, 2, 1, 1, 1, mode, True)
        assert got == pytest.approx(reference, rel=1e-5)


# --- DDP overlap ----------------------------------------------------------------------------------

@pytest.mark.parametrize(("settings", "on_gpu", "grad", "param"), [
    (dict(), False, False, False),  # CPU (gloo): one reduction after backward
    (dict(), True, True, True),  # GPU defaults, with the distributed optimizer
    (dict(use_distributed_optimizer=False), True, True, False),  # nothing to gather without it
    (dict(name="rmsprop", use_distributed_optimizer=False), True, True, False),
    (dict(overlap_grad_reduce=False, overlap_param_gather=False), True, False, False),
    (dict(overlap_grad_reduce=True, overlap_param_gather=True), False, True, True),  # forced on CPU
    (dict(overlap_param_gather=True), False, True, True),  # the gather brings the reduction it needs
    (dict(overlap_grad_reduce=False), True, False, False),  # and no gather without it (Megatron-LM's rule)
])
def test_the_overlap_settings_reach_the_ddp_config(settings, on_gpu, grad, param):
    optimizer = OptimizerSettings(**settings)
    config = engine.ddp_config(optimizer, on_gpu=on_gpu)
    assert (config.overlap_grad_reduce, config.overlap_param_gather) == (grad, param)
    assert config.use_distributed_optimizer is optimizer.use_distributed_optimizer and config.grad_reduce_in_fp32


@pytest.mark.parametrize(("settings", "error"), [
    (dict(use_distributed_optimizer=False, overlap_param_gather=True),
     "overlap_param_gather=true needs optimizer.use_distributed_optimizer=true"),
    (dict(overlap_grad_reduce=False, overlap_param_gather=True),
     "overlap_param_gather=true needs optimizer.overlap_grad_reduce=true"),
])
def test_an_overlapped_gather_without_what_it_needs_is_refused_when_configured(settings, error):
    with pytest.raises(ConfigError, match=error):
        OptimizerSettings(**settings)


def test_wrap_ddp_gives_megatron_the_trainers_optimizer_settings(monkeypatch):
    import megatron.core.distributed as distributed

    seen = {}

    class FakeDDP:
        def __init__(self, config, ddp_config, module):
            seen["ddp_config"] = ddp_config

    monkeypatch.setattr(distributed, "DistributedDataParallel", FakeDDP)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    model = torch.nn.Linear(2, 2)
    model.config = None
    engine.wrap_ddp(model, OptimizerSettings(overlap_grad_reduce=True, overlap_param_gather=False))
    assert (seen["ddp_config"].overlap_grad_reduce, seen["ddp_config"].overlap_param_gather) == (True, False)
    engine.wrap_ddp(model, OptimizerSettings())
    assert (seen["ddp_config"].overlap_grad_reduce, seen["ddp_config"].overlap_param_gather) == (True, True)
    engine.wrap_ddp(model, use_distributed_optimizer=False)  # the older call: defaults for the rest
    assert (seen["ddp_config"].overlap_grad_reduce, seen["ddp_config"].overlap_param_gather) == (True, False)


def test_parameters_are_gathered_before_a_save_only_when_their_gather_is_overlapped():
    calls = []

    class Model:
        def __init__(self, overlap):
            self.ddp_config = engine.ddp_config(OptimizerSettings(overlap_param_gather=overlap), on_gpu=False)

        def start_param_sync(self, force_sync=False):
            calls.append(force_sync)

    engine.gather_parameters(Model(False))
    assert calls == []
    engine.gather_parameters(Model(True))
    assert calls == [True]


# --- the optimizer's update count -----------------------------------------------------------------

class FusedAdamLike(torch.optim.Optimizer):
    """Keeps ``step`` per parameter group, as Transformer Engine's FusedAdam does (TE
    ``pytorch/optimizers/fused_adam.py``: ``group["step"] += 1``; per-parameter state holds the
    moments only). Defined outside ``torch.optim``, as TE's is."""

    def __init__(self, params, capturable=False):
        super().__init__(params, {"lr": 1.0})
        self.capturable = capturable

    def step(self, closure=None):
        for group in self.param_groups:
            if not group["params"]:
                continue  # TE skips empty groups: their step stays behind
            start = torch.tensor([1], dtype=torch.int) if self.capturable else 1
            group["step"] = group["step"] + 1 if "step" in group else start
            for param in group["params"]:
                self.state[param].setdefault("exp_avg", torch.zeros_like(param))


class Wrapped:
    """The shape of megatron-core's optimizer around a torch one (``.optimizer``)."""

    def __init__(self, optimizer):
        self.optimizer = optimizer


def params(count=2):
    return [torch.nn.Parameter(torch.ones(3)) for _ in range(count)]


@pytest.mark.parametrize("capturable", [False, True])
def test_a_per_group_step_count_is_read_and_restored_there(capturable):
    fused = FusedAdamLike([{"params": params()}, {"params": params(1)}, {"params": []}], capturable)
    for _ in range(3):
        fused.step()
    chained = type("Chained", (), {"chained_optimizers": [Wrapped(fused)]})()
    assert engine.optimizer_step_count(chained) == 3  # was 0: no parameter's state has a step
    engine.set_optimizer_step_count(chained, 7)
    steps = [group["step"] for group in fused.param_groups[:2]]
    assert [int(step) for step in steps] == [7, 7]
    assert all(isinstance(step, torch.Tensor) is capturable for step in steps)  # the type it had
    assert all("step" not in state for state in fused.state.values())  # nothing per parameter for TE
    fused.step()
    assert engine.optimizer_step_count(Wrapped(fused)) == 8


def test_torch_adam_keeps_its_per_parameter_count_even_when_its_groups_carry_a_stale_step():
    weights = params()
    adam = torch.optim.Adam(weights)
    for weight in weights:
        weight.grad = torch.ones(3)
    adam.step()
    adam.param_groups[0]["step"] = 40.0  # what megatron-core's distributed optimizer load leaves there
    assert engine.optimizer_step_count(Wrapped(adam)) == 1
    engine.set_optimizer_step_count(Wrapped(adam), 5)
    states = list(adam.state.values())
    assert [float(state["step"]) for state in states] == [5.0, 5.0]
    assert states[0]["step"] is not states[1]["step"]  # one tensor each: Adam increments in place


def weights_after_steps(ckpt_dir: str, overlap: bool, gather: bool, num_steps: int = 2):
    """(losses, this rank's parameters) after ``num_steps`` AdamW steps at DP 2 with the
    distributed optimizer, both overlaps ``overlap`` (forced on, as on GPUs), then the weights
    gathered as the trainer does before a save (``gather``)."""
    from megatron.core import parallel_state

    from megatron_sami.models.checkpoint import load_model
    from megatron_sami.runtime.distributed import megatron_runtime
    from megatron_sami.testing.lm import lm_forward_step, make_lm_batches

    import megatron_jobs as jobs

    config = jobs.load_model_config("tiny-llama")
    with megatron_runtime(ParallelConfig(), model=config, seed=99):
        model = build.build_gpt_model(config, ParallelConfig(), jobs.FP32, jobs.SEQ_LENGTH)
        load_model(model, ckpt_dir)
        settings = OptimizerSettings(lr=1e-3, overlap_grad_reduce=overlap, overlap_param_gather=overlap)
        ddp_model = engine.wrap_ddp(model, settings)
        optimizer = engine.build_optimizer(ddp_model, settings)
        rank = parallel_state.get_data_parallel_rank()
        losses = []
        for step in range(num_steps):
            (whole,) = make_lm_batches(1, 4, jobs.SEQ_LENGTH, config.vocab_size, seed=100 + step)
            mine = {key: value[2 * rank:2 * rank + 2] for key, value in whole.items()}
            result = engine.train_step(ddp_model, optimizer, lm_forward_step, iter([mine]), 1, jobs.SEQ_LENGTH, 2)
            losses.append(result.loss)
        if gather:
            engine.gather_parameters(ddp_model)
        return losses, [param.detach().clone() for param in model.parameters()]


@pytest.mark.slow
def test_overlapped_reduction_and_gather_train_the_same_weights_once_gathered(tmp_path):
    """Both overlaps on (gloo runs them too): the same losses and, after gather_parameters, the
    same weights as without; without the gather the weights lag one update behind."""
    from megatron_sami.testing.multiprocess import run_distributed

    import megatron_jobs as jobs

    ckpt = str(tmp_path / "ckpt")
    run_distributed(jobs.create_reference, 1, "tiny-llama", ckpt)
    (plain, _), (overlapped, _), (stale, _) = (run_distributed(weights_after_steps, 2, ckpt, *flags)
                                               for flags in ((False, True), (True, True), (True, False)))
    assert overlapped[0] == plain[0]
    assert all(torch.equal(a, b) for a, b in zip(overlapped[1], plain[1], strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(stale[1], plain[1], strict=True))
