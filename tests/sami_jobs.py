"""Fixtures and rank bodies for the SAMI step tests: a tiny HF model with a real tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from megatron_sami.alignment.data import PromptTemplate, SamiRecord, collate, tokenize_records
from megatron_sami.alignment.objective import SamiLossConfig, sequence_logprobs
from megatron_sami.alignment.step import sami_forward_step, score_matrices
from megatron_sami.models import checkpoint_dir
from megatron_sami.runtime.distributed import megatron_runtime
from megatron_sami.runtime.layout import ParallelConfig
from megatron_sami.training.engine import forward_backward, reduce_logs

SEQ_LENGTH = 128
TEMPLATE = PromptTemplate(name="test", prompt="Principles:\n{constitution}\n\nHuman: {query}\n\nAssistant:")
QUERIES = ["How do I bake bread?", "What is a constitution?", "Summarise the post.", "Be brief.",
           "Tell me a story.", "Why is the sky blue?", "Help me plan a trip.", "Explain rain."]
CONSTITUTIONS = ["1. Be helpful.\n2. Be harmless.", "1. Be unhelpful.\n2. Be harmful.",
                 "1. Be helpful.\n2. Be harmful."]


def make_tiny_sami_model(root: Path, variant: str = "llama") -> tuple[Path, Path]:
    """A tiny Llama (or another variant of ``megatron_sami.testing.tiny``) with a real tokenizer,
    as an HF directory and converted: (hf_dir, ckpt_dir)."""
    import conversion_jobs

    from megatron_sami.testing.multiprocess import run_distributed
    from megatron_sami.testing.tiny import make_tiny_tokenizer

    hf_dir = root / "hf"
    tokenizer = make_tiny_tokenizer(hf_dir)
    conversion_jobs.make_hf_model(variant, hf_dir, seed=5, vocab_size=len(tokenizer))
    run_distributed(conversion_jobs.to_megatron, 1, str(hf_dir), str(root / "ckpt"))
    return hf_dir, root / "ckpt"


def make_training_inputs(root: Path) -> Path:
    """A tiny converted Llama (``root/hf``, ``root/ckpt``) and 8 records with a learnable signal
    (responses that depend on the constitution) in ``root/records.jsonl``; returns ``root``."""
    make_tiny_sami_model(root)
    records = [SamiRecord(f"q{i}", QUERIES[i % 8], CONSTITUTIONS[:2],
                          [f"Yes, gladly: step {i} is to help.", f"No. I refuse to do {i}."]) for i in range(8)]
    write_records(root / "records.jsonl", records)
    return root


def make_records(num_queries: int, num_constitutions: int) -> list[SamiRecord]:
    records = []
    for q in range(num_queries):
        responses = [f"Answer {j} to {QUERIES[q % len(QUERIES)].lower()} " + "yes " * (j + q % 3)
                     for j in range(num_constitutions)]
        records.append(SamiRecord(f"q{q}", QUERIES[q % len(QUERIES)], CONSTITUTIONS[:num_constitutions], responses))
    return records


def write_records(path: Path, records: list[SamiRecord]) -> Path:
    with path.open("w") as out:
        for r in records:
            out.write(json.dumps({"id": r.id, "query": r.query, "constitutions": r.constitutions,
                                  "responses": r.responses}) + "\n")
    return path


def tokenized(tokenizer_dir: str, num_queries: int, num_constitutions: int) -> list[dict]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    items, _ = tokenize_records(make_records(num_queries, num_constitutions), tokenizer, TEMPLATE, SEQ_LENGTH)
    return items


def hf_matrices(hf_dir: str, items: list[dict], num_constitutions: int, reduction: str) -> torch.Tensor:
    """The same matrices computed plainly with transformers."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    batch = collate(items)
    with torch.no_grad():
        logits = model(batch["tokens"]).logits
    token_logp = logits.log_softmax(-1).gather(-1, batch["labels"].unsqueeze(-1)).squeeze(-1)
    return sequence_logprobs(token_logp, batch["loss_mask"], reduction).view(-1, num_constitutions, num_constitutions)


def megatron_matrices(ckpt_dir: str, tokenizer_dir: str, num_queries: int, num_constitutions: int,
                      tensor: int, pipeline: int, reduction: str, trim: bool = False,
                      share: bool = False) -> torch.Tensor:
    """With ``trim``, the batches lose their unused padding columns first, as the trainer does;
    with ``share``, each constitution's prompt is processed once (the shared-prompt layout)."""
    from megatron_sami.alignment.shared_prompt import share_microbatches
    from megatron_sami.alignment.trainer import trim_padding

    parallel = ParallelConfig(tensor=tensor, pipeline=pipeline)
    with megatron_runtime(parallel):
        config, model = checkpoint_dir.load_checkpoint_model(Path(ckpt_dir), parallel, "fp32", SEQ_LENGTH)
        items = tokenized(tokenizer_dir, num_queries, num_constitutions)
        micro = [collate([item]) for item in items]
        if trim:
            micro, length = trim_padding(micro, SEQ_LENGTH, 16, each=pipeline == 1)
            assert length < SEQ_LENGTH and length % 16 == 0
            assert pipeline > 1 or len({m["tokens"].shape[1] for m in micro}) > 1  # lengths differ per microbatch
        if share:
            micro, _ = share_microbatches(micro, num_constitutions, tensor, each=pipeline == 1)
            assert all(m["tokens"].shape[0] == num_constitutions for m in micro)
        return score_matrices(model, micro, num_constitutions, config.vocab_size, reduction)


def loss_and_grad_norm(ckpt_dir: str, tokenizer_dir: str, num_queries: int, num_constitutions: int,
                       tensor: int, pipeline: int, num_microbatches: int,
                       recompute: bool = False, share: bool = False) -> tuple[float, float]:
    """One forward/backward over a global batch; DP ranks take their slice of the queries
    (with ``share``, in the shared-prompt layout)."""
    from megatron.core import parallel_state

    from megatron_sami.alignment.shared_prompt import share_microbatches

    from megatron_jobs import counted_grads, model_parallel_norm

    parallel = ParallelConfig(tensor=tensor, pipeline=pipeline)
    with megatron_runtime(parallel) as info:
        config, model = checkpoint_dir.load_checkpoint_model(Path(ckpt_dir), parallel, "fp32", SEQ_LENGTH, recompute)
        model.train()
        items = tokenized(tokenizer_dir, num_queries, num_constitutions)
        per_rank = num_queries // info.data_parallel_size
        mine = items[parallel_state.get_data_parallel_rank() * per_rank:][:per_rank]
        per_micro = per_rank // num_microbatches
        micro = [collate(mine[i * per_micro:(i + 1) * per_micro]) for i in range(num_microbatches)]
        if share:
            micro, _ = share_microbatches(micro, num_constitutions, tensor, each=pipeline == 1)
        step = sami_forward_step(num_constitutions, SamiLossConfig(), config.vocab_size)
        logs = forward_backward(model, step, iter(micro), num_microbatches, micro[0]["tokens"].shape[1],
                                micro[0]["tokens"].shape[0])
        grads = counted_grads(model)
        # Without DDP the gradients are per DP rank: average the gradient vectors, not the norms.
        if info.data_parallel_size > 1:
            flat = torch.cat([g.reshape(-1) for g in grads]).double()
            torch.distributed.all_reduce(flat, group=parallel_state.get_data_parallel_group())
            grads = [flat / info.data_parallel_size]
        return reduce_logs(logs)["loss"], model_parallel_norm(grads)


def sequence_parallel_report(ckpt_dir: str, tokenizer_dir: str, num_queries: int, num_constitutions: int,
                             tensor: int, sequence_parallel: bool, share: bool = False) -> dict:
    """At TP=``tensor`` with sequence parallelism on or off, one microbatch of ``num_queries``
    queries: the C x C matrices (forward only), then the loss and every weight's gradient of one
    forward/backward, and the rows of logits each output-layer call made ("rows") against the
    scored tokens ("scored").

    Gradients by parameter name: a TP-replicated weight's (norms, the MoE router) whole, summed
    over TP under SP as training does; a TP-split weight's as its L2 norm over the TP ranks (the
    split layouts differ between TP sizes: SwiGLU's fc1 holds [gate; up] per rank).
    """
    from megatron.core import parallel_state

    from megatron_sami.alignment.shared_prompt import share_microbatches

    from megatron_jobs import sum_sequence_parallel_grads

    parallel = ParallelConfig(tensor=tensor, sequence_parallel=sequence_parallel)
    with megatron_runtime(parallel):
        config, model = checkpoint_dir.load_checkpoint_model(Path(ckpt_dir), parallel, "fp32", SEQ_LENGTH)
        assert model.config.sequence_parallel == sequence_parallel
        rows = []
        model.output_layer.register_forward_hook(lambda module, args, out: rows.append(out[0].shape[:2].numel()))
        micro = [collate(tokenized(tokenizer_dir, num_queries, num_constitutions))]
        if share:
            micro, _ = share_microbatches(micro, num_constitutions, tensor, each=True)
        matrices = score_matrices(model, micro, num_constitutions, config.vocab_size, "mean")
        model.train()
        step = sami_forward_step(num_constitutions, SamiLossConfig(), config.vocab_size)
        logs = forward_backward(model, step, iter(micro), 1, micro[0]["tokens"].shape[1], micro[0]["tokens"].shape[0])
        sum_sequence_parallel_grads(model)
        grads = {}
        for name, param in model.named_parameters():
            if getattr(param, "tensor_model_parallel", False):
                square = param.grad.double().pow(2).sum()
                torch.distributed.all_reduce(square, group=parallel_state.get_tensor_model_parallel_group())
                grads[name] = square.sqrt()
            else:
                grads[name] = param.grad.clone()
        return {"matrices": matrices, "loss": reduce_logs(logs)["loss"], "grads": grads, "rows": rows,
                "scored": int(micro[0]["loss_mask"].sum())}
