"""The local layer spec's RMSNorm, usable under sequence parallelism.

megatron-core 0.19's local spec builds its norms with ``WrappedTorchNorm``
(``transformer/torch_norm.py``), which refuses sequence parallelism ("sequence parallel not
supported by torch LayerNorm"). The refusal is bookkeeping, not math: a norm acts on each token
alone, so it runs unchanged on a rank's shard of the sequence; but each TP rank then holds the
gradient of its own tokens only, and megatron-core sums those over the TP group only for the
parameters marked ``sequence_parallel`` (``distributed/finalize_model_grads.py``,
``_allreduce_non_tensor_model_parallel_grads``), as Transformer Engine's and apex's norms mark
theirs. :class:`SequenceParallelRMSNorm` is ``torch.nn.RMSNorm`` with that mark, so the local
lane (CPU, GPUs without Transformer Engine) runs sequence parallel too; its checkpoint keys and
values are those of ``torch.nn.RMSNorm``. Written against megatron-core 0.19.x.
"""

from __future__ import annotations

import torch

from megatron_sami.errors import ConfigError


class SequenceParallelRMSNorm(torch.nn.RMSNorm):
    """``torch.nn.RMSNorm`` over ``hidden_size`` whose weight carries megatron-core's
    ``sequence_parallel`` mark when ``config.sequence_parallel`` (its gradient is then summed over
    the TP group after backward, by megatron-core's ``finalize_model_grads``).

    Raises:
        ConfigError: ``config.normalization`` is not RMSNorm (the catalogue's models all use it).
    """

    def __init__(self, config, hidden_size: int, eps: float = 1e-5, **unused) -> None:
        if config.normalization != "RMSNorm":
            raise ConfigError(f"the local layer spec supports RMSNorm only, not {config.normalization}; "
                              "use a Llama-family model.")
        super().__init__(hidden_size, eps=eps)
        self.weight.sequence_parallel = bool(config.sequence_parallel)


def local_decoder_spec(layer_spec, config):
    """``GPTModel``'s decoder for the local lane: this rank's layers of ``layer_spec`` and
    :class:`SequenceParallelRMSNorm` as the final norm (given a layer spec, megatron-core 0.19's
    ``TransformerBlock`` takes its module-level ``LayerNormImpl``, ``WrappedTorchNorm`` without
    TE or apex, which refuses sequence parallelism)."""
    from megatron.core.transformer.transformer_block import (
        TransformerBlockSubmodules,
        get_num_layers_to_build,
    )

    return TransformerBlockSubmodules(layer_specs=[layer_spec] * get_num_layers_to_build(config),
                                      layer_norm=SequenceParallelRMSNorm)
