"""``sami-check-config``: validate a model + parallel layout + precision before spending GPU time.

    sami-check-config model=llama3-70b world_size=32 parallel.tensor=8 parallel.pipeline=4

Prints the layout and a memory estimate per GPU, or exits with code 2 and one sentence that
names the fix (e.g. a TP size that does not divide the KV heads, FP8 without a Hopper GPU).
Needs neither a GPU nor torch.distributed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from megatron_sami.cli.common import run_hydra_app
from megatron_sami.cli.schemas import defaults_tree, register_schema
from megatron_sami.models.catalogue import model_config_from_dict
from megatron_sami.models.config import PrecisionConfig
from megatron_sami.runtime.layout import ParallelConfig
from megatron_sami.typed_config import to_typed

_GIB = 1024**3


@dataclass
class CheckConfig:
    """What ``sami-check-config`` checks: a catalogue model on ``world_size`` ranks."""

    model: dict = field(default_factory=dict)  # the catalogue entry (configs/model/<name>.yaml)
    world_size: int = 8
    seq_length: int = 4096  # tokens per sequence (checked against sequence and context parallelism)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)


def describe(cfg) -> str:
    """One paragraph describing the layout of ``cfg`` (model, TP/PP/EP/CP/DP, parameters per GPU).

    Raises:
        ConfigError: the model, layout or precision is invalid (the message names the fix).
    """
    model = model_config_from_dict(cfg.model)
    parallel = to_typed(ParallelConfig, cfg.parallel, "parallel")
    precision = to_typed(PrecisionConfig, cfg.precision, "precision")
    precision.check_hardware()
    data_parallel = parallel.validate(model, int(cfg.world_size), int(cfg.seq_length))
    total = model.num_parameters()
    # Weights split by TP x PP (experts further by EP); a rough upper bound per GPU.
    per_gpu = total / (parallel.tensor * parallel.pipeline * (parallel.expert if model.is_moe else 1))
    weight_bytes = 2 if precision.params_dtype == "bf16" else 4
    # Distributed optimizer: fp32 grads per GPU, fp32 master + Adam moments sharded over DP.
    state_bytes = 4 + (12 if precision.params_dtype == "bf16" else 8) / data_parallel
    lines = [
        f"model {model.name}: {total / 1e9:.2f} B parameters, {model.num_layers} layers, "
        f"{model.num_attention_heads} heads / {model.num_query_groups} KV groups"
        + (f", {model.num_experts} experts top-{model.moe_router_topk}" if model.is_moe else ""),
        f"layout: world {cfg.world_size} = TP {parallel.tensor} x PP {parallel.pipeline} x CP {parallel.context} "
        f"x DP {data_parallel}; EP {parallel.expert}",
        f"precision: {precision.params_dtype}" + (f", fp8 {precision.fp8} ({precision.fp8_recipe})" if precision.fp8 else ""),
        f"per GPU (upper bound, before activations): {per_gpu / 1e9:.2f} B parameters, "
        f"{per_gpu * (weight_bytes + state_bytes) / _GIB:.1f} GiB weights + grads + optimizer state",
    ]
    return "\n".join(lines)


def _task(cfg) -> None:
    print(describe(cfg))


def main() -> None:
    """``sami-check-config``: validate a model, layout and precision before spending GPU time (exit 2 on an
    invalid one, with one sentence naming the fix)."""
    register_schema("check_config_schema", defaults_tree(CheckConfig))
    run_hydra_app(_task, "check_config")


if __name__ == "__main__":
    main()
