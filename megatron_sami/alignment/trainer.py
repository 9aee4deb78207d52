"""The SAMI trainer: load a converted checkpoint, train a fixed number of steps, checkpoint, resume.

Reads top to bottom: config -> runtime -> model, optimizer, data -> resume -> loop -> close.
Run directory:

    config.yaml          the resolved config of every start
    metrics.jsonl        one JSON object per optimizer step
    tensorboard/         the same metrics for TensorBoard
    checkpoints/step_N/  model (a checkpoint directory that sami-convert exports), optimizer/,
                         trainer_state/ (step, data position, RNG per rank)
    checkpoints/latest   the name of the newest complete checkpoint (written last, atomically)
"""

from __future__ import annotations

import json
import math
import random
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from megatron_sami.alignment.data import (
    DataError,
    PromptTemplate,
    collate,
    microbatch_lengths,
    read_records,
    tokenize_records,
    used_lengths,
)
from megatron_sami.alignment.objective import SamiLossConfig
from megatron_sami.alignment.schedule import LRSchedule
from megatron_sami.alignment.shared_prompt import PAD_SEGMENT, share_microbatches
from megatron_sami.alignment.step import sami_forward_step
from megatron_sami.conversion import convert
from megatron_sami.errors import ConfigError, Preempted
from megatron_sami.models.build import applies_attention_masks
from megatron_sami.models.checkpoint import save_weights, staged_output
from megatron_sami.models.config import PrecisionConfig
from megatron_sami.runtime.distributed import collective_device, logger, megatron_runtime
from megatron_sami.runtime.layout import ParallelConfig
from megatron_sami.training.engine import (
    OptimizerSettings,
    build_optimizer,
    materialize_optimizer_state,
    optimizer_step_count,
    peak_tflops,
    set_optimizer_step_count,
    train_step,
    wrap_ddp,
)

# Optimizer state as the distributed optimizer holds it: a resumed run keeps TP/PP (DP may change).
# ("fully_reshardable" would allow any layout, but megatron-core 0.19 fails to load it with torch
# Adam: the per-parameter "step" tensor is skipped on load and then looked up.)
OPTIMIZER_FORMAT = {"distrib_optim_sharding_type": "dp_reshardable"}
METRIC_KEYS = ("loss", "loss_row", "loss_col", "acc_row", "acc_col", "mi_bound_nats", "diag_margin")


@dataclass
class DataConfig:
    records: str = "???"
    tokenizer: str | None = None  # default: the checkpoint's hf/ directory
    seq_length: int = 512
    append_eos: bool = False
    on_overlength: str = "error"
    # Each constitution's prompt is processed once per query instead of once per response
    # (sami/shared_prompt.py): same log-probabilities, fewer tokens. Needs an attention that
    # applies block masks (the local SDPA spec); with Transformer Engine's the pairs are used.
    share_prompts: bool = True


@dataclass
class TrainConfig:
    checkpoint: str = "???"
    run_dir: str = "???"
    steps: int = 4
    queries_per_step: int = 8
    queries_per_microbatch: int = 1
    seed: int = 1234
    save_interval: int = 0  # 0: only after the last step
    recompute_activations: bool = False
    data: DataConfig = field(default_factory=DataConfig)
    template: PromptTemplate = field(default_factory=PromptTemplate)
    loss: SamiLossConfig = field(default_factory=SamiLossConfig)
    optimizer: OptimizerSettings = field(default_factory=OptimizerSettings)
    lr_schedule: LRSchedule = field(default_factory=LRSchedule)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ConfigError(f"steps must be >= 1, got {self.steps}.")
        if self.queries_per_step < 1 or self.queries_per_microbatch < 1:
            raise ConfigError("queries_per_step and queries_per_microbatch must be >= 1.")
        self.lr_schedule.check_peak(self.optimizer.lr)

    def microbatches_per_rank(self, data_parallel_size: int) -> int:
        per_rank, rest = divmod(self.queries_per_step, data_parallel_size)
        if rest or per_rank % self.queries_per_microbatch:
            raise ConfigError(
                f"queries_per_step={self.queries_per_step} must split evenly into {data_parallel_size} data-parallel "
                f"ranks x microbatches of queries_per_microbatch={self.queries_per_microbatch}; adjust one of them.")
        return per_rank // self.queries_per_microbatch


def query_order(num_queries: int, position: int, count: int, seed: int) -> list[int]:
    """Queries ``position .. position+count-1`` of an endless sequence of seeded epochs."""
    order: list[int] = []
    while len(order) < count:
        epoch, offset = divmod(position + len(order), num_queries)
        permutation = torch.randperm(num_queries, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
        order.extend(permutation[offset:offset + count - len(order)])
    return order


def trim_alignment(fp8: bool) -> int:
    """What a trimmed length is rounded up to: 16 for FP8 GEMMs and GPU tensor cores; on CPU
    nothing gains from it, and rounding 120 tokens up to 128 costs 7% more compute."""
    return 16 if fp8 or torch.cuda.is_available() else 1


def trim_padding(micro: list[dict[str, torch.Tensor]], seq_length: int, multiple: int,
                 each: bool = False) -> tuple[list[dict], int]:
    """Drop the padding columns no sequence uses (lengths rounded up to ``multiple``, at most
    ``seq_length``); returns the microbatches and the longest length. Attention is causal and
    the padding trails every sequence, so the real tokens' values are unchanged. With ``each``
    every microbatch gets its own length (possible without pipeline parallelism); otherwise
    the step keeps one length, as pipeline stages exchange fixed shapes."""
    lengths = microbatch_lengths([int(used_lengths(m["loss_mask"]).max()) for m in micro], multiple, each,
                                 limit=seq_length)
    trimmed = [{key: value[:, :length] for key, value in m.items()} for m, length in zip(micro, lengths, strict=True)]
    return trimmed, max(lengths)


def _rng_state() -> dict:
    from megatron.core import tensor_parallel

    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "tracker": tensor_parallel.get_cuda_rng_tracker().get_states()}


def _set_rng_state(state: dict) -> None:
    from megatron.core import tensor_parallel

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def save_training_checkpoint(run_dir: Path, step: int, ddp_model, optimizer, source_ckpt: Path, position: int) -> Path:
    """Model + optimizer + trainer state, all staged and renamed; then the ``latest`` pointer."""
    from megatron.core import dist_checkpointing

    checkpoints = run_dir / "checkpoints"
    final = checkpoints / f"step_{step:06d}"
    rank = dist.get_rank()
    with staged_output(final) as staging:
        if rank == 0:
            convert.write_checkpoint_description(source_ckpt, staging)
            for sub in ("optimizer", "trainer_state"):
                (staging / sub).mkdir()
        save_weights(ddp_model, staging / "weights")
        model = ddp_model.module
        dist_checkpointing.save(optimizer.sharded_state_dict(model.sharded_state_dict(), metadata=OPTIMIZER_FORMAT),
                                str(staging / "optimizer"))
        torch.save({"step": step, "position": position, "rng": _rng_state(),
                    "optimizer_steps": optimizer_step_count(optimizer)},
                   staging / "trainer_state" / f"rank{rank:05d}.pt")
    if rank == 0:
        pointer = checkpoints / "latest.tmp"
        pointer.write_text(final.name + "\n")
        pointer.rename(checkpoints / "latest")
    dist.barrier()
    return final


def latest_checkpoint(run_dir: Path) -> Path | None:
    pointer = run_dir / "checkpoints" / "latest"
    if not pointer.is_file():
        return None
    path = run_dir / "checkpoints" / pointer.read_text().strip()
    return path if path.is_dir() else None


def load_training_state(path: Path, ddp_model, optimizer) -> dict:
    from megatron.core import dist_checkpointing

    from megatron_sami.models.checkpoint import load_model

    load_model(ddp_model, path / "weights")
    # The optimizer was built from the initial weights: its fp32 main copies must follow the load.
    optimizer.reload_model_params()
    model = ddp_model.module
    materialize_optimizer_state(optimizer)
    state = dist_checkpointing.load(
        optimizer.sharded_state_dict(model.sharded_state_dict(), is_loading=True, metadata=OPTIMIZER_FORMAT),
        str(path / "optimizer"))
    with torch.no_grad():  # megatron-core copies into the (grad-requiring) main params in place
        optimizer.load_state_dict(state)
    trainer_state = torch.load(path / "trainer_state" / f"rank{dist.get_rank():05d}.pt", weights_only=False)
    set_optimizer_step_count(optimizer, trainer_state["optimizer_steps"])
    _set_rng_state(trainer_state["rng"])
    return trainer_state


def used_tokens(micro: dict[str, torch.Tensor]) -> int:
    """Tokens the model processes in a microbatch, padding excluded (pairs or shared prompts)."""
    if "segment_ids" in micro:
        return int((micro["segment_ids"] != PAD_SEGMENT).sum())
    return int(used_lengths(micro["loss_mask"]).sum())


def step_token_counts(micro: list[dict[str, torch.Tensor]], data_parallel_size: int) -> tuple[float, float]:
    """(used, processed) tokens of the global batch, summed over data-parallel ranks: what the
    model's inputs hold without and with padding."""
    from megatron.core import parallel_state

    counts = torch.tensor([float(sum(used_tokens(m) for m in micro)),
                           float(sum(m["tokens"].numel() for m in micro))], dtype=torch.float64,
                          device=collective_device())
    if data_parallel_size > 1:
        dist.all_reduce(counts, group=parallel_state.get_data_parallel_group())
    return float(counts[0]), float(counts[1])


class MetricsWriter:
    """metrics.jsonl (rank 0) and TensorBoard; on resume, steps after the checkpoint are dropped."""

    def __init__(self, run_dir: Path, resume_step: int, enabled: bool) -> None:
        self.enabled = enabled
        self.path = run_dir / "metrics.jsonl"
        self.board = None
        if not enabled:
            return
        if self.path.exists():
            kept = [line for line in self.path.read_text().splitlines() if json.loads(line)["step"] <= resume_step]
            self.path.write_text("".join(line + "\n" for line in kept))
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.board = SummaryWriter(str(run_dir / "tensorboard"), purge_step=resume_step + 1)
        except ImportError:  # pragma: no cover - tensorboard is a dependency
            logger.warning("tensorboard is not installed; metrics go to metrics.jsonl only")

    def write(self, row: dict) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as out:
            out.write(json.dumps(row) + "\n")
        if self.board is not None:
            for key, value in row.items():
                if key != "step" and isinstance(value, int | float):
                    self.board.add_scalar(f"train/{key}", value, row["step"])
            self.board.flush()

    def close(self) -> None:
        if self.board is not None:
            self.board.close()


class StopRequest:
    """Set by SIGUSR1 (Slurm's time-limit warning, ``--signal``) or SIGTERM (preemption, scancel);
    every rank stops after the same step, once the flag has been agreed over all ranks."""

    def __init__(self) -> None:
        self.requested = False

    def install(self) -> None:
        for number in (signal.SIGUSR1, signal.SIGTERM):
            signal.signal(number, self._handle)

    def _handle(self, number, frame) -> None:
        self.requested = True
        logger.warning("received %s: checkpointing after this step", signal.Signals(number).name)

    def agreed(self) -> bool:
        flag = torch.tensor([1.0 if self.requested else 0.0], device=collective_device())
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


stop_requested = StopRequest()


def train(cfg: TrainConfig, resolved_yaml: str) -> Path:
    """Run (or resume) a SAMI training run; returns the final checkpoint directory (collective)."""
    from transformers import AutoTokenizer

    run_dir = Path(cfg.run_dir)
    model_config, _ = convert.read_checkpoint_model(Path(cfg.checkpoint))
    with megatron_runtime(cfg.parallel, model=model_config, seed=cfg.seed, seq_length=cfg.data.seq_length) as info:
        num_microbatches = cfg.microbatches_per_rank(info.data_parallel_size)
        records = read_records(cfg.data.records)
        if len(records) < cfg.queries_per_step:
            raise DataError(f"{cfg.data.records} holds {len(records)} queries, fewer than one global batch "
                            f"(queries_per_step={cfg.queries_per_step}); add data or lower queries_per_step.")
        tokenizer = AutoTokenizer.from_pretrained(cfg.data.tokenizer or str(Path(cfg.checkpoint) / "hf"))
        tokenized, dropped = tokenize_records(records, tokenizer, cfg.template, cfg.data.seq_length,
                                              cfg.data.append_eos, cfg.data.on_overlength)
        if dropped:
            logger.warning("dropped %d of %d records longer than seq_length=%d", dropped, len(records),
                           cfg.data.seq_length)
        if len(tokenized) < cfg.queries_per_step:
            raise DataError(f"only {len(tokenized)} of {len(records)} records fit in data.seq_length="
                            f"{cfg.data.seq_length}, fewer than one global batch (queries_per_step="
                            f"{cfg.queries_per_step}); raise data.seq_length or shorten the responses.")
        num_constitutions = records[0].num_constitutions
        if info.is_rank0:
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "config.yaml").write_text(resolved_yaml)
        _, model = convert.load_checkpoint_model(Path(cfg.checkpoint), cfg.parallel, cfg.precision.params_dtype,
                                                 cfg.data.seq_length, cfg.recompute_activations)
        ddp_model = wrap_ddp(model, cfg.optimizer.use_distributed_optimizer)
        optimizer = build_optimizer(ddp_model, cfg.optimizer)
        step, position = 0, 0
        resume_from = latest_checkpoint(run_dir)
        if resume_from is not None:
            state = load_training_state(resume_from, ddp_model, optimizer)
            step, position = state["step"], state["position"]
            logger.info("resumed from %s at step %d", resume_from, step)
        metrics = MetricsWriter(run_dir, step, info.is_rank0)
        forward_step = sami_forward_step(num_constitutions, cfg.loss, model_config.vocab_size)
        share_prompts = cfg.data.share_prompts and applies_attention_masks(model)
        if cfg.data.share_prompts and not share_prompts:
            logger.warning("data.share_prompts: this model's attention (Transformer Engine) ignores block masks; "
                           "training on the C x C (prompt, response) pairs instead.")
        from megatron.core import parallel_state

        dp_rank = parallel_state.get_data_parallel_rank()
        per_rank = cfg.queries_per_step // info.data_parallel_size
        stop_requested.install()
        # Trimmed lengths stay divisible by TP (sequence parallelism) and, on GPUs, by 16.
        multiple = math.lcm(trim_alignment(bool(cfg.precision.fp8)), cfg.parallel.tensor)
        peak = peak_tflops("fp8" if cfg.precision.fp8 else "bf16") if cfg.precision.params_dtype == "bf16" else None
        flops_unit = "TFLOP/s/GPU" if torch.cuda.is_available() else "TFLOP/s/process"
        start, first_step = time.perf_counter(), step + 1
        last_saved = resume_from
        while step < cfg.steps:
            step += 1
            data_start = time.perf_counter()
            global_batch = query_order(len(tokenized), position, cfg.queries_per_step, cfg.seed)
            position += cfg.queries_per_step
            mine = [tokenized[i] for i in global_batch[dp_rank * per_rank:(dp_rank + 1) * per_rank]]
            micro = [collate(mine[i * cfg.queries_per_microbatch:(i + 1) * cfg.queries_per_microbatch])
                     for i in range(num_microbatches)]
            if share_prompts:
                micro, length = share_microbatches(micro, num_constitutions, multiple, each=cfg.parallel.pipeline == 1)
            else:
                micro, length = trim_padding(micro, cfg.data.seq_length, multiple, each=cfg.parallel.pipeline == 1)
            lr = cfg.lr_schedule.at(step, cfg.steps, cfg.optimizer.lr)
            for group in optimizer.param_groups:
                group["lr"] = lr
            step_start = time.perf_counter()
            result = train_step(ddp_model, optimizer, forward_step, iter(micro), num_microbatches, length,
                                micro[0]["tokens"].shape[0])
            step_time = time.perf_counter() - data_start
            # tokens: what the sequences use; processed: with the step's padding (what the GPUs compute)
            tokens, processed = step_token_counts(micro, info.data_parallel_size)
            tflops = model_config.training_flops_per_token(length) * processed / step_time / info.launch.world_size / 1e12
            row = {"step": step, **{key: result.logs[key] for key in METRIC_KEYS}, "lr": lr,
                   "grad_norm": result.grad_norm, "tokens_per_s": tokens / step_time,
                   "tokens_per_s_per_gpu": tokens / step_time / info.launch.world_size, "step_time_s": step_time,
                   "data_s": step_start - data_start, "forward_backward_s": result.forward_backward_s,
                   "optimizer_s": result.optimizer_s, "tflops_per_gpu": tflops,
                   "mfu": tflops / peak if peak else None, "world_size": info.launch.world_size}
            metrics.write(row)
            elapsed = time.perf_counter() - start
            eta = elapsed / (step - first_step + 1) * (cfg.steps - step)
            logger.info("step %d/%d  loss %.4f  acc row/col %.2f/%.2f  MI bound %.3f nats  lr %.2e  grad-norm %.3f  "
                        "%.0f tokens/s  %.2f %s%s  ETA %.0f s", step, cfg.steps, row["loss"], row["acc_row"],
                        row["acc_col"], row["mi_bound_nats"], lr, row["grad_norm"], row["tokens_per_s"], tflops,
                        flops_unit,
                        f"  MFU {row['mfu']:.1%}" if row["mfu"] is not None else "", eta)
            stop = stop_requested.agreed()
            if step == cfg.steps or stop or (cfg.save_interval and step % cfg.save_interval == 0):
                last_saved = save_training_checkpoint(run_dir, step, ddp_model, optimizer, Path(cfg.checkpoint),
                                                      position)
                logger.info("checkpoint %s", last_saved)
            if stop and step < cfg.steps:
                metrics.close()
                raise Preempted(f"stopped by a signal after step {step}; checkpoint {last_saved}")
        metrics.close()
        return last_saved
