"""MI scoring through Megatron (``sami-score``): each query's C x C log-probability matrices of a
checkpoint directory at a training layout, forward only, written as one JSON line per query.

SAMI (Fränken et al. 2024, "Self-Supervised Alignment with Mutual Information", arXiv:2404.14313)
evaluates a model by the matrix S[k, j] = log p(response j | constitution k, query) of each
held-out query; :mod:`megatron_sami.evaluation.mi` turns the matrices into its two estimators.
Here they are made the way the trainer makes them (:func:`~megatron_sami.alignment.step.score_matrices`
over the trainer's microbatches, shared prompts when the attention applies block masks), at any
TP/PP/EP/DP layout, so no process holds more than its part of the model. Queries are split over
the data-parallel ranks; the matrices come back to rank 0, which writes them.

Output (``output``, written atomically when every query is scored): one row per query, in the
order of the records, ``{"id", "sum": [C][C], "mean": [C][C], "response_tokens": [C]}``: S
summed over the response tokens and per token (nats), and each response's token count.
Finished chunks of ``queries_per_chunk`` queries are kept in ``<output>.parts/`` until then, so
a rerun of an interrupted job scores only what is missing (the parts are discarded when the
records, checkpoint, dtype, template or chunk size differ).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_sami.alignment.data import (
    PromptTemplate,
    SamiRecord,
    check_vocabulary,
    collate,
    parse_record,
    tokenize_record,
    used_lengths,
)
from megatron_sami.alignment.shared_prompt import share_microbatches
from megatron_sami.alignment.step import score_matrices
from megatron_sami.alignment.trainer import TrainConfig, trim_alignment, trim_padding
from megatron_sami.errors import ConfigError, DataError, OverlengthError
from megatron_sami.io import atomic_write_json, atomic_write_jsonl, check_output_apart
from megatron_sami.models.build import applies_attention_masks
from megatron_sami.models.checkpoint_dir import HF_DIR, load_checkpoint_model, read_checkpoint_model
from megatron_sami.models.config import PARAMS_DTYPES, ModelConfig
from megatron_sami.runtime.distributed import collective_device, launch_env_from, logger, megatron_runtime
from megatron_sami.runtime.layout import ParallelConfig
from megatron_sami.training.engine import data_parallel_rank, sum_over_data_parallel

SHARD_GLOB = "shard-*.jsonl"  # generation's shards (rollout.generation.shard_path)
FINGERPRINT_FILE = "source.json"


@dataclass
class ScoreConfig:
    """A ``sami-score`` run (configs/score.yaml).

    Raises:
        ConfigError: a size below 1, an unknown ``on_overlength`` or ``params_dtype``.
    """

    checkpoint: str = "???"  # a checkpoint directory (models/checkpoint_dir.py): converted or trained
    records: str = "???"  # a records JSONL file, or a directory of generation shards (shard-*.jsonl)
    output: str = "???"  # the matrices JSONL (module docstring)
    tokenizer: str | None = None  # default: the checkpoint's hf/ directory
    seq_length: int | None = None  # longest (prompt, response) sequence, tokens; null: the model's positions
    on_overlength: str = "error"  # error | drop: a record longer than seq_length
    # Each constitution's prompt once per query (alignment/shared_prompt.py): the same matrices
    # from fewer tokens; needs an attention that applies block masks, else the pairs are scored.
    share_prompts: bool = True
    queries_per_microbatch: int = 1
    queries_per_chunk: int = 64  # queries (over all data-parallel ranks) between two saved parts
    params_dtype: str | None = None  # bf16 | fp32; null: the dtype the checkpoint was converted to
    template: PromptTemplate = field(default_factory=PromptTemplate)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)

    def __post_init__(self) -> None:
        if self.queries_per_microbatch < 1 or self.queries_per_chunk < 1:
            raise ConfigError("queries_per_microbatch and queries_per_chunk must be >= 1.")
        if self.seq_length is not None and self.seq_length < 1:
            raise ConfigError(f"seq_length must be >= 1 (tokens) or null, got {self.seq_length}.")
        if self.on_overlength not in ("error", "drop"):
            raise ConfigError(f"on_overlength '{self.on_overlength}' is unknown; use error or drop.")
        if self.params_dtype is not None and self.params_dtype not in PARAMS_DTYPES:
            raise ConfigError(f"params_dtype '{self.params_dtype}' is not supported; use one of "
                              f"{', '.join(PARAMS_DTYPES)} or null (the checkpoint's).")


@dataclass
class ScoringData:
    """What scoring reads before any process group exists: the model's description, the records
    and their C*C (prompt, response) sequences, each trimmed to its used length."""

    model: ModelConfig
    records: list[SamiRecord]
    tokenized: list[dict[str, torch.Tensor]]  # per record {"tokens", "labels", "loss_mask"}: [C*C, used]
    num_constitutions: int
    dropped_empty: int = 0
    dropped_long: int = 0


# -- the command line the driver launches ---------------------------------------------------------


def override_arg(key: str, value: object) -> str:
    """One Hydra override ``key=value`` that reads back as exactly ``value``: strings single-quoted
    (spaces, commas, quotes, ``=`` and non-ASCII characters stay one literal value; ``${`` is not
    an interpolation), None as null, booleans lower-case.

    Hydra 1.3's grammar escapes only backslashes before a quote (or at the end of a quoted value)
    and the quote itself; OmegaConf then reads ``\\${`` as a literal ``${``.
    """
    if value is None:
        return f"{key}=null"
    if isinstance(value, bool):
        return f"{key}={str(value).lower()}"
    if not isinstance(value, str):
        return f"{key}={value}"
    text = re.sub(r"(\\*)\$\{", lambda m: m.group(1) * 2 + "\\${", value)
    text = re.sub(r"(\\*)'", lambda m: m.group(1) * 2 + "\\'", text)
    text = re.sub(r"(\\+)$", lambda m: m.group(1) * 2, text)
    return f"{key}='{text}'"


def score_args(train: TrainConfig, checkpoint: str | Path, records: str | Path, output: str | Path,
               **settings: object) -> list[str]:
    """``sami-score``'s command-line overrides that score ``records`` with ``checkpoint`` at the
    layout, dtype, template, tokenizer, microbatch size and prompt sharing of ``train`` (the
    settings every iteration's sami-train runs with), for the same launcher as training.

    Args:
        train: the run's sami-train settings (``Run.train_settings`` in the driver).
        checkpoint: a checkpoint directory: the trained one of iteration t, the base one for t = 0.
        records: a records JSONL file or a directory of generation shards.
        output: where the matrices JSONL goes.
        settings: further :class:`ScoreConfig` keys (dotted), e.g. ``queries_per_chunk=32``.

    Returns:
        Overrides for ``python -m megatron_sami.cli.score``.
    """
    values = {"checkpoint": str(checkpoint), "records": str(records), "output": str(output),
              "tokenizer": train.data.tokenizer, "params_dtype": train.precision.params_dtype,
              "share_prompts": train.data.share_prompts, "queries_per_microbatch": train.queries_per_microbatch,
              **{f"parallel.{key}": value for key, value in asdict(train.parallel).items()}, **settings}
    return [override_arg("template", train.template.name), *(override_arg(k, v) for k, v in values.items())]


# -- reading (no process group) -------------------------------------------------------------------


def _rows(path: Path) -> list[tuple[str, str]]:
    """(where, line) of every non-blank line of a records file or of a shard directory."""
    if path.is_dir():
        files = sorted(path.glob(SHARD_GLOB))
        if not files:
            raise DataError(f"{path} holds no {SHARD_GLOB} files; point records at a records file or a "
                            "generation shard directory.")
    elif path.is_file():
        files = [path]
    else:
        raise DataError(f"records {path} does not exist; check the records setting.")
    rows = []
    for file in files:
        for number, raw in enumerate(file.read_bytes().splitlines(), 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise DataError(f"{file}:{number}: byte {err.start + 1} is not UTF-8; save the records as UTF-8.") from None
            if line.strip():
                rows.append((f"{file}:{number}", line))
    seen: set[str] = set()
    repeated: set[str] = set()
    for _, line in rows:
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # parse_record names the line
        if isinstance(row, dict) and "id" in row:
            (repeated if str(row["id"]) in seen else seen).add(str(row["id"]))
    if repeated:
        raise DataError(f"{path}: record ids {', '.join(sorted(repeated)[:3])} appear more than once; give every "
                        "query its own id.")
    return rows


def read_scoring_records(path: str | Path) -> tuple[list[SamiRecord], int]:
    """The records to score, and how many were left out because a response is empty (as the MI
    evaluation leaves them out: an empty response has no tokens to score).

    Raises:
        DataError: no such file or shard directory, a malformed line, no record left, or records
            that differ in C.
    """
    records, empty = [], 0
    for where, line in _rows(Path(path)):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            row = None  # parse_record names the line
        responses = row.get("responses") if isinstance(row, dict) else None
        if isinstance(responses, list) and all(isinstance(text, str) for text in responses) and \
                not all(text.strip() for text in responses):
            empty += 1
            continue
        records.append(parse_record(line, where))
    if not records:
        raise DataError(f"{path} holds no record with C non-empty responses to score.")
    counts = {record.num_constitutions for record in records}
    if len(counts) > 1:
        raise DataError(f"{path}: records have C = {sorted(counts)} constitutions; all records scored together "
                        "must share C.")
    return records, empty


def trimmed_sequences(record: SamiRecord, tokenizer, template: PromptTemplate, seq_length: int) -> dict:
    """:func:`~megatron_sami.alignment.data.tokenize_record` cut to the columns the record uses
    (the padding up to ``seq_length`` would otherwise be held for every record)."""
    item = tokenize_record(record, tokenizer, template, seq_length)
    used = int(used_lengths(item["loss_mask"]).max())
    return {key: value[:, :used].clone() for key, value in item.items()}


def read_scoring_data(cfg: ScoreConfig, world_size: int | None = None) -> ScoringData:
    """Everything :func:`score` needs before its process group starts, checked: the checkpoint's
    description, the layout against it, the records and their token sequences.

    Args:
        world_size: the job's processes (default: the launcher's variables).

    Raises:
        OutputOverlapError: ``output`` (or its ``.parts`` directory) is, holds or lies inside an input.
        ConversionError: ``cfg.checkpoint`` is not a checkpoint directory.
        ConfigError: ``seq_length`` beyond the model's positions, or ``output`` is a directory or
            lies in a directory that does not exist.
        LayoutError: the layout does not fit the model or the world size.
        DataError: as :func:`read_scoring_records`, or no record fits ``seq_length``.
        OverlengthError: a record is longer than ``seq_length`` and ``on_overlength=error``.
    """
    from transformers import AutoTokenizer

    from megatron_sami.runtime.quiet import quiet_transformers

    # The output and its .parts directory (removed when stale) must not be or hold an input.
    inputs = {"records": Path(cfg.records), "checkpoint": Path(cfg.checkpoint)}
    check_output_apart(cfg.output, inputs, siblings=(".parts",))
    if Path(cfg.output).is_dir():
        raise ConfigError(f"output={cfg.output} is a directory; name a file for the matrices (e.g. "
                          f"{Path(cfg.output) / 'matrices.jsonl'}).")
    if not Path(cfg.output).resolve().parent.is_dir():
        raise ConfigError(f"output={cfg.output}: its directory does not exist; create it or choose another path.")
    model, _ = read_checkpoint_model(Path(cfg.checkpoint))
    if cfg.seq_length is not None and cfg.seq_length > model.max_position_embeddings:
        raise ConfigError(f"seq_length={cfg.seq_length} exceeds {model.name}'s max_position_embeddings "
                          f"({model.max_position_embeddings}); lower it or leave it null.")
    world_size = world_size or launch_env_from(os.environ).world_size
    cfg.parallel.validate(model, world_size, training=False)
    records, empty = read_scoring_records(cfg.records)
    quiet_transformers()
    tokenizer = AutoTokenizer.from_pretrained(cfg.tokenizer or str(Path(cfg.checkpoint) / HF_DIR))
    seq_length = cfg.seq_length or model.max_position_embeddings
    kept, tokenized = [], []
    for record in records:
        try:
            tokenized.append(trimmed_sequences(record, tokenizer, cfg.template, seq_length))
        except OverlengthError:
            if cfg.on_overlength == "error":
                raise
            continue
        kept.append(record)
    if not kept:
        raise DataError(f"no record of {cfg.records} fits seq_length={seq_length}; raise seq_length.")
    check_vocabulary(tokenized, model.vocab_size, cfg.tokenizer or str(Path(cfg.checkpoint) / HF_DIR), model.name)
    return ScoringData(model, kept, tokenized, records[0].num_constitutions, empty, len(records) - len(kept))


# -- scoring (collective) -------------------------------------------------------------------------


def data_parallel_share(num_queries: int, rank: int, size: int, per_microbatch: int) -> tuple[list[int], int]:
    """The queries (indices into a chunk of ``num_queries``) that data-parallel rank ``rank`` of
    ``size`` scores, and how many of them are its own: ranks take every ``size``-th query, then
    repeat a query until every rank runs the same number of whole microbatches of
    ``per_microbatch`` (expert-parallel ranks exchange tokens in every forward pass, and a
    pipeline exchanges fixed microbatch shapes); the repeats' matrices are dropped."""
    own = list(range(rank, num_queries, size))
    per_rank = math.ceil(math.ceil(num_queries / size) / per_microbatch) * per_microbatch
    return own + [own[-1] if own else 0] * (per_rank - len(own)), len(own)


def _padded(item: dict[str, torch.Tensor], length: int) -> dict[str, torch.Tensor]:
    """``item``'s [N, used] tensors right-padded with zeros to [N, length] (never read: attention is
    causal, padding trails the sequences and carries no loss)."""
    return {key: torch.nn.functional.pad(value, (0, length - value.shape[1])) for key, value in item.items()}


def scoring_microbatches(items: list[dict[str, torch.Tensor]], per_microbatch: int, num_constitutions: int,
                         multiple: int, share: bool, each: bool) -> list[dict[str, torch.Tensor]]:
    """The trainer's microbatches of these queries' C x C blocks (whole blocks of
    ``per_microbatch`` queries, lengths rounded up to ``multiple``): shared prompts with
    ``share``, else the pairs trimmed of unused padding; with ``each`` every microbatch has its
    own length (possible without pipeline parallelism), otherwise all have the longest."""
    width = -(-max(item["tokens"].shape[1] for item in items) // multiple) * multiple
    padded = [_padded(item, width) for item in items]
    micro = [collate(padded[i:i + per_microbatch]) for i in range(0, len(padded), per_microbatch)]
    if share:
        return share_microbatches(micro, num_constitutions, multiple, each)[0]
    return trim_padding(micro, width, multiple, each)[0]


@dataclass
class RankScorer:
    """This rank's part of the model and how its microbatches are made (:func:`build_rank_scorer`)."""

    model: torch.nn.Module
    vocab_size: int
    num_constitutions: int
    per_microbatch: int
    multiple: int
    share: bool
    each: bool
    data_parallel_size: int


def score_chunk(scorer: RankScorer, items: list[dict[str, torch.Tensor]]) -> torch.Tensor:
    """The summed log-probability matrices [Q, C, C] (fp32, nats) of a chunk of Q queries, on
    every rank (collective): each data-parallel rank scores its share, a sum over the
    data-parallel group (of zeros where another rank scored) gathers them."""
    C = scorer.num_constitutions
    share, own = data_parallel_share(len(items), data_parallel_rank(), scorer.data_parallel_size,
                                     scorer.per_microbatch)
    micro = scoring_microbatches([items[i] for i in share], scorer.per_microbatch, C, scorer.multiple,
                                 scorer.share, scorer.each)
    sums_BCC = score_matrices(scorer.model, micro, C, scorer.vocab_size, reduction="sum")
    gathered_QCC = torch.zeros(len(items), C, C, device=collective_device())
    if own:
        gathered_QCC[share[:own]] = sums_BCC[:own].to(gathered_QCC.device)
    return sum_over_data_parallel(gathered_QCC).cpu()


def matrices_row(record: SamiRecord, item: dict[str, torch.Tensor], sum_CC: torch.Tensor) -> dict:
    """One output row: the query's id, its summed and per-token matrices, its response lengths."""
    C = record.num_constitutions
    tokens_CC = item["loss_mask"].sum(dim=1).view(C, C)
    mean_CC = sum_CC / tokens_CC.clamp(min=1)
    return {"id": record.id, "sum": sum_CC.tolist(), "mean": mean_CC.tolist(),
            "response_tokens": [int(n) for n in tokens_CC[0].tolist()]}


# -- parts of an interrupted run ------------------------------------------------------------------


def parts_dir(output: str | Path) -> Path:
    """Where finished chunks wait until the whole output is written: ``<output>.parts``."""
    output = Path(output)
    return output.with_name(output.name + ".parts")


def part_path(output: str | Path, chunk: int) -> Path:
    """The rows of chunk ``chunk``: ``<output>.parts/part-NNNNN.jsonl``."""
    return parts_dir(output) / f"part-{chunk:05d}.jsonl"


def fingerprint(cfg: ScoreConfig, records: list[SamiRecord]) -> dict:
    """What a kept part must have been scored from: the records, the checkpoint, the dtype, the
    template and the chunk size (the layout and prompt sharing do not change the matrices)."""
    digest = hashlib.sha256()
    for record in records:
        digest.update(json.dumps([record.id, record.query, record.constitutions, record.responses]).encode())
        digest.update(b"\n")
    return {"records_sha256": digest.hexdigest(), "checkpoint": str(Path(cfg.checkpoint).resolve()),
            "params_dtype": cfg.params_dtype, "template": asdict(cfg.template),
            "queries_per_chunk": cfg.queries_per_chunk, "num_records": len(records)}


def chunks_to_score(cfg: ScoreConfig, records: list[SamiRecord]) -> list[int]:
    """The chunks that have no kept part (one process: rank 0). Parts scored from something else
    (:func:`fingerprint`) are discarded first."""
    parts, expected = parts_dir(cfg.output), fingerprint(cfg, records)
    source = parts / FINGERPRINT_FILE
    if parts.exists() and (not source.is_file() or json.loads(source.read_text()) != expected):
        logger.info("scoring: discarding the parts in %s (scored from other records or settings)", parts)
        shutil.rmtree(parts)
    if not parts.exists():
        parts.mkdir(parents=True)
        atomic_write_json(source, expected)
    num_chunks = math.ceil(len(records) / cfg.queries_per_chunk)
    todo = [chunk for chunk in range(num_chunks) if not part_path(cfg.output, chunk).is_file()]
    if len(todo) < num_chunks:
        logger.info("scoring: %d of %d chunks already scored in %s", num_chunks - len(todo), num_chunks, parts)
    return todo


def finish_output(cfg: ScoreConfig, num_records: int) -> None:
    """Join the parts into ``output`` (atomically) and remove them (one process: rank 0)."""
    rows = []
    for chunk in range(math.ceil(num_records / cfg.queries_per_chunk)):
        with part_path(cfg.output, chunk).open(encoding="utf-8") as handle:
            rows += [json.loads(line) for line in handle if line.strip()]
    atomic_write_jsonl(cfg.output, rows)
    shutil.rmtree(parts_dir(cfg.output))


def _broadcast(value: object) -> object:
    """Rank 0's ``value`` on every rank (collective)."""
    holder = [value]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def build_rank_scorer(cfg: ScoreConfig, data: ScoringData, data_parallel_size: int) -> RankScorer:
    """Load the checkpoint at the layout (collective) and settle how microbatches are made, as
    the trainer does: shared prompts only where the attention applies block masks, lengths
    rounded for TP (and for GPU kernels), one length per step under pipeline parallelism."""
    longest = max(item["tokens"].shape[1] for item in data.tokenized)
    _, model = load_checkpoint_model(Path(cfg.checkpoint), cfg.parallel, cfg.params_dtype,
                                     cfg.seq_length or longest)
    model.eval()
    share = cfg.share_prompts and applies_attention_masks(model)
    if cfg.share_prompts and not share and dist.get_rank() == 0:
        logger.warning("share_prompts: this model's attention (Transformer Engine) ignores block masks; "
                       "scoring the C x C (prompt, response) pairs instead.")
    return RankScorer(model, data.model.vocab_size, data.num_constitutions, cfg.queries_per_microbatch,
                      math.lcm(trim_alignment(False), cfg.parallel.tensor), share, cfg.parallel.pipeline == 1,
                      data_parallel_size)


def score(cfg: ScoreConfig, data: ScoringData | None = None) -> Path:
    """Score every record of ``cfg.records`` with ``cfg.checkpoint`` at ``cfg.parallel`` and write
    ``cfg.output`` (module docstring); returns its path (collective: run by every rank).

    Args:
        data: what :func:`read_scoring_data` returned for ``cfg`` (read here when None).

    Raises:
        ConversionError, ConfigError, LayoutError, DataError, OverlengthError: as
            :func:`read_scoring_data`; ConfigError also for context parallelism (CP > 1).
        CheckpointError: the checkpoint's weights do not fit the model.
    """
    if data is None:
        data = read_scoring_data(cfg)
    with megatron_runtime(cfg.parallel) as info:
        if info.is_rank0 and (data.dropped_empty or data.dropped_long):
            logger.warning("scoring: left out %d records with an empty response and %d longer than seq_length",
                           data.dropped_empty, data.dropped_long)
        scorer = build_rank_scorer(cfg, data, info.data_parallel_size)
        todo = _broadcast(chunks_to_score(cfg, data.records) if info.is_rank0 else None)
        size = cfg.queries_per_chunk
        for done, chunk in enumerate(todo, start=1):
            first = chunk * size
            records, items = data.records[first:first + size], data.tokenized[first:first + size]
            sums_QCC = score_chunk(scorer, items)
            if info.is_rank0:
                atomic_write_jsonl(part_path(cfg.output, chunk),
                                   [matrices_row(r, i, s) for r, i, s in zip(records, items, sums_QCC, strict=True)])
                logger.info("scoring: chunk %d/%d (%d queries) done", done, len(todo), len(records))
        if info.is_rank0:
            finish_output(cfg, len(data.records))
            logger.info("scoring: %d queries x C=%d -> %s", len(data.records), data.num_constitutions, cfg.output)
        dist.barrier()
    return Path(cfg.output)
