"""``sami-check-config``: validate a model + parallel layout + precision, and estimate per-GPU memory
of every phase, before spending GPU time.

    sami-check-config model=llama3-70b world_size=32 parallel.tensor=8 parallel.pipeline=4 iterate.recipe=llama3-70b
    sami-check-config model=mistral-7b world_size=8 iterate.recipe=mistral-7b \\
      "iterate.overrides=['train.data.seq_length=4096']" gpu_memory_gb=141

Prints the layout and a table of the memory each phase needs per GPU (training, MI scoring,
generation; :mod:`megatron_sami.models.memory` gives the formulas) for the settings the run will use:
those of ``iterate.recipe`` (``configs/recipe/<name>.yaml``; null: ``configs/iterate.yaml``), with the
top-level ``precision.*`` and ``seq_length`` (when set) and then ``iterate.overrides`` (sami-iterate
overrides) on top. The layout is checked at that run's sequence length. Exits with code 2 and one
sentence that names the fix: a TP size that does not divide the KV heads, a layout whose phases do
not fit ``gpu_memory_gb`` (with the exact sami-iterate overrides after which it fits). Needs neither
a GPU nor torch.distributed; FP8 hardware is checked by sami-train when it starts.
``slurm/launcher.sh`` runs it with the template's recipe before any GPU time.
"""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass, field

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
    overrides: list[str] = field(default_factory=list)  # e.g. ['train.recompute_activations=full']


@dataclass
class RunPrecision:
    """Precision of the checked run; each key left null is the run's (``train.precision.*`` of the
    recipe), each one set replaces it, as ``train.precision.<key>`` would (see PrecisionConfig)."""

    params_dtype: str | None = None
    fp8: str | None = None
    fp8_recipe: str | None = None
    peak_tflops: float | None = None


@dataclass
class CheckConfig:
    """What ``sami-check-config`` checks: a catalogue model on ``world_size`` ranks, and whether the
    phases of ``iterate.recipe`` fit ``gpu_memory_gb`` per GPU at that layout."""

    model: dict = field(default_factory=dict)  # the catalogue entry (configs/model/<name>.yaml)
    world_size: int = 8
    seq_length: int | None = None  # tokens per sequence; null: the run's train.data.seq_length
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    precision: RunPrecision = field(default_factory=RunPrecision)
    iterate: IterateChoice = field(default_factory=IterateChoice)
    gpu_memory_gb: float = 80.0  # GiB per GPU (H100: 80, H200: 141)


def top_level_overrides(cfg) -> dict[str, object]:
    """The run settings given at the top level (``precision.*``, ``seq_length``) as the sami-iterate
    keys they stand for: ``{"train.precision.params_dtype": "fp32", ...}``; null ones left out."""
    values = {f"train.precision.{key}": cfg.precision[key] for key in RunPrecision.__dataclass_fields__}
    values["train.data.seq_length"] = cfg.seq_length
    return {key: value for key, value in values.items() if value is not None}


def run_settings(cfg):
    """(IterateConfig, TrainConfig) of ``cfg.iterate.recipe`` with the top-level layout as
    ``train.parallel.*``, the top-level run settings (:func:`top_level_overrides`) and then
    ``cfg.iterate.overrides``, composed as sami-iterate composes them.

    Raises:
        ConfigError: the recipe or an override does not compose, a value is invalid, or
            ``iterate.overrides`` sets a top-level setting to another value.
    """
    from hydra import compose
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from megatron_sami.alignment.scoring import override_arg
    from megatron_sami.cli.common import _composition_error
    from megatron_sami.cli.iterate import iterate_config
    from megatron_sami.iteration.driver import train_settings
    from megatron_sami.typed_config import flatten

    name = f"recipe/{cfg.iterate.recipe}" if cfg.iterate.recipe else "iterate"
    given = top_level_overrides(cfg)
    # The top-level layout is the run's train.parallel.*, which iterate.overrides may refine (the
    # launcher's SAMI_ITERATE_ARGS reach only those): the check uses the layout the run will use.
    layout = [override_arg(f"train.parallel.{key}", cfg.parallel[key]) for key in (spec.name for spec in dataclasses.fields(ParallelConfig))
              if cfg.parallel[key] is not None]
    overrides = ["run_dir=-", "base.hf=-", *layout, *(override_arg(key, value) for key, value in given.items()),
                 *cfg.iterate.overrides]
    try:
        composed = compose(config_name=name, overrides=overrides)
    except (HydraException, OmegaConfBaseException) as err:
        raise ConfigError(f"cannot compose {name} for the memory estimate: {_composition_error(err, name)}") from err
    settings = iterate_config(composed)
    train = train_settings(settings)
    resolved = {f"train.{key}": value for key, value in flatten(asdict(train)).items()}
    for key, value in given.items():
        if resolved[key] != value:
            top = key.removeprefix("train.").removeprefix("data.")
            raise ConfigError(f"{top}={value} but iterate.overrides sets {key}={resolved[key]}; give the setting "
                              f"once.")
    return settings, train


def setups(cfg, model, parallel: ParallelConfig, data_parallel: int, settings=None, train=None):
    """The memory model's inputs for this check: (layout, training setup, generation setup or
    None, scoring setup or None). ``settings``, ``train``: :func:`run_settings`, composed if not given."""
    from megatron_sami.rollout.constitutions import max_constitutions

    if settings is None:
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
    evaluation, scoring = settings.evaluation, None
    if evaluation.enabled:  # sami-score's microbatches hold C x C sequences of the evaluation's C
        eval_c = max_constitutions(evaluation.principles_per_query)
        scoring = memory.ScoringSetup(microbatch_sequences=train.queries_per_microbatch * eval_c ** 2,
                                      seq_length=train.data.seq_length, scorer=evaluation.scorer)
    generation = settings.generation
    engine = None
    if generation.backend == "vllm":
        engine = memory.GenerationSetup(
            tensor_parallel=generation.tensor_parallel,
            gpu_memory_utilization=generation.gpu_memory_utilization,
            max_model_len=generation.max_model_len or train.data.seq_length)
    return layout, setup, engine, scoring


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
    """Raise for the first phase that does not fit, naming the exact sami-iterate overrides after
    which it fits.

    Raises:
        ConfigError: training, scoring or generation needs more than its budget.
    """
    gib = memory.GIB
    for phase in phases:
        if phase.fits:
            continue
        need = f"{phase.phase} needs {phase.total / gib:.1f} GiB per GPU but has {phase.budget / gib:.1f}"
        if phase.phase == "generate":
            raise ConfigError(f"{need} (vLLM weights {phase.weights / gib:.1f} GiB + the KV cache of one sequence); "
                              f"raise generation.tensor_parallel or gpu_memory_gb.")
        if phase.phase == "score" and phase.note.startswith("evaluation.scorer=hf"):
            raise ConfigError(f"{need} ({phase.note}); set evaluation.scorer=megatron (scored at the training "
                              f"layout) or evaluation.enabled=false.")
        if phase.phase == "score":
            raise ConfigError(f"{need} (weights {phase.weights / gib:.1f}, activations {phase.activations / gib:.1f} "
                              f"for {phase.note}); lower train.queries_per_microbatch or "
                              f"evaluation.principles_per_query.")
        fixes = memory.training_fixes(model, layout, setup, cfg.gpu_memory_gb)
        fix = f"it fits with {' or with '.join(fixes[:3])}" if fixes else "no single change makes it fit"
        raise ConfigError(f"{need} at gpu_memory_gb={cfg.gpu_memory_gb:g} (weights {phase.weights / gib:.1f}, "
                          f"gradients {phase.gradients / gib:.1f}, optimizer {phase.optimizer / gib:.1f}, "
                          f"activations {phase.activations / gib:.1f}); {fix}.")


def describe(cfg) -> str:
    """The layout of ``cfg`` (model, TP/PP/EP/CP/DP, the run's precision) and the memory table of
    its phases.

    Raises:
        ConfigError: the model, layout or precision is invalid, or a phase does not fit
            ``gpu_memory_gb`` (the message names the fix).
    """
    model = model_config_from_dict(cfg.model)
    parallel = to_typed(ParallelConfig, cfg.parallel, "parallel")
    # No hardware check: this runs on login nodes and before GPU time; sami-train checks TE and the
    # GPU (PrecisionConfig.check_hardware) when it starts.
    if not float(cfg.gpu_memory_gb) > 0:
        raise ConfigError(f"gpu_memory_gb must be > 0 (GiB per GPU, e.g. 80 for H100, 141 for H200), got "
                          f"{cfg.gpu_memory_gb}.")
    settings, train = run_settings(cfg)
    parallel = train.parallel  # the top-level layout refined by iterate.overrides (run_settings)
    precision: PrecisionConfig = train.precision
    data_parallel = parallel.validate(model, int(cfg.world_size), train.data.seq_length)
    total = model.num_parameters()
    layout, setup, engine, scoring = setups(cfg, model, parallel, data_parallel, settings, train)
    phases = memory.estimate(model, layout, setup, engine, float(cfg.gpu_memory_gb), scoring)
    lines = [
        f"model {model.name}: {total / 1e9:.2f} B parameters, {model.num_layers} layers, "
        f"{model.num_attention_heads} heads / {model.num_query_groups} KV groups"
        + (f", {model.num_experts} experts top-{model.moe_router_topk}" if model.is_moe else ""),
        f"layout: world {cfg.world_size} = TP {parallel.tensor} x PP {parallel.pipeline} x CP {parallel.context} "
        f"x DP {data_parallel}; EP {parallel.expert}",
        f"precision: {precision.params_dtype}" + (f", fp8 {precision.fp8} ({precision.fp8_recipe})" if precision.fp8 else "")
        + f"; sequences of {train.data.seq_length} tokens",
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
