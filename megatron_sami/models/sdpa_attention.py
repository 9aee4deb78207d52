"""Core attention through ``torch.nn.functional.scaled_dot_product_attention`` for the local spec.

megatron-core's local ``DotProductAttention`` materialises the [b, heads, s, s] scores, masks
and softmaxes them in separate kernels and repeats the key/value groups; Transformer Engine's
attention is GPU-only. This module keeps megatron's interface (constructor arguments, [s, b,
heads, dim] inputs, [s, b, heads * dim] output per tensor-parallel rank) and lets torch pick its
fused kernel (flash or memory-efficient on GPU, the fused CPU kernel otherwise). It supports what
the SAMI models use: causal self-attention, grouped KV heads, no attention bias, no packed
sequences, no context parallelism. Unlike megatron's own causal attentions, it applies an
attention mask passed to its forward call (the shared-prompt layout's block-causal mask) instead
of ignoring it; without one it is causal.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule


class SDPAttention(MegatronModule):
    """Megatron's ``core_attention`` interface over torch's fused SDPA (module docstring)."""

    def __init__(self, config, layer_number: int, attn_mask_type: AttnMaskType, attention_type: str,
                 attention_dropout: float | None = None, softmax_scale: float | None = None,
                 cp_comm_type: str | None = None, pg_collection=None) -> None:
        """Megatron's ``DotProductAttention`` arguments; heads and groups are this TP rank's.

        Raises:
            ValueError: context parallelism, a sliding window, or query-key layer scaling (the
                Transformer Engine spec covers them).
        """
        super().__init__(config=config)
        from megatron.core.parallel_state import get_tensor_model_parallel_world_size

        if config.context_parallel_size != 1:
            raise ValueError("SDPAttention does not support context parallelism.")
        if config.window_size is not None:
            raise ValueError("SDPAttention has no sliding window; the Transformer Engine spec applies it.")
        tp_size = pg_collection.tp.size() if pg_collection is not None and hasattr(pg_collection, "tp") \
            else get_tensor_model_parallel_world_size()
        self.attn_mask_type = attn_mask_type
        self.heads = config.num_attention_heads // tp_size
        self.groups = config.num_query_groups // tp_size
        self.softmax_scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(config.kv_channels)
        if config.apply_query_key_layer_scaling:
            raise ValueError("SDPAttention does not implement apply_query_key_layer_scaling.")
        self.dropout = config.attention_dropout if attention_dropout is None else attention_dropout

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask,
                attn_mask_type: AttnMaskType | None = None, attention_bias=None, packed_seq_params=None,
                **unused) -> torch.Tensor:
        """Attention of one layer.

        Args:
            query: [s, b, heads, dim]; ``key``, ``value``: [s, b, groups, dim].
            attention_mask: None (causal), or [b or 1, 1, s, s] bool with True = masked out
                (megatron's convention), used as given.

        Returns:
            [s, b, heads * dim].

        Raises:
            ValueError: an attention bias or packed sequences.
        """
        if attention_bias is not None or packed_seq_params is not None:
            raise ValueError("SDPAttention supports neither attention bias nor packed sequences.")
        mask_type = attn_mask_type or self.attn_mask_type
        # A mask given with the forward call is used as is, also in a causal layer: the SAMI step
        # passes one only for shared prompts, where it is block-causal (see alignment/shared_prompt.py).
        causal = mask_type == AttnMaskType.causal and attention_mask is None
        if attention_mask is not None:
            attention_mask = ~attention_mask  # megatron masks True positions; SDPA keeps True positions
        # [s, b, heads, dim] -> [b, heads, s, dim]; each query head uses KV group head // (heads / groups)
        query, key, value = (x.permute(1, 2, 0, 3) for x in (query, key, value))
        if self.heads != self.groups:
            key = key.repeat_interleave(self.heads // self.groups, dim=1)
            value = value.repeat_interleave(self.heads // self.groups, dim=1)
        context = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, is_causal=causal,
                                                 dropout_p=self.dropout if self.training else 0.0,
                                                 scale=self.softmax_scale)
        seq, batch = context.shape[2], context.shape[0]
        return context.permute(2, 0, 1, 3).reshape(seq, batch, self.heads * context.shape[3])
