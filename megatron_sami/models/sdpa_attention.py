"""Core attention through ``torch.nn.functional.scaled_dot_product_attention`` for the local spec.

megatron-core's local ``DotProductAttention`` materialises the [b, heads, s, s] scores, masks
and softmaxes them in separate kernels and repeats the key/value groups; Transformer Engine's
attention is GPU-only. This module keeps megatron's interface (constructor arguments, [s, b,
heads, dim] inputs, [s, b, heads * dim] output per tensor-parallel rank) and lets torch pick its
fused kernel (flash or memory-efficient on GPU, the fused CPU kernel otherwise). It supports what
the SAMI models use: causal self-attention, grouped KV heads, a sliding window, no attention
bias, no packed sequences, no context parallelism. Unlike megatron's own causal attentions, it
applies an attention mask passed to its forward call (the shared-prompt layout's block-causal
mask) instead of ignoring it; without one it is causal.

Sliding window (``config.window_size`` = (left, 0), bounds inclusive as in Transformer Engine and
flash-attn: see :func:`megatron_sami.models.build.sliding_window_size`): each query sees the last
``left + 1`` keys of ITS OWN sequence, i.e. of the keys its mask lets it see. Without a mask that
is the index window of transformers' Mistral (``q - left <= k <= q``); with the shared-prompt
mask, a response token's sequence is the prompt followed by its own response, so the window is
counted over those keys (as in its pair sequence), not over row indices.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.utils import is_layer_window_attention


def window_visible(visible_BQK: torch.Tensor, window: int) -> torch.Tensor:
    """Keep, for each query, only the last ``window`` keys that ``visible_BQK`` lets it see.

    Args:
        visible_BQK: [..., s, s] bool, True = the query (row) may attend to the key (column);
            causal (no key after its query), as every SAMI mask is.
        window: keys per query, the query itself included (HF's ``sliding_window``).

    Returns:
        [..., s, s] bool, True = attend. Every query that saw a key still sees one (itself, or
        its last visible key), so no row becomes empty.
    """
    # Visible keys at or after each key, up to the query: 1 for the last visible key.
    from_end_BQK = visible_BQK.flip(-1).cumsum(-1, dtype=torch.int32).flip(-1)
    return visible_BQK & (from_end_BQK <= window)


class SDPAttention(MegatronModule):
    """Megatron's ``core_attention`` interface over torch's fused SDPA (module docstring)."""

    def __init__(self, config, layer_number: int, attn_mask_type: AttnMaskType, attention_type: str,
                 attention_dropout: float | None = None, softmax_scale: float | None = None,
                 cp_comm_type: str | None = None, pg_collection=None) -> None:
        """Megatron's ``DotProductAttention`` arguments; heads and groups are this TP rank's.

        Raises:
            ValueError: context parallelism, a window that looks ahead (right bound > 0), or
                query-key layer scaling (the Transformer Engine spec covers them).
        """
        super().__init__(config=config)
        from megatron.core.parallel_state import get_tensor_model_parallel_world_size

        if config.context_parallel_size != 1:
            raise ValueError("SDPAttention does not support context parallelism.")
        tp_size = pg_collection.tp.size() if pg_collection is not None and hasattr(pg_collection, "tp") \
            else get_tensor_model_parallel_world_size()
        self.attn_mask_type = attn_mask_type
        self.heads = config.num_attention_heads // tp_size
        self.groups = config.num_query_groups // tp_size
        self.softmax_scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(config.kv_channels)
        if config.apply_query_key_layer_scaling:
            raise ValueError("SDPAttention does not implement apply_query_key_layer_scaling.")
        self.dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        self.window = None  # keys per query, itself included; None: unlimited
        if is_layer_window_attention(config.window_size, config.window_attn_skip_freq, layer_number):
            left, right = config.window_size
            if right != 0:
                raise ValueError(f"SDPAttention is causal; window_size {config.window_size} looks ahead.")
            self.window = None if left < 0 else left + 1

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask,
                attn_mask_type: AttnMaskType | None = None, attention_bias=None, packed_seq_params=None,
                **unused) -> torch.Tensor:
        """Attention of one layer.

        Args:
            query: [s, b, heads, dim]; ``key``, ``value``: [s, b, groups, dim].
            attention_mask: None (causal), or [b or 1, 1, s, s] bool with True = masked out
                (megatron's convention), used as given (and narrowed by the sliding window).

        Returns:
            [s, b, heads * dim].

        Raises:
            ValueError: an attention bias or packed sequences.
        """
        if attention_bias is not None or packed_seq_params is not None:
            raise ValueError("SDPAttention supports neither attention bias nor packed sequences.")
        mask_type = attn_mask_type or self.attn_mask_type
        seq = query.shape[0]
        # A mask given with the forward call is used as is, also in a causal layer: the SAMI step
        # passes one only for shared prompts, where it is block-causal (see alignment/shared_prompt.py).
        visible = None if attention_mask is None else ~attention_mask  # SDPA keeps True positions
        if self.window is not None and seq > self.window:  # shorter sequences fit in the window
            causal_QK = torch.ones(seq, seq, dtype=torch.bool, device=query.device).tril()
            visible = window_visible(causal_QK if visible is None else visible & causal_QK, self.window)
        causal = mask_type == AttnMaskType.causal and visible is None
        # [s, b, heads, dim] -> [b, heads, s, dim]; each query head uses KV group head // (heads / groups)
        query, key, value = (x.permute(1, 2, 0, 3) for x in (query, key, value))
        grouped = self.heads != self.groups
        # torch's flash and cuDNN kernels read grouped K/V directly; with a mask (memory-efficient
        # kernel) or in fp32, enable_gqa falls back to the math kernel, so K/V are repeated there.
        native_gqa = grouped and visible is None and query.dtype in (torch.bfloat16, torch.float16)
        if grouped and not native_gqa:
            key = key.repeat_interleave(self.heads // self.groups, dim=1)
            value = value.repeat_interleave(self.heads // self.groups, dim=1)
        context = F.scaled_dot_product_attention(query, key, value, attn_mask=visible, is_causal=causal,
                                                 dropout_p=self.dropout if self.training else 0.0,
                                                 scale=self.softmax_scale, enable_gqa=native_gqa)
        batch = context.shape[0]
        return context.permute(2, 0, 1, 3).reshape(seq, batch, self.heads * context.shape[3])
