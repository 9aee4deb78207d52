"""Rank bodies that only make sense on a CUDA machine."""


from megatron_sami.models.build import Backend, build_gpt_model
from megatron_sami.models.catalogue import load_model_config
from megatron_sami.models.config import PrecisionConfig
from megatron_sami.runtime import cpu_compat
from megatron_sami.runtime.distributed import megatron_runtime
from megatron_sami.runtime.layout import ParallelConfig
from megatron_sami.testing.lm import lm_forward_step, make_lm_batches


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
