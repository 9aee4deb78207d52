"""The SAMI trainer: load a converted checkpoint, train a fixed number of steps, checkpoint, resume.

SAMI (Fränken et al. 2024, arXiv:2404.14313) fine-tunes the base model for a few optimizer steps
on the C x C log-probability matrices of its own responses; the step is
:mod:`megatron_sami.alignment.step`, the loss :mod:`megatron_sami.alignment.objective`.

Reads top to bottom: :func:`train` = runtime -> :func:`setup` (data, model, optimizer, resume)
-> a loop of :func:`run_step` (batch, learning rate, step, metrics row), checkpoint and signal
agreement -> close. Run directory:

    .lock                held by the running trainer (one trainer per run directory)
    config.yaml          the resolved config the run continues with
    config_history/      the configs replaced by a resume with changed settings (alignment/resume.py)
    metrics.jsonl        one JSON object per optimizer step
    tensorboard/         the same metrics for TensorBoard
    checkpoints/step_N/  model (a checkpoint directory that sami-convert exports), optimizer/,
                         trainer_state/ (state.json: step, data position, layout; rng/: RNG per rank)
    checkpoints/latest   the name of the newest complete checkpoint (written last, atomically)

A resumed run (same command, same ``run_dir``) continues the uninterrupted run's loss curve bit
for bit at the same layout; at another data-parallel size, or another TP/PP/EP with
``optimizer.checkpoint_format=fully_reshardable``, it continues within the rounding of the
reordered reductions (:mod:`megatron_sami.alignment.resume`).
"""

from __future__ import annotations

import math
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from megatron_sami.alignment.data import (
    DataError,
    PromptTemplate,
    check_vocabulary,
    collate,
    microbatch_lengths,
    read_records,
    tokenize_records,
    used_lengths,
)
from megatron_sami.alignment.flops import step_flops
from megatron_sami.alignment.objective import SamiLossConfig
from megatron_sami.alignment.resume import Layout, TrainerState, check_layout, config_changes, record_config
from megatron_sami.alignment.schedule import LRSchedule
from megatron_sami.alignment.shared_prompt import PAD_SEGMENT, share_microbatches
from megatron_sami.alignment.step import sami_forward_step
from megatron_sami.errors import CheckpointError, ConfigError, Preempted, RunInUse
from megatron_sami.io import append_jsonl, atomic_write_text, check_output_apart, rewrite_jsonl
from megatron_sami.models.build import applies_attention_masks
from megatron_sami.models.checkpoint import save_weights, staged_output
from megatron_sami.models.checkpoint_dir import (
    load_checkpoint_model,
    read_checkpoint_model,
    write_checkpoint_description,
)
from megatron_sami.models.config import ModelConfig, PrecisionConfig, recompute_mode
from megatron_sami.runlock import RunLock
from megatron_sami.runtime.distributed import RuntimeInfo, collective_device, logger, megatron_runtime
from megatron_sami.runtime.layout import ParallelConfig
from megatron_sami.training.checkpointing import (
    load_model_and_optimizer,
    rng_state,
    save_optimizer,
    set_rng_state,
)
from megatron_sami.training.engine import (
    OptimizerSettings,
    StepResult,
    any_rank,
    build_optimizer,
    data_parallel_rank,
    gather_parameters,
    optimizer_step_count,
    peak_tflops,
    set_optimizer_step_count,
    sum_over_data_parallel,
    train_step,
    wrap_ddp,
)
from megatron_sami.typed_config import to_typed

METRIC_KEYS = ("loss", "loss_row", "loss_col", "acc_row", "acc_col", "mi_bound_nats", "diag_margin")


@dataclass
class DataConfig:
    """Where the records come from and how they become token sequences (``data.*``)."""

    records: str = "???"
    tokenizer: str | None = None  # default: the checkpoint's hf/ directory
    seq_length: int = 512
    append_eos: bool = False
    on_overlength: str = "error"  # error | drop: a record longer than seq_length (tokens)
    # Each constitution's prompt is processed once per query instead of once per response
    # (alignment/shared_prompt.py): same log-probabilities, fewer tokens. Needs an attention that
    # applies block masks (the local SDPA spec); with Transformer Engine's the pairs are used.
    share_prompts: bool = True

    def __post_init__(self) -> None:
        if self.seq_length < 1:
            raise ConfigError(f"data.seq_length must be >= 1 (tokens), got {self.seq_length}.")
        if self.on_overlength not in ("error", "drop"):
            raise ConfigError(f"data.on_overlength '{self.on_overlength}' is unknown; use error or drop.")


@dataclass
class TrainConfig:
    """A ``sami-train`` run (configs/train.yaml); sizes count queries, each of C x C sequences.

    Raises:
        ConfigError: ``steps`` or a batch size is below 1, or the learning-rate schedule does not
            fit the peak ``optimizer.lr``.
    """

    checkpoint: str = "???"
    run_dir: str = "???"
    steps: int = 4
    queries_per_step: int = 8
    queries_per_microbatch: int = 1
    seed: int = 1234
    save_interval: int = 0  # 0: only after the last step
    recompute_activations: str = "none"  # none | selective | full (models/memory.py: what each stores)
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
        self.recompute_activations = recompute_mode(self.recompute_activations)

    def microbatches_per_rank(self, data_parallel_size: int) -> int:
        """Microbatches each data-parallel rank runs per optimizer step.

        Raises:
            ConfigError: ``queries_per_step`` does not split into ``data_parallel_size`` ranks x
                whole microbatches of ``queries_per_microbatch``.
        """
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


def optimizer_format(cfg: TrainConfig) -> str:
    """How this run's optimizer state is checkpointed: the distributed optimizer's configured
    format, or ``model_space`` (megatron-core's other optimizers store state per parameter)."""
    return cfg.optimizer.checkpoint_format if cfg.optimizer.use_distributed_optimizer else "model_space"


def run_layout(info: RuntimeInfo) -> Layout:
    """This process group's layout, as recorded in a checkpoint's trainer state."""
    parallel = info.parallel
    return Layout(world_size=info.launch.world_size, tensor=parallel.tensor, pipeline=parallel.pipeline,
                  expert=parallel.expert, context=parallel.context, data_parallel=info.data_parallel_size)


def save_training_checkpoint(run: TrainRun) -> Path:
    """Model + optimizer + trainer state, all staged and renamed; then the ``latest`` pointer
    (collective). Returns ``run_dir/checkpoints/step_N``, a checkpoint directory that exports
    like a converted one (its description copied from the source checkpoint).

    Raises:
        CheckpointError: a rank failed to write (e.g. the disk is full); nothing of this step's
            checkpoint remains and the previous one is still ``latest``.
    """
    checkpoints = run.run_dir / "checkpoints"
    final = checkpoints / f"step_{run.step:06d}"
    rank, fmt = dist.get_rank(), optimizer_format(run.cfg)
    state = TrainerState(step=run.step, position=run.position, optimizer_steps=optimizer_step_count(run.optimizer),
                         optimizer_format=fmt, layout=run_layout(run.info))
    try:
        with staged_output(final) as staging:
            if rank == 0:
                write_checkpoint_description(Path(run.cfg.checkpoint), staging)
                for sub in ("optimizer", "trainer_state/rng"):
                    (staging / sub).mkdir(parents=True)
                # The settings this checkpoint was trained with, what a resume compares against.
                atomic_write_text(staging / "trainer_state" / "config.yaml", run.resolved_yaml)
            dist.barrier()
            gather_parameters(run.ddp_model)  # optimizer.overlap_param_gather leaves them to the next forward
            save_weights(run.ddp_model, staging / "weights")
            save_optimizer(run.ddp_model, run.optimizer, staging / "optimizer", fmt)
            _agree_on_local_writes(lambda: _write_trainer_state(staging / "trainer_state", state, rank))
    except BaseException as err:  # noqa: B036 - DCP reports a failed write as a BaseException subclass
        if isinstance(err, KeyboardInterrupt | SystemExit | Preempted):
            raise
        raise CheckpointError(f"writing checkpoint {final} failed: {_write_failure(err, run.run_dir)}; fix that and "
                              f"rerun the same command to resume from {run.last_saved or 'the start'}.") from err
    if rank == 0:
        atomic_write_text(checkpoints / "latest", final.name + "\n")
    dist.barrier()
    return final


def _write_trainer_state(directory: Path, state: TrainerState, rank: int) -> None:
    if rank == 0:
        state.write(directory)
    torch.save(rng_state(), directory / "rng" / f"rank{rank:05d}.pt")


def _agree_on_local_writes(write: Callable[[], None]) -> None:
    """Run a per-rank write; if it fails on any rank, every rank raises (no rank is left waiting
    in the next collective)."""
    error: BaseException | None = None
    try:
        write()
    except (OSError, RuntimeError) as err:  # torch.save reports a full disk as RuntimeError
        error = err
    if any_rank(error is not None):
        raise error or CheckpointError("another rank failed to write its part of the checkpoint (see its log)")


def _write_failure(err: BaseException, run_dir: Path) -> str:
    """One clause for why a checkpoint write failed, naming a full disk when that is the cause."""
    import errno
    import shutil

    seen, pending = [], [err]
    while pending:
        current = pending.pop()
        if current is None or current in seen:
            continue
        seen.append(current)
        pending += [current.__cause__, current.__context__]
        pending += [pair[0] for pair in getattr(current, "failures", {}).values() if isinstance(pair, tuple)]
    text = " ".join(str(e) for e in seen)
    if any(getattr(e, "errno", None) == errno.ENOSPC for e in seen) or "No space left" in text or \
            "unexpected pos" in text:
        free_mb = shutil.disk_usage(run_dir).free / 2**20
        return f"no space left on the device of {run_dir} ({free_mb:.0f} MiB free)"
    oserrors = [e for e in seen if isinstance(e, OSError)]
    return str(oserrors[0] if oserrors else seen[-1]).splitlines()[0]


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The checkpoint ``run_dir/checkpoints/latest`` names, or None (a fresh run).

    Raises:
        CheckpointError: the pointer names a directory that is gone (starting over would drop the
            run's metrics and overwrite its checkpoints); the message lists those that exist. Or it
            holds no optimizer state (removed after a finished iteration): the message names the
            checkpoint to start a new run from.
    """
    pointer = run_dir / "checkpoints" / "latest"
    if not pointer.is_file():
        return None
    path = run_dir / "checkpoints" / pointer.read_text().strip()
    if not path.is_dir():
        present = sorted(p.name for p in pointer.parent.glob("step_*") if p.is_dir() and "." not in p.name)
        raise CheckpointError(f"{pointer} names {path.name}, which does not exist (present: "
                              f"{', '.join(present) or 'none'}); write the name of the checkpoint to resume from into "
                              f"it, or use a new run_dir.")
    if not (path / "optimizer").is_dir():
        raise CheckpointError(f"{path} holds weights but no optimizer state (sami-iterate's cleanup removes it once an "
                              f"iteration's training is done), so this run cannot continue where it stopped; train on "
                              f"from its weights in a new run_dir with checkpoint={path}.")
    return path


def load_training_state(path: Path, state: TrainerState, layout: Layout, ddp_model, optimizer) -> None:
    """Fill model, optimizer and (at the saved layout) this rank's RNGs from the training
    checkpoint ``path`` whose trainer state is ``state`` (collective). At another layout the RNG
    streams are this start's (seeded by ``seed``): nothing in a SAMI step draws from them unless
    the model has dropout.

    Raises:
        CheckpointError: the checkpoint's weights do not fit the model.
    """
    load_model_and_optimizer(ddp_model, optimizer, path / "weights", path / "optimizer", state.optimizer_format)
    set_optimizer_step_count(optimizer, state.optimizer_steps)
    if state.layout == layout:
        set_rng_state(torch.load(path / "trainer_state" / "rng" / f"rank{dist.get_rank():05d}.pt", weights_only=True))
    else:
        logger.warning("resuming %s (saved at %s) at %s: the data order and the optimizer state continue; the RNG "
                       "streams restart from this start's seed", path, state.layout.describe(), layout.describe())


def used_tokens(micro: dict[str, torch.Tensor]) -> int:
    """Tokens the model processes in a microbatch, padding excluded (pairs or shared prompts)."""
    if "segment_ids" in micro:
        return int((micro["segment_ids"] != PAD_SEGMENT).sum())
    return int(used_lengths(micro["loss_mask"]).sum())


def step_token_counts(micro: list[dict[str, torch.Tensor]]) -> tuple[float, float]:
    """(used, processed) tokens of the global batch, summed over data-parallel ranks: what the
    model's inputs hold without and with padding (collective)."""
    counts = torch.tensor([float(sum(used_tokens(m) for m in micro)),
                           float(sum(m["tokens"].numel() for m in micro))], dtype=torch.float64,
                          device=collective_device())
    sum_over_data_parallel(counts)
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
            rewrite_jsonl(self.path, lambda row: row["step"] <= resume_step)
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.board = SummaryWriter(str(run_dir / "tensorboard"), purge_step=resume_step + 1)
        except ImportError:  # pragma: no cover - tensorboard is a dependency
            logger.warning("tensorboard is not installed; metrics go to metrics.jsonl only")

    def write(self, row: dict) -> None:
        """Append one step's row (rank 0 only; other ranks' writers are disabled)."""
        if not self.enabled:
            return
        append_jsonl(self.path, row)
        if self.board is not None:
            for key, value in row.items():
                if key != "step" and isinstance(value, int | float):
                    self.board.add_scalar(f"train/{key}", value, row["step"])
            self.board.flush()

    def close(self) -> None:
        """Flush and close TensorBoard's event file."""
        if self.board is not None:
            self.board.close()


class StopRequest:
    """Set by SIGUSR1 (Slurm's time-limit warning, ``--signal``), SIGTERM (preemption, scancel) or
    SIGINT (Ctrl-C; torchrun passes it on to its workers); every rank stops after the same step,
    once the flag has been agreed over all ranks, and checkpoints. A second SIGINT stops at once,
    losing the step in progress. Each run owns one (:attr:`TrainRun.stop`)."""

    def __init__(self) -> None:
        self.requested = False

    def install(self) -> None:
        """Route SIGUSR1, SIGTERM and SIGINT of this process to this request."""
        for number in (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT):
            signal.signal(number, self._handle)

    def _handle(self, number, frame) -> None:
        self.requested = True
        if number == signal.SIGINT:
            signal.signal(signal.SIGINT, signal.default_int_handler)
            logger.warning("interrupted: checkpointing after this step (Ctrl-C again stops at once, losing it)")
            return
        logger.warning("received %s: checkpointing after this step", signal.Signals(number).name)

    def agreed(self) -> bool:
        """Whether any rank has been asked to stop (collective over all ranks)."""
        return any_rank(self.requested)


@dataclass
class TrainRun:
    """What a run holds from :func:`setup` to the end of the loop; :func:`run_step` advances it."""

    cfg: TrainConfig
    info: RuntimeInfo
    model_config: ModelConfig
    tokenized: list[dict[str, torch.Tensor]]
    num_constitutions: int
    ddp_model: torch.nn.Module
    optimizer: Any
    forward_step: Callable
    metrics: MetricsWriter
    stop: StopRequest
    num_microbatches: int  # per data-parallel rank and step
    data_parallel_rank: int
    share_prompts: bool
    multiple: int  # trimmed lengths are rounded up to this
    peak_tflops: float | None  # the GPU's dense peak, for MFU
    lock: RunLock | None  # the run directory's lock (rank 0)
    resolved_yaml: str  # this start's resolved config (saved with every checkpoint)
    step: int = 0  # optimizer steps done
    position: int = 0  # queries consumed from the endless seeded order
    last_saved: Path | None = None
    started_s: float = field(default_factory=time.perf_counter)
    first_step: int = 1  # the first step this process runs (for the ETA)

    @property
    def run_dir(self) -> Path:
        """The run directory (config, metrics, checkpoints)."""
        return Path(self.cfg.run_dir)


def read_training_data(cfg: TrainConfig) -> tuple[list[dict[str, torch.Tensor]], int]:
    """The records of ``cfg.data.records``, tokenized, and C (constitutions per query).

    Raises:
        DataError: the file is unreadable or malformed, or fewer records than one global batch
            (``queries_per_step``) exist or fit in ``data.seq_length``.
    """
    from transformers import AutoTokenizer

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
    return tokenized, records[0].num_constitutions


def _shares_prompts(cfg: TrainConfig, model: torch.nn.Module) -> bool:
    share_prompts = cfg.data.share_prompts and applies_attention_masks(model)
    if cfg.data.share_prompts and not share_prompts:
        logger.warning("data.share_prompts: this model's attention (Transformer Engine) ignores block masks; "
                       "training on the C x C (prompt, response) pairs instead.")
    return share_prompts


@dataclass
class Resume:
    """Where a start continues from: the checkpoint, its trainer state and the settings changed."""

    checkpoint: Path | None = None
    state: TrainerState | None = None
    changes: dict[str, tuple[object, object]] = field(default_factory=dict)


def claim_run_dir(cfg: TrainConfig, info: RuntimeInfo, resolved_yaml: str) -> tuple[RunLock | None, Resume]:
    """Before anything in the run directory is written (collective): take its lock (rank 0), find
    the checkpoint to resume from, check that its optimizer state loads at this layout and that
    the changed settings may change.

    Raises:
        OutputOverlapError: ``run_dir`` is, holds or lies inside the source checkpoint.
        RunInUse: another trainer holds the run directory.
        LayoutError: the saved optimizer state cannot be loaded at this layout.
        ConfigError: a setting changed that cannot change within a run.
        CheckpointError: the checkpoint's trainer state is missing or malformed.
    """
    run_dir = Path(cfg.run_dir)
    check_output_apart(run_dir, {"checkpoint": Path(cfg.checkpoint)})
    lock, refusal = None, None
    if info.is_rank0:
        try:
            lock = RunLock(run_dir, "sami-train").acquire()
        except RunInUse as err:
            refusal = str(err)
    if any_rank(refusal is not None):
        raise RunInUse(refusal or f"{run_dir} is in use by another trainer (rank 0 names it)")
    resume = Resume(checkpoint=latest_checkpoint(run_dir))
    if resume.checkpoint is not None:
        resume.state = TrainerState.read(resume.checkpoint / "trainer_state")
        check_layout(resume.state, run_layout(info), resume.checkpoint)
        saved = resume.checkpoint / "trainer_state" / "config.yaml"
        if not saved.is_file():
            raise CheckpointError(f"{resume.checkpoint} holds no trainer_state/config.yaml (the settings it was trained "
                                  f"with), so a resume cannot tell what changed; start a new run_dir.")
        resume.changes = config_changes(saved.read_text(), resolved_yaml, run_dir,
                                        typed=lambda values: to_typed(TrainConfig, values, "train"))
    return lock, resume


def setup(cfg: TrainConfig, info: RuntimeInfo, model_config: ModelConfig, resolved_yaml: str) -> TrainRun:
    """Run directory, data, model, DDP, optimizer and (from ``run_dir/checkpoints/latest``) the
    resumed state (collective). Installs the run's signal handlers.

    Raises:
        RunInUse, LayoutError, ConfigError, CheckpointError: see :func:`claim_run_dir`; also
            ConfigError when the batch sizes do not split over the data-parallel ranks.
        DataError: too few usable records (see :func:`read_training_data`).
        CheckpointError: the checkpoint's weights (or those resumed from) do not fit the model.
    """
    stop = StopRequest()
    stop.install()
    num_microbatches = cfg.microbatches_per_rank(info.data_parallel_size)
    tokenized, num_constitutions = read_training_data(cfg)  # refused input leaves no run directory
    check_vocabulary(tokenized, model_config.vocab_size, cfg.data.tokenizer or str(Path(cfg.checkpoint) / "hf"),
                     model_config.name)
    lock, resume = claim_run_dir(cfg, info, resolved_yaml)
    step, position = (resume.state.step, resume.state.position) if resume.state else (0, 0)
    if info.is_rank0:
        record_config(Path(cfg.run_dir), resolved_yaml, resume.changes, step)
    for key, (old, new) in resume.changes.items():
        logger.info("resume: %s changed from %r to %r (takes effect from step %d)", key, old, new, step + 1)
    _, model = load_checkpoint_model(Path(cfg.checkpoint), cfg.parallel, cfg.precision.params_dtype,
                                     cfg.data.seq_length, cfg.recompute_activations, precision=cfg.precision)
    ddp_model = wrap_ddp(model, cfg.optimizer)
    optimizer = build_optimizer(ddp_model, cfg.optimizer)
    if resume.state is not None:
        load_training_state(resume.checkpoint, resume.state, run_layout(info), ddp_model, optimizer)
        logger.info("resumed from %s at step %d", resume.checkpoint, step)
    peak = peak_tflops("fp8" if cfg.precision.fp8 else "bf16", cfg.precision.peak_tflops) \
        if cfg.precision.params_dtype == "bf16" or cfg.precision.peak_tflops else None
    return TrainRun(
        cfg=cfg, info=info, model_config=model_config, tokenized=tokenized, num_constitutions=num_constitutions,
        ddp_model=ddp_model, optimizer=optimizer,
        forward_step=sami_forward_step(num_constitutions, cfg.loss, model_config.vocab_size),
        metrics=MetricsWriter(Path(cfg.run_dir), step, info.is_rank0), stop=stop, num_microbatches=num_microbatches,
        data_parallel_rank=data_parallel_rank(), share_prompts=_shares_prompts(cfg, model),
        # Trimmed lengths stay divisible by TP (sequence parallelism) and, on GPUs, by 16.
        multiple=math.lcm(trim_alignment(bool(cfg.precision.fp8)), cfg.parallel.tensor),
        peak_tflops=peak, lock=lock, resolved_yaml=resolved_yaml, step=step, position=position, last_saved=resume.checkpoint,
        first_step=step + 1)


def next_microbatches(run: TrainRun) -> tuple[list[dict[str, torch.Tensor]], int]:
    """This rank's microbatches of the global batch at ``run.position`` (shared prompts, or pairs
    trimmed of unused padding) and their sequence length (tokens)."""
    cfg = run.cfg
    per_rank = cfg.queries_per_step // run.info.data_parallel_size
    global_batch = query_order(len(run.tokenized), run.position, cfg.queries_per_step, cfg.seed)
    first = run.data_parallel_rank * per_rank
    mine = [run.tokenized[i] for i in global_batch[first:first + per_rank]]
    size = cfg.queries_per_microbatch
    micro = [collate(mine[i * size:(i + 1) * size]) for i in range(run.num_microbatches)]
    each = cfg.parallel.pipeline == 1  # without pipeline stages, each microbatch has its own length
    if run.share_prompts:
        return share_microbatches(micro, run.num_constitutions, run.multiple, each=each)
    return trim_padding(micro, cfg.data.seq_length, run.multiple, each=each)


def metrics_row(run: TrainRun, result: StepResult, lr: float, micro: list[dict[str, torch.Tensor]], length: int,
                data_s: float, step_time_s: float) -> dict:
    """The step's row of metrics.jsonl (collective: token counts are summed over data-parallel ranks).

    Throughput counts the tokens the sequences use; model FLOPs (hence TFLOP/s and MFU) are
    counted as Megatron-LM counts them (:mod:`megatron_sami.alignment.flops`: real tokens, causal
    attention over each row's real blocks, logits where computed), per process.
    """
    tokens, _ = step_token_counts(micro)
    world_size = run.info.launch.world_size
    flops_step = torch.tensor([step_flops(run.model_config, micro)], dtype=torch.float64,
                              device=collective_device())
    flops = float(sum_over_data_parallel(flops_step)[0])
    tflops = flops / step_time_s / world_size / 1e12
    return {"step": run.step, **{key: result.logs[key] for key in METRIC_KEYS}, "lr": lr,
            "grad_norm": result.grad_norm, "tokens_per_s": tokens / step_time_s,
            "tokens_per_s_per_gpu": tokens / step_time_s / world_size, "step_time_s": step_time_s,
            "data_s": data_s, "forward_backward_s": result.forward_backward_s,
            "optimizer_s": result.optimizer_s, "tflops_per_gpu": tflops,
            "mfu": tflops / run.peak_tflops if run.peak_tflops else None, "world_size": world_size}


def run_step(run: TrainRun) -> dict:
    """One optimizer step of the run (collective); returns its metrics row."""
    cfg = run.cfg
    run.step += 1
    data_start = time.perf_counter()
    micro, length = next_microbatches(run)
    run.position += cfg.queries_per_step
    lr = cfg.lr_schedule.at(run.step, cfg.steps, cfg.optimizer.lr)
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    step_start = time.perf_counter()
    result = train_step(run.ddp_model, run.optimizer, run.forward_step, iter(micro), run.num_microbatches, length,
                        micro[0]["tokens"].shape[0])
    return metrics_row(run, result, lr, micro, length, data_s=step_start - data_start,
                       step_time_s=time.perf_counter() - data_start)


def log_progress(run: TrainRun, row: dict) -> None:
    """One log line per step: the loss terms, learning rate, throughput, MFU and the ETA (s)."""
    eta_s = (time.perf_counter() - run.started_s) / (run.step - run.first_step + 1) * (run.cfg.steps - run.step)
    flops_unit = "TFLOP/s/GPU" if torch.cuda.is_available() else "TFLOP/s/process"
    logger.info("step %d/%d  loss %.4f  acc row/col %.2f/%.2f  MI bound %.3f nats  lr %.2e  grad-norm %.3f  "
                "%.0f tokens/s  %.2f %s%s  ETA %.0f s", run.step, run.cfg.steps, row["loss"], row["acc_row"],
                row["acc_col"], row["mi_bound_nats"], row["lr"], row["grad_norm"], row["tokens_per_s"],
                row["tflops_per_gpu"], flops_unit, f"  MFU {row['mfu']:.1%}" if row["mfu"] is not None else "", eta_s)


def train(cfg: TrainConfig, resolved_yaml: str) -> Path:
    """Run (or resume) a SAMI training run; returns the final checkpoint directory (collective).

    Raises:
        ConfigError, LayoutError: the config or the layout does not fit the world or the model.
        DataError: too few usable records.
        ConversionError: ``cfg.checkpoint`` is not a checkpoint directory.
        CheckpointError: its weights (or those of the checkpoint resumed from) do not fit the model.
        RunInUse: another trainer works in ``run_dir``.
        CheckpointError: a checkpoint could not be written (e.g. a full disk).
        Preempted: SIGUSR1, SIGTERM or SIGINT arrived; the run checkpointed and can resume.
    """
    cfg.precision.check_hardware()  # FP8 without TE or a capable GPU: refused before any work
    model_config, _ = read_checkpoint_model(Path(cfg.checkpoint))
    if cfg.data.seq_length > model_config.max_position_embeddings:
        raise ConfigError(f"data.seq_length={cfg.data.seq_length} exceeds {model_config.name}'s max_position_embeddings "
                          f"({model_config.max_position_embeddings}); set data.seq_length to at most that.")
    with megatron_runtime(cfg.parallel, model=model_config, seed=cfg.seed, seq_length=cfg.data.seq_length) as info:
        run = setup(cfg, info, model_config, resolved_yaml)
        try:
            while run.step < cfg.steps:
                row = run_step(run)
                run.metrics.write(row)
                log_progress(run, row)
                stop = run.stop.agreed()
                if run.step == cfg.steps or stop or (cfg.save_interval and run.step % cfg.save_interval == 0):
                    run.last_saved = save_training_checkpoint(run)
                    logger.info("checkpoint %s", run.last_saved)
                if stop and run.step < cfg.steps:
                    raise Preempted(f"stopped by a signal after step {run.step}; checkpoint {run.last_saved}")
        finally:
            run.metrics.close()
            if run.lock is not None:
                run.lock.release()
        return run.last_saved
