"""A plain language-modelling objective for the Megatron schedule (tests and the foundation demo).

Token-mean cross-entropy under a loss mask: the objective of the foundation's invariance
tests and of the demo. The SAMI objective plugs into the same ``forward_step_func`` contract.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from megatron_sami.models.gpt_ops import on_model_device, position_ids_like


def make_lm_batches(
    num_batches: int, micro_batch_size: int, seq_length: int, vocab_size: int, seed: int
) -> list[dict[str, torch.Tensor]]:
    """Deterministic random token batches (next-token labels, full loss mask)."""
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(num_batches):
        sequence = torch.randint(0, vocab_size, (micro_batch_size, seq_length + 1), generator=generator)
        batches.append({
            "tokens": sequence[:, :-1].contiguous(),
            "labels": sequence[:, 1:].contiguous(),
            "loss_mask": torch.ones(micro_batch_size, seq_length),
        })
    return batches


def lm_forward_step(data_iterator: Iterator[dict[str, torch.Tensor]], model: torch.nn.Module):
    """``forward_step_func`` for Megatron-Core's schedules: masked token-mean cross-entropy."""
    batch = on_model_device(next(data_iterator), model)
    tokens_BT, labels_BT, mask_BT = batch["tokens"], batch["labels"], batch["loss_mask"].float()
    nll_BT = model(tokens_BT, position_ids_like(tokens_BT), None, labels=labels_BT)

    def loss_func(nll_BT: torch.Tensor):
        loss = (nll_BT.float() * mask_BT).sum() / mask_BT.sum().clamp(min=1)
        # The schedule divides the returned loss in place: log a copy.
        return loss, {"loss": loss.detach().clone()}

    return nll_BT, loss_func
