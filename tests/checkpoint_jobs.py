"""Rank bodies for checkpoint safety tests."""

from pathlib import Path

from megatron_sami.errors import SamiError
from megatron_sami.models.build import build_gpt_model
from megatron_sami.models.catalogue import load_model_config
from megatron_sami.models.checkpoint import load_model, save_model
from megatron_sami.models.config import PrecisionConfig
from megatron_sami.runtime.distributed import megatron_runtime
from megatron_sami.runtime.layout import ParallelConfig


def save_twice_then_load_missing(directory: str) -> list[str]:
    config = load_model_config("tiny-llama")
    parallel = ParallelConfig()
    errors = []
    with megatron_runtime(parallel, model=config):
        model = build_gpt_model(config, parallel, PrecisionConfig(params_dtype="fp32"), 32)
        save_model(model, Path(directory) / "ckpt")
        for attempt in (lambda: save_model(model, Path(directory) / "ckpt"),
                        lambda: load_model(model, Path(directory) / "missing"),
                        lambda: load_model(model, Path(directory) / "interrupted")):
            try:
                attempt()
            except SamiError as err:
                errors.append(str(err))
    return errors
