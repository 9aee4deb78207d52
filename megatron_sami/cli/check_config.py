"""``sami-check-config``: validate a model + parallel layout + precision, and estimate per-GPU memory
of every phase, before spending GPU time.

    sami-check-config model=llama3-70b world_size=32 parallel.tensor=8 parallel.pipeline=4 iterate.recipe=llama3-70b
    sami-check-config model=mistral-7b world_size=8 iterate.recipe=mistral-7b \\
      "iterate.overrides=['train.data.seq_length=4096']" gpu_memory_gb=141

Prints the layout and a table of the memory each phase needs per GPU (training, MI scoring,
generation; :mod:`megatron_sami.models.memory` gives the formulas) for the training and generation
settings of ``iterate.recipe`` (``configs/recipe/<name>.yaml``; null: ``configs/iterate.yaml``)
with ``iterate.overrides`` (sami-iterate overrides) on top, or exits with code 2 and one sentence that names
the fix: a TP size that does not divide the KV heads, FP8 without a Hopper GPU, a layout whose
training does not fit ``gpu_memory_gb`` (with the change that makes it fit). Needs neither a GPU
nor torch.distributed. ``slurm/launcher.sh`` runs it with the template's recipe before any GPU time.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from megatron_sami.cli.common import run_hydra_app
from megatron_sami.cli.schemas import defaults_tree, register_iterate_schema, register_schema
from megatron_sami.errors import ConfigError
from megatron_sami.models import memory
from megatron_sami.models.catalogue import model_config_from_dict
from megatron_sami.models.config import PrecisionConfig
from megatron_sami.runtime.layout import ParallelConfig
from megatron_sami.typed_config import to_typed


@dataclass
class IterateChoice:
    """The sami-iterate settings whose phases are estimated: a recipe and overrides on top."""

    recipe: str | None = None  # configs/recipe/<name>.yaml; null: configs/iterate.yaml
    overrides: list[str] = field(default_factory=list)  # e.g. ['train.recompute_activations=true']


@dataclass
class CheckConfig:
    """What ``sami-check-config`` checks: a catalogue model on ``world_size`` ranks, and whether the
    phases of ``iterate.recipe`` fit ``gpu_memory_gb`` per GPU at that layout."""

    model: dict = field(default_factory=dict)  # the catalogue entry (configs/model/<name>.yaml)
    world_size: int = 8
    seq_length: int = 4096  # tokens per sequence (checked against sequence and context parallelism)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    iterate: IterateChoice = field(default_factory=IterateChoice)
    gpu_memory_gb: float = 80.0  # GiB per GPU (H100: 80, H200: 141)


def run_settings(cfg):
    """(IterateConfig, TrainConfig) of ``cfg.iterate.recipe`` with ``cfg.iterate.overrides``, composed as
    sami-iterate composes them.

    Raises:
        ConfigError: the recipe or an override does not compose, or a value is invalid.
    """
    from hydra import compose
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from megatron_sami.cli.common import _composition_error
    from megatron_sami.cli.iterate import iterate_config
    from megatron_sami.iteration.driver import train_settings

    name = f"recipe/{cfg.iterate.recipe}" if cfg.iterate.recipe else "iterate"
    try:
        composed = compose(config_name=name, overrides=["run_dir=-", "base.hf=-", *cfg.iterate.overrides])
    except (HydraException, OmegaConfBaseException) as err:
        raise ConfigError(f"cannot compose {name} for the memory estimate: {_composition_error(err, name)}") from err
    settings = iterate_config(composed)
    return settings, train_settings(settings)


def setups(cfg, model, parallel: ParallelConfig, data_parallel: int):
    """The memory model's inputs for this check: (layout, training setup, generation setup or None)."""
    settings, train = run_settings(cfg)
    sequences = train.queries_per_microbatch * settings.sampling.num_constitutions ** 2
    layout = memory.Layout(parallel.tensor, parallel.pipeline, parallel.expert, parallel.context, data_parallel,
                           parallel.sequence_parallel)
    setup = memory.TrainingSetup(
        params_dtype=train.precision.params_dtype, optimizer=train.optimizer.name,
        distributed_optimizer=train.optimizer.use_distributed_optimizer,
        momentum=train.optimizer.name == "rmsprop" and train.optimizer.rmsprop_momentum > 0,
        recompute=train.recompute_activations, seq_length=train.data.seq_length, microbatch_sequences=sequences,
        num_microbatches=train.microbatches_per_rank(data_parallel))
    generation = settings.generation
    engine = None
    if generation.backend == "vllm":
        engine = memory.GenerationSetup(
            tensor_parallel=generation.tensor_parallel,
            gpu_memory_utilization=generation.gpu_memory_utilization,
            max_model_len=generation.max_model_len or train.data.seq_length)
    return layout, setup, engine


def status(phase: memory.PhaseMemory) -> str:
    """``fits``, ``tight`` (above 90% of its budget) or ``DOES NOT FIT``."""
    return "DOES NOT FIT" if not phase.fits else "tight" if phase.tight else "fits"


def memory_table(phases: list[memory.PhaseMemory], gpu_memory_gb: float) -> str:
    """The estimate as a table, GiB per GPU."""
    lines = [f"memory per GPU (GiB of {gpu_memory_gb:g}; estimate, see megatron_sami/models/memory.py):",
             f"  {'phase':<9}{'weights':>9}{'grads':>8}{'optim':>8}{'activ':>8}{'total':>8}{'budget':>8}"]
    for phase in phases:
        values = (phase.weights, phase.gradients, phase.optimizer, phase.activations, phase.total, phase.budget)
        lines.append(f"  {phase.phase:<9}" + "".join(f"{value / memory.GIB:>{width}.1f}"
                                                     for value, width in zip(values, (9, 8, 8, 8, 8, 8), strict=True))
                     + f"  {status(phase)}: {phase.note}")
    return "\n".join(lines)


def refuse_if_too_large(cfg, model, layout, setup, phases: list[memory.PhaseMemory]) -> None:
    """Raise for the first phase that does not fit, naming a change that makes it fit.

    Raises:
        ConfigError: training or generation needs more than its budget.
    """
    gib = memory.GIB
    for phase in phases:
        if phase.fits:
            continue
        need = f"{phase.phase} needs {phase.total / gib:.1f} GiB per GPU but has {phase.budget / gib:.1f}"
        if phase.phase == "generate":
            raise ConfigError(f"{need} (vLLM weights {phase.weights / gib:.1f} GiB + the KV cache of one sequence); "
                              f"raise generation.tensor_parallel or gpu_memory_gb.")
        fixes = memory.training_fixes(model, layout, setup, cfg.gpu_memory_gb)
        fix = f"it fits with {' or '.join(fixes[:3])}" if fixes else "add GPUs with a larger TP x PP"
        raise ConfigError(f"{need} at gpu_memory_gb={cfg.gpu_memory_gb:g} (weights {phase.weights / gib:.1f}, "
                          f"gradients {phase.gradients / gib:.1f}, optimizer {phase.optimizer / gib:.1f}, "
                          f"activations {phase.activations / gib:.1f}); {fix}.")


def describe(cfg) -> str:
    """The layout of ``cfg`` (model, TP/PP/EP/CP/DP, precision) and the memory table of its phases.

    Raises:
        ConfigError: the model, layout or precision is invalid, or a phase does not fit
            ``gpu_memory_gb`` (the message names the fix).
    """
    model = model_config_from_dict(cfg.model)
    parallel = to_typed(ParallelConfig, cfg.parallel, "parallel")
    precision = to_typed(PrecisionConfig, cfg.precision, "precision")
    # No hardware check: this runs on login nodes and before GPU time; sami-train checks TE and the
    # GPU (PrecisionConfig.check_hardware) when it starts.
    if not float(cfg.gpu_memory_gb) > 0:
        raise ConfigError(f"gpu_memory_gb must be > 0 (GiB per GPU, e.g. 80 for H100, 141 for H200), got "
                          f"{cfg.gpu_memory_gb}.")
    data_parallel = parallel.validate(model, int(cfg.world_size), int(cfg.seq_length))
    total = model.num_parameters()
    layout, setup, engine = setups(cfg, model, parallel, data_parallel)
    phases = memory.estimate(model, layout, setup, engine, float(cfg.gpu_memory_gb))
    lines = [
        f"model {model.name}: {total / 1e9:.2f} B parameters, {model.num_layers} layers, "
        f"{model.num_attention_heads} heads / {model.num_query_groups} KV groups"
        + (f", {model.num_experts} experts top-{model.moe_router_topk}" if model.is_moe else ""),
        f"layout: world {cfg.world_size} = TP {parallel.tensor} x PP {parallel.pipeline} x CP {parallel.context} "
        f"x DP {data_parallel}; EP {parallel.expert}",
        f"precision: {precision.params_dtype}" + (f", fp8 {precision.fp8} ({precision.fp8_recipe})" if precision.fp8 else ""),
        f"recipe: {cfg.iterate.recipe or 'none (configs/iterate.yaml)'}",
        memory_table(phases, float(cfg.gpu_memory_gb)),
    ]
    if phases[0].fits and phases[0].tight:  # training within 10% of the GPU: name what leaves room
        room = memory.training_fixes(model, layout, setup, memory.TIGHT_FRACTION * float(cfg.gpu_memory_gb))
        lines.append("training is within 10% of the GPU (CUDA context, NCCL buffers and fragmentation are not "
                     "counted)" + (f"; {' or '.join(room[:3])} would leave room" if room else ""))
    print("\n".join(lines))
    refuse_if_too_large(cfg, model, layout, setup, phases)
    return "\n".join(lines)


def _task(cfg) -> None:
    describe(cfg)


def main() -> None:
    """``sami-check-config``: validate a model, layout and precision and estimate each phase's memory
    before spending GPU time (exit 2 on an invalid or too large one, with one sentence naming the fix)."""
    register_schema("check_config_schema", defaults_tree(CheckConfig))
    register_iterate_schema()
    run_hydra_app(_task, "check_config")


if __name__ == "__main__":
    main()
