"""SAMI training speed: ``sami-train`` (Megatron-Core, TP=1) against a plain transformers loop.

    .venv/bin/python benchmarks/train_throughput.py [--model synthetic|smollm2] [--steps 4]
        [--queries-per-step 4] [--constitutions 2] [--response-words 40] [--rounds 3]
        [--workdir /tmp/sami-bench-train]

Both train the same model on the same records with the same loss and AdamW, one query per
microbatch, fp32 on CPU (bf16 on a GPU). The plain loop is what a researcher writes first:
for each query, the C x C (prompt k, response j) sequences padded to their longest, one
``AutoModelForCausalLM`` forward, masked mean log-probs, the two-sided InfoNCE, backward, and
an optimizer step per global batch. ``sami-train`` runs as a single process (as the plain loop
does) at two ``data.seq_length`` settings: the tightest that fits, and a loose 1024 (what a
config written for real data holds), which shows what trimming unused padding per step saves;
once more under torchrun (its agent process shares the machine's cores), and once on the C x C
pairs (``data.share_prompts=false``: each prompt processed once per response, as the plain loop
does). The plain loop and the tight sami-train run alternately for ``--rounds`` pairs, and each
pair gives one ratio (the machine is shared and drifts). The first step of each run is a
warm-up and is not timed. Prints seconds per query and tokens per query side by side, the ratio
of each pair and their median.
Issue 4's target: sami-train no slower than the plain loop on CPU at TP=1 (ratio >= 1).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SPLIT = ("data_s", "forward_backward_s", "optimizer_s")  # where a step's time goes (sami-train's metrics keys)
WORDS = ("the a careful answer explains each step clearly and safely so that anyone can follow it without harm "
         "while staying brief honest kind and useful to the person asking about their problem at home").split()


def make_model(kind: str, workdir: Path) -> Path:
    if kind == "smollm2":
        from megatron_sami.models.gguf import smollm2_hf_dir

        return smollm2_hf_dir()
    from megatron_sami.testing.tiny import make_tiny_hf_model, make_tiny_tokenizer

    model_dir = workdir / "synthetic-hf"
    if not (model_dir / "config.json").is_file():
        tokenizer = make_tiny_tokenizer(model_dir, vocab_size=2000, corpus=[" ".join(WORDS)] * 50)
        make_tiny_hf_model("llama", model_dir, vocab_size=len(tokenizer), hidden_size=256, intermediate_size=688,
                           num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=2048, num_layers=4)
    return model_dir


def make_records(path: Path, num_queries: int, num_constitutions: int, response_words: int) -> None:
    from megatron_sami.rollout.constitutions import load_constitution_set

    principles = load_constitution_set("dialogue").principles
    rng = random.Random(0)
    with path.open("w") as handle:
        for index in range(num_queries):
            constitutions = [f"1. {principles[0].text(c % 2 == 0)}\n2. {principles[1].text(c < 2)}"
                             for c in range(num_constitutions)]
            responses = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(response_words // 2, response_words)))
                         + "." for _ in range(num_constitutions)]
            handle.write(json.dumps({"id": f"q{index}", "query": f"How do I fix problem {index} at home?",
                                     "constitutions": constitutions, "responses": responses}) + "\n")


def dialogue_template():
    """The template sami-train uses by default (configs/template/dialogue.yaml)."""
    from omegaconf import OmegaConf

    from megatron_sami.alignment.data import PromptTemplate
    from megatron_sami.models.catalogue import config_dir
    from megatron_sami.typed_config import to_typed

    return to_typed(PromptTemplate, OmegaConf.load(config_dir() / "template" / "dialogue.yaml"), "template")


def tightest_seq_length(model_dir: Path, records: Path) -> int:
    from transformers import AutoTokenizer

    from megatron_sami.alignment.data import read_records, tokenize_record

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    longest = 0
    for record in read_records(records):
        mask = tokenize_record(record, tokenizer, dialogue_template(), 4096)["loss_mask"]
        longest = max(longest, int((mask * torch.arange(1, mask.shape[1] + 1)).amax()))
    return -(-longest // 16) * 16


def run_sami_train(checkpoint: Path, records: Path, run_dir: Path, args, seq_length: int, dtype: str,
                   torchrun: bool = False, overrides: tuple[str, ...] = ()) -> dict:
    """One sami-train run: a single process (as the plain loop runs), or under torchrun."""
    shutil.rmtree(run_dir, ignore_errors=True)
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node=1"] if torchrun else []
    command = [sys.executable, *launcher,
               "-m", "megatron_sami.cli.train", f"checkpoint={checkpoint}", f"data.records={records}",
               f"run_dir={run_dir}", f"steps={args.steps}", f"queries_per_step={args.queries_per_step}",
               "queries_per_microbatch=1", f"data.seq_length={seq_length}", f"precision.params_dtype={dtype}",
               "optimizer.use_distributed_optimizer=false", "optimizer.lr=1e-5", "save_interval=0", *overrides]
    subprocess.run(command, check=True, capture_output=True, text=True, cwd=ROOT)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()][1:]
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)  # the final checkpoint: 3x the model's bytes
    seconds = statistics.fmean(row["step_time_s"] for row in rows)
    tokens = statistics.fmean(row["tokens_per_s"] * row["step_time_s"] for row in rows)
    return {"s_per_query": seconds / args.queries_per_step, "tokens_per_query": tokens / args.queries_per_step,
            "loss": rows[-1]["loss"], **{key: statistics.fmean(row[key] for row in rows) / args.queries_per_step
                                          for key in SPLIT}}


def plain_sequences(tokenizer, record: dict) -> tuple[list[list[int]], list[int]]:
    """The C*C token lists (prompt k + response j) and where each response starts."""
    template = dialogue_template()
    sequences, starts = [], []
    for constitution in record["constitutions"]:
        prompt = tokenizer(template.render(constitution, record["query"]))["input_ids"]
        for response in record["responses"]:
            sequences.append(prompt + tokenizer(template.response_prefix + response,
                                                add_special_tokens=False)["input_ids"])
            starts.append(len(prompt))
    return sequences, starts


def plain_query_loss(model, tokenizer, record: dict, device: str) -> tuple[torch.Tensor, int]:
    sequences, starts = plain_sequences(tokenizer, record)
    count = len(record["constitutions"])
    width = max(len(s) for s in sequences)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = torch.full((len(sequences), width), pad, dtype=torch.long)
    mask = torch.zeros(len(sequences), width - 1)
    for row, (sequence, start) in enumerate(zip(sequences, starts, strict=True)):
        ids[row, :len(sequence)] = torch.tensor(sequence)
        mask[row, start - 1:len(sequence) - 1] = 1
    ids, mask = ids.to(device), mask.to(device)
    logits = model(ids).logits[:, :-1].float()
    token_logp = logits.log_softmax(-1).gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    scores = ((token_logp * mask).sum(1) / mask.sum(1)).view(count, count)  # [constitution k, response j]
    target = torch.arange(count, device=device)
    loss = 0.5 * (torch.nn.functional.cross_entropy(scores, target)
                  + torch.nn.functional.cross_entropy(scores.t(), target))
    return loss, ids.numel()


def run_plain(model_dir: Path, records: Path, args, dtype: str) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = "cuda" if torch.cuda.is_available() else "cpu"
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(
        str(model_dir), dtype=torch.bfloat16 if dtype == "bf16" else torch.float32).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, betas=(0.9, 0.95), weight_decay=0.0)
    rows = [json.loads(line) for line in records.read_text().splitlines()]
    times, token_counts, splits, loss = [], [], [], 0.0
    for step in range(args.steps):
        start, tokens = time.perf_counter(), 0
        batch = rows[step * args.queries_per_step:(step + 1) * args.queries_per_step]
        for record in batch:
            loss_q, count = plain_query_loss(model, tokenizer, record, device)
            (loss_q / len(batch)).backward()
            tokens += count
            loss = float(loss_q.detach())
        backward_done = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step:  # the first step warms up
            times.append(time.perf_counter() - start)
            token_counts.append(tokens)
            splits.append((0.0, backward_done - start, time.perf_counter() - backward_done))
    per_query = args.queries_per_step
    return {"s_per_query": statistics.fmean(times) / per_query,
            "tokens_per_query": statistics.fmean(token_counts) / per_query, "loss": loss,
            **{key: statistics.fmean(split[i] for split in splits) / per_query for i, key in enumerate(SPLIT)}}


def run_plain_process(args) -> dict:
    """The plain loop in its own process, as sami-train runs in its own: neither inherits the
    other's threads or allocator state."""
    out = args.workdir / "plain.json"
    subprocess.run([sys.executable, __file__, "--model", args.model, "--steps", str(args.steps), "--queries-per-step",
                    str(args.queries_per_step), "--workdir", str(args.workdir), "--plain-only", str(out)],
                   check=True, capture_output=True, text=True)
    return json.loads(out.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["synthetic", "smollm2"], default="synthetic")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--queries-per-step", type=int, default=4)
    parser.add_argument("--constitutions", type=int, default=2)
    parser.add_argument("--response-words", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=3, help="plain loop / sami-train pairs, run alternately")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/sami-bench-train"))
    parser.add_argument("--plain-only", type=Path, help=argparse.SUPPRESS)  # internal: the plain loop's process
    args = parser.parse_args()
    dtype = "bf16" if torch.cuda.is_available() else "fp32"
    if args.plain_only:
        result = run_plain(make_model(args.model, args.workdir), args.workdir / "records.jsonl", args, dtype)
        args.plain_only.write_text(json.dumps(result))
        return
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    if args.steps < 2:
        parser.error("--steps must be at least 2 (the first step is a warm-up)")
    args.workdir.mkdir(parents=True, exist_ok=True)
    model_dir = make_model(args.model, args.workdir)
    records = args.workdir / "records.jsonl"
    make_records(records, args.steps * args.queries_per_step, args.constitutions, args.response_words)
    checkpoint = args.workdir / f"{args.model}-megatron"
    if not (checkpoint / "model.yaml").is_file():
        subprocess.run([sys.executable, "-m", "megatron_sami.cli.convert", "hf-to-megatron", str(model_dir),
                        str(checkpoint), "--overwrite"], check=True, capture_output=True, cwd=ROOT)
    tight = tightest_seq_length(model_dir, records)
    print(f"model {args.model} ({model_dir}), {dtype}, C={args.constitutions}, {args.queries_per_step} queries/step, "
          f"{args.steps - 1} timed steps, torch threads {torch.get_num_threads()}, cores {os.cpu_count()}, "
          f"{args.rounds} rounds")
    # The plain loop and the tight sami-train alternate, so that each ratio compares runs made
    # back to back (a shared machine drifts by several percent over minutes).
    rows, ratios, plains = [], [], []
    for round_index in range(1, args.rounds + 1):
        plain = run_plain_process(args)
        sami = run_sami_train(checkpoint, records, args.workdir / "run-tight", args, tight, dtype)
        plains.append(plain["s_per_query"])
        ratios.append(plain["s_per_query"] / sami["s_per_query"])
        rows += [(f"plain transformers loop, round {round_index}", plain, 1.0),
                 (f"sami-train seq_length={tight} (tightest), round {round_index}", sami, ratios[-1])]
    plain_mean = statistics.fmean(plains)
    for name, seq_length, torchrun, overrides in (
            ("sami-train seq_length=1024", 1024, False, ()),
            (f"sami-train seq_length={tight}, torchrun", tight, True, ()),
            (f"sami-train seq_length={tight}, C x C pairs", tight, False, ("data.share_prompts=false",))):
        result = run_sami_train(checkpoint, records, args.workdir / "run-other", args, seq_length, dtype, torchrun,
                                overrides)
        rows.append((name + " (vs mean plain)", result, plain_mean / result["s_per_query"]))
    print(f"{'':60} {'s/query':>9} {'tokens/query':>13} {'speed vs plain':>15}   "
          f"{'data':>6} {'fwd+bwd':>8} {'optim':>6} (s/query)")
    for name, result, ratio in rows:
        print(f"{name:60} {result['s_per_query']:>9.3f} {result['tokens_per_query']:>13.0f} {ratio:>14.2f}x   "
              + " ".join(f"{result[key]:>{width}.3f}" for key, width in zip(SPLIT, (6, 8, 6), strict=True)))
    print(f"sami-train (tightest) vs the plain loop, per round: {', '.join(f'{r:.2f}x' for r in ratios)}; "
          f"median {statistics.median(ratios):.2f}x")
    print("speed vs plain > 1: sami-train is faster (target >= 1 on CPU at TP=1). Tokens: the plain loop counts its "
          "padded batch; sami-train the tokens its model processes, padding excluded (each constitution's prompt "
          "once per query with shared prompts, once per pair without).")


if __name__ == "__main__":
    main()
