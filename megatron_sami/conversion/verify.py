"""Compare a converted Megatron checkpoint with its HF source by outputs (collective).

Logits of the same token batch (max absolute difference, KL divergence of the next-token
distributions) and greedy decoding agreement over N new tokens. Runs at any TP/PP/EP layout.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from megatron_sami.errors import ConversionError
from megatron_sami.models.gpt_ops import gather_vocab, position_ids_like, tensor_parallel_size
from megatron_sami.training.engine import forward_backward, last_stage_result


def megatron_logits(model: torch.nn.Module, tokens_BT: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Full-vocabulary logits of ``tokens_BT`` at any layout, returned on every rank (collective).

    Args:
        model: this rank's part of a ``GPTModel`` (any TP/PP/EP); put in eval mode here.
        tokens_BT: [B, T] int64 token ids, the same on every rank.
        vocab_size: the real vocabulary size V (the model's padded rows are cut off).

    Returns:
        [B, T, V] fp32 logits on the CPU, whatever device the model is on.

    The sequence is right-padded to a multiple of TP (sequence parallelism needs it); causal
    attention keeps the real positions unaffected, and the padding is cut off again.
    """
    model.eval()
    # The batch is made on the CPU; the model may live on a GPU (F.embedding needs the ids
    # on the weights' device). The logits come back to the CPU, where the reference's are.
    tokens_BT = tokens_BT.to(next(model.parameters()).device)
    real_length = tokens_BT.shape[1]
    padding = -real_length % tensor_parallel_size()
    if padding:
        tokens_BT = torch.cat([tokens_BT, tokens_BT.new_zeros(tokens_BT.shape[0], padding)], dim=1)

    def forward_step(data_iterator, module):
        batch_BT = next(data_iterator)
        output = module(batch_BT, position_ids_like(batch_BT), None)

        def gather(output_BTV, non_loss_data=False):
            return gather_vocab(output_BTV, vocab_size)

        return output, gather

    with torch.no_grad():
        collected = forward_backward(model, forward_step, iter([tokens_BT]), num_microbatches=1,
                                     seq_length=tokens_BT.shape[1], micro_batch_size=tokens_BT.shape[0],
                                     forward_only=True, collect_non_loss_data=True)
    shape = (tokens_BT.shape[0], tokens_BT.shape[1], vocab_size)
    logits_BTV = last_stage_result(collected[0] if collected else None, shape)
    return logits_BTV[:, :real_length].cpu()


def greedy_tokens(next_logits, prompt_BT: torch.Tensor, num_new: int) -> torch.Tensor:
    """Greedy decoding without a cache: ``next_logits(tokens_BT) -> [B, T, V]``; returns the
    ``num_new`` chosen tokens after ``prompt_BT`` [B, T] as [B, num_new] int64."""
    tokens = prompt_BT
    for _ in range(num_new):
        step = next_logits(tokens)[:, -1].argmax(dim=-1, keepdim=True)
        tokens = torch.cat([tokens, step], dim=1)
    return tokens[:, prompt_BT.shape[1]:]


@dataclass
class Comparison:
    """How far a candidate's outputs are from the reference's (logits in nats, KL in nats per token)."""

    max_abs_logit_diff: float
    kl_divergence: float
    greedy_agreement: float

    def within(self, logit_tolerance: float, kl_tolerance: float, min_agreement: float) -> bool:
        """Whether every measure is within its tolerance (agreement is a fraction in [0, 1])."""
        return (self.max_abs_logit_diff <= logit_tolerance and self.kl_divergence <= kl_tolerance
                and self.greedy_agreement >= min_agreement)


def compare(reference_BTV: torch.Tensor, candidate_BTV: torch.Tensor, reference_new: torch.Tensor,
            candidate_new: torch.Tensor) -> Comparison:
    """Compare logits [B, T, V] (max |difference|, mean KL(reference || candidate) of the
    next-token distributions) and greedy continuations [B, N] (fraction of equal tokens)."""
    ref_logp = reference_BTV.double().log_softmax(-1)
    cand_logp = candidate_BTV.double().log_softmax(-1)
    kl = (ref_logp.exp() * (ref_logp - cand_logp)).sum(-1).mean()
    return Comparison(
        max_abs_logit_diff=float((reference_BTV.float() - candidate_BTV.float()).abs().max()),
        kl_divergence=float(kl),
        greedy_agreement=float((reference_new == candidate_new).float().mean()),
    )


def hf_reference(hf_dir: Path, tokens_BT: torch.Tensor, num_new: int, dtype: torch.dtype):
    """Logits [B, T, V] (fp32) and greedy continuation [B, num_new] of ``tokens_BT`` [B, T] from
    transformers' ``from_pretrained(hf_dir)`` in ``dtype`` (the reference implementation)."""
    from transformers import AutoModelForCausalLM

    from megatron_sami.device_budget import check_hf_model

    check_hf_model(hf_dir, f"verify's transformers reference (the whole model {hf_dir})",
                   "verify where one process may hold the whole model (unset SAMI_DEVICE_BUDGET_PARAMS)")
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=dtype)
    model.eval()

    def next_logits(batch_BT):
        with torch.no_grad():
            return model(batch_BT).logits.float()

    return next_logits(tokens_BT), greedy_tokens(next_logits, tokens_BT, num_new)


# The ModelConfig fields that decide a model's outputs; the name, the weights' source and the
# number of positions (which does not change logits at the lengths verify runs) may differ.
OUTPUT_FIELDS = ("hf_architecture", "num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
                 "num_query_groups", "head_dim", "vocab_size", "norm_epsilon", "rotary_base", "rope_scaling",
                 "tie_word_embeddings", "sliding_window", "num_experts", "moe_router_topk")


def check_matches_checkpoint(hf_dir: Path, ckpt_dir: Path) -> None:
    """Refuse to verify a checkpoint against an HF model of another architecture, whose logits
    cannot be compared (a smaller vocabulary fails inside transformers' embedding with an
    IndexError); reads only ``config.json`` and ``model.yaml``.

    Raises:
        ConversionError: the configs differ (the fields are named), or either directory is
            not what ``verify`` needs.
    """
    from megatron_sami.conversion.hf_io import model_config_from_hf, read_hf_config
    from megatron_sami.models.checkpoint_dir import read_checkpoint_model

    checkpoint, _ = read_checkpoint_model(Path(ckpt_dir))
    reference = model_config_from_hf(read_hf_config(Path(hf_dir)), checkpoint.name)
    differences = [f"{name} {getattr(reference, name)} vs {getattr(checkpoint, name)}"
                   for name in OUTPUT_FIELDS if getattr(reference, name) != getattr(checkpoint, name)]
    if differences:
        raise ConversionError(
            f"the HF model at {hf_dir} is not the model of the checkpoint at {ckpt_dir} "
            f"({'; '.join(differences[:4])}, HF vs checkpoint); verify compares a checkpoint with "
            "the HF model it was converted from.")
