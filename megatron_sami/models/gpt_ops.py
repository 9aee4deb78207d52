"""Operations on a megatron-core ``GPTModel`` that callers outside the seam use.

The SAMI step, conversion verification and the test objectives call these instead of reaching
into ``GPTModel`` or megatron-core themselves.
"""

from __future__ import annotations

import torch


def position_ids_like(tokens_BT: torch.Tensor) -> torch.Tensor:
    """Positions 0..T-1 for every row of ``tokens_BT`` [B, T] (int64, same device), as [B, T]."""
    return torch.arange(tokens_BT.shape[1], device=tokens_BT.device).unsqueeze(0).expand_as(tokens_BT)


def on_model_device(batch: dict[str, torch.Tensor], model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The batch's tensors on the device of the model's parameters (batches are made on the CPU)."""
    device = next(model.parameters()).device
    return {key: value.to(device, non_blocking=True) for key, value in batch.items()}
