"""Compare a converted Megatron checkpoint with its HF source by outputs (collective).

Logits of the same token batch (max absolute difference, KL divergence of the next-token
distributions) and greedy decoding agreement over N new tokens. Runs at any TP/PP/EP layout.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_sami.models.gpt_ops import position_ids_like


def megatron_logits(model: torch.nn.Module, tokens_BT: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Full-vocabulary logits of ``tokens_BT`` at any layout, returned on every rank.

    The sequence is right-padded to a multiple of TP (sequence parallelism needs it); causal
    attention keeps the real positions unaffected, and the padding is cut off again.
    """
    from megatron.core import parallel_state, tensor_parallel
    from megatron.core.pipeline_parallel import get_forward_backward_func

    model.eval()
    real_length = tokens_BT.shape[1]
    tp = parallel_state.get_tensor_model_parallel_world_size()
    padding = -real_length % tp
    if padding:
        tokens_BT = torch.cat([tokens_BT, tokens_BT.new_zeros(tokens_BT.shape[0], padding)], dim=1)

    def forward_step(data_iterator, module):
        batch_BT = next(data_iterator)
        output = module(batch_BT, position_ids_like(batch_BT), None)

        def gather(output_BTV, non_loss_data=False):
            return tensor_parallel.gather_from_tensor_model_parallel_region(output_BTV)[..., :vocab_size]

        return output, gather

    with torch.no_grad():
        collected = get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=iter([tokens_BT]), model=[model], num_microbatches=1,
            seq_length=tokens_BT.shape[1], micro_batch_size=tokens_BT.shape[0], forward_only=True,
            collect_non_loss_data=True)
    shape = (tokens_BT.shape[0], tokens_BT.shape[1], vocab_size)
    # contiguous: GPTModel returns a transposed view, and gloo reduces raw storage.
    logits = collected[0].float().contiguous() if parallel_state.is_pipeline_last_stage() else torch.zeros(shape)
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        dist.all_reduce(logits, group=parallel_state.get_pipeline_model_parallel_group())
    return logits[:, :real_length]


def greedy_tokens(next_logits, prompt_BT: torch.Tensor, num_new: int) -> torch.Tensor:
    """Greedy decoding without a cache: ``next_logits(tokens) -> [B, T, V]``."""
    tokens = prompt_BT
    for _ in range(num_new):
        step = next_logits(tokens)[:, -1].argmax(dim=-1, keepdim=True)
        tokens = torch.cat([tokens, step], dim=1)
    return tokens[:, prompt_BT.shape[1]:]


@dataclass
class Comparison:
    max_abs_logit_diff: float
    kl_divergence: float
    greedy_agreement: float

    def within(self, logit_tolerance: float, kl_tolerance: float, min_agreement: float) -> bool:
        return (self.max_abs_logit_diff <= logit_tolerance and self.kl_divergence <= kl_tolerance
                and self.greedy_agreement >= min_agreement)


def compare(reference_BTV: torch.Tensor, candidate_BTV: torch.Tensor, reference_new: torch.Tensor,
            candidate_new: torch.Tensor) -> Comparison:
    ref_logp = reference_BTV.double().log_softmax(-1)
    cand_logp = candidate_BTV.double().log_softmax(-1)
    kl = (ref_logp.exp() * (ref_logp - cand_logp)).sum(-1).mean()
    return Comparison(
        max_abs_logit_diff=float((reference_BTV.float() - candidate_BTV.float()).abs().max()),
        kl_divergence=float(kl),
        greedy_agreement=float((reference_new == candidate_new).float().mean()),
    )


def hf_reference(hf_dir: Path, tokens_BT: torch.Tensor, num_new: int, dtype: torch.dtype):
    """Logits and greedy continuation from transformers (the reference implementation)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=dtype)
    model.eval()

    def next_logits(batch_BT):
        with torch.no_grad():
            return model(batch_BT).logits.float()

    return next_logits(tokens_BT), greedy_tokens(next_logits, tokens_BT, num_new)
