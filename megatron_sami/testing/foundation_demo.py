"""The foundation smoke job (real Megatron-Core on CPU, used by the
tests): ``train`` (torchrun, 2 processes) trains a tiny Llama-architecture ``GPTModel`` at
tensor parallel size 2 with Megatron-Core DDP and the distributed optimizer on an embedded
paragraph and saves an atomic distributed checkpoint; ``verify`` (one process) reloads it at
tensor parallel size 1 and checks that it reproduces the TP=2 logits and greedy text.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from megatron_sami.conversion.verify import megatron_logits
from megatron_sami.io import atomic_write_json, atomic_write_jsonl, atomic_write_text
from megatron_sami.models.build import build_gpt_model
from megatron_sami.models.catalogue import load_model_config
from megatron_sami.models.checkpoint import load_model, save_model
from megatron_sami.models.config import PrecisionConfig
from megatron_sami.runtime.distributed import logger, megatron_runtime
from megatron_sami.runtime.layout import ParallelConfig
from megatron_sami.testing.lm import lm_forward_step
from megatron_sami.training.engine import OptimizerSettings, build_optimizer, train_step, wrap_ddp

MODEL = "tiny-llama"
SEQ_LENGTH = 64
PROMPT = "SAMI trains"

CORPUS = (
    "SAMI trains a language model so that what it writes carries information about the principles "
    "it was asked to follow. For each question, answers are written under several constitutions and "
    "every answer is scored under every constitution; the training signal raises the score of each "
    "answer under its own constitution relative to the others. No preference labels are needed: "
    "the model is its own critic, and a few careful steps from the base model are enough. "
)


def encode(text: str) -> torch.Tensor:
    """ASCII bytes as token ids [T] (int64); the tiny model's vocabulary is bytes."""
    return torch.tensor(list(text.encode("ascii")), dtype=torch.long)


def decode(tokens: list[int]) -> str:
    """Token ids back to text (ids beyond ASCII are dropped)."""
    return bytes(t for t in tokens if t < 128).decode("ascii", errors="replace")


def corpus_batch(step: int, batch_size: int) -> dict[str, torch.Tensor]:
    """Random windows of the corpus (seeded by step, identical on every rank)."""
    data = encode(CORPUS * 2)
    generator = torch.Generator().manual_seed(step)
    starts = torch.randint(0, len(CORPUS), (batch_size,), generator=generator)
    windows = torch.stack([data[s:s + SEQ_LENGTH + 1] for s in starts.tolist()])
    return {"tokens": windows[:, :-1], "labels": windows[:, 1:], "loss_mask": torch.ones(batch_size, SEQ_LENGTH)}


def greedy(model, prompt: str, vocab_size: int, num_new: int = 48) -> str:
    """``prompt`` and ``num_new`` greedily decoded bytes (collective: every rank runs the model)."""
    tokens = encode(prompt).unsqueeze(0)
    for _ in range(num_new):
        next_token = megatron_logits(model, tokens, vocab_size)[0, -1].argmax()
        tokens = torch.cat([tokens, next_token.view(1, 1)], dim=1)
    return decode(tokens[0].tolist())


def train(run_dir: Path, steps: int, batch_size: int) -> None:
    """Train the tiny model at TP=2 for ``steps`` steps of ``batch_size`` windows and save the
    checkpoint, its TP=2 logits, greedy text and metrics under ``run_dir`` (2 processes)."""
    config = load_model_config(MODEL)
    parallel = ParallelConfig(tensor=2)
    precision = PrecisionConfig(params_dtype="fp32")
    with megatron_runtime(parallel, model=config, seed=1234, seq_length=SEQ_LENGTH) as info:
        model = build_gpt_model(config, parallel, precision, SEQ_LENGTH)
        ddp_model = wrap_ddp(model, use_distributed_optimizer=True)
        optimizer = build_optimizer(ddp_model, OptimizerSettings(lr=3e-3, clip_grad=1.0))
        if info.is_rank0:
            run_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_json(run_dir / "config.json",
                              {"model": MODEL, "parallel": vars(parallel), "precision": vars(precision),
                               "steps": steps, "batch_size": batch_size, "seq_length": SEQ_LENGTH})
        logger.info("training %s (%d parameters) at TP=2 for %d steps", MODEL, config.num_parameters(), steps)
        metrics, start = [], time.perf_counter()
        for step in range(1, steps + 1):
            batch = corpus_batch(step, batch_size)
            result = train_step(ddp_model, optimizer, lm_forward_step, iter([batch]), 1, SEQ_LENGTH, batch_size)
            elapsed = time.perf_counter() - start
            tokens_per_s = step * batch_size * SEQ_LENGTH / elapsed
            metrics.append({"step": step, "loss": result.loss, "grad_norm": result.grad_norm,
                            "tokens_per_s": tokens_per_s})
            if step % 10 == 0 or step == 1 or step == steps:
                logger.info("step %3d/%d  loss %.3f  grad-norm %.2f  %.0f tokens/s  ETA %.0f s", step, steps,
                            result.loss, result.grad_norm, tokens_per_s, elapsed / step * (steps - step))
        save_model(model, run_dir / "checkpoint")
        text = greedy(model, PROMPT, config.vocab_size)
        logits = megatron_logits(model, encode(CORPUS[:SEQ_LENGTH]).unsqueeze(0), config.vocab_size)
        if info.is_rank0:
            torch.save(logits, run_dir / "tp2_logits.pt")
            atomic_write_text(run_dir / "tp2_greedy.txt", text)
            atomic_write_jsonl(run_dir / "metrics.jsonl", metrics)
            logger.info("checkpoint saved to %s", run_dir / "checkpoint")
            logger.info("greedy continuation at TP=2: %r", text)


def verify(run_dir: Path) -> int:
    """Reload ``run_dir``'s checkpoint at TP=1 and compare logits and greedy text with TP=2's;
    returns the exit code (0: reproduced within 1e-4)."""
    config = load_model_config(MODEL)
    parallel = ParallelConfig()
    with megatron_runtime(parallel, model=config, seq_length=SEQ_LENGTH):
        model = build_gpt_model(config, parallel, PrecisionConfig(params_dtype="fp32"), SEQ_LENGTH)
        load_model(model, run_dir / "checkpoint")
        logits = megatron_logits(model, encode(CORPUS[:SEQ_LENGTH]).unsqueeze(0), config.vocab_size)
        text = greedy(model, PROMPT, config.vocab_size)
    reference = torch.load(run_dir / "tp2_logits.pt", weights_only=True)
    max_diff = float((logits - reference).abs().max())
    same_text = text == (run_dir / "tp2_greedy.txt").read_text()
    losses = [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    print(f"loss: {losses[0]:.3f} at step 1 -> {losses[-1]:.3f} at step {len(losses)}")
    print(f"TP=1 reload of the TP=2 checkpoint: max |logit difference| = {max_diff:.2e}, "
          f"greedy text {'identical' if same_text else 'DIFFERENT'}: {text!r}")
    ok = max_diff < 1e-4 and same_text
    print("demo: OK" if ok else "demo: FAILED (TP=1 does not reproduce TP=2)")
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    """``python -m megatron_sami.testing.foundation_demo {train,verify} --run-dir DIR``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("phase", choices=["train", "verify"])
    parser.add_argument("--run-dir", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args(argv)
    if args.phase == "train":
        train(args.run_dir, args.steps, args.batch_size)
        return 0
    return verify(args.run_dir)


if __name__ == "__main__":
    sys.exit(main())
