"""Generation backends behind one interface, and records written in atomic, resumable shards.

Backends (``generation.backend``):

- ``hf``: transformers ``generate`` on an HF directory, batched, on CPU or one GPU.
- ``vllm``: offline ``vllm.LLM`` with tensor parallelism on an HF directory (an optional extra
  for GPU clusters; refused with a sentence where vLLM is not installed).
- ``megatron``: reserved for Megatron-Core's inference engine (GPU); refused for now.

Each backend returns, per prompt, the response text cut at the first stop string and whether it
*finished* (EOS or a stop string) rather than running into ``max_new_tokens``.

Records are written in shards of ``shard_size`` queries (:func:`generate_records`). A shard's
rows depend only on its queries and the seed, never on which process wrote it, so shards can be
spread over nodes: node k of N writes the job's shards k, k + N, ... (:func:`assigned_shards`), each node
with its own engine. ``sami-iterate`` runs a :class:`GenerationJob` that way
(``python -m megatron_sami.cli.generate``, one task per node) and the records are byte-identical
at any node count. Beside each shard, ``written_by/shard-NNNNN.json`` names the node that wrote it.
"""

from __future__ import annotations

import json
import os
import random
import socket
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from megatron_sami.alignment.data import PromptTemplate
from megatron_sami.errors import ConfigError, DataError, EnvironmentSetupError
from megatron_sami.io import atomic_write_json, atomic_write_jsonl
from megatron_sami.rollout.constitutions import (
    ConstitutionSet,
    SamplingConfig,
    evaluation_constitutions,
    load_constitution_set,
    positive_constitution,
    sample_constitutions,
)
from megatron_sami.rollout.queries import Query
from megatron_sami.runtime.distributed import logger

BACKENDS = ("hf", "vllm", "megatron")


@dataclass
class GenerationConfig:
    """How responses are generated (``generation.*``); the defaults are greedy decoding with 350
    new tokens, as in Fränken et al. 2024, arXiv:2404.14313.

    Raises:
        ConfigError: an unknown backend, a size < 1, a negative temperature or top_p outside (0, 1].
    """

    backend: str = "hf"
    max_new_tokens: int = 350
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    stop: list[str] = field(default_factory=lambda: ["\n\nHuman:", "\nHuman:", "<|im_end|>"])
    batch_size: int = 16
    shard_size: int = 64  # queries per records shard
    dtype: str = "auto"  # auto: bf16 on GPU, fp32 on CPU
    tensor_parallel: int = 1  # vllm only
    # vllm only: the share of each GPU's memory the engine may take (weights + KV cache), and the
    # longest sequence it must hold (null: the model's own limit, 8192 for Llama 3, 131072 for
    # 3.1). Both reach vllm.LLM; sami-check-config reports the KV cache's capacity in sequences of
    # max_model_len tokens, or of data.seq_length when it is null.
    gpu_memory_utilization: float = 0.9
    max_model_len: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ConfigError(f"unknown generation backend '{self.backend}'; use one of: {', '.join(BACKENDS)}.")
        if self.max_new_tokens < 1 or self.batch_size < 1 or self.shard_size < 1:
            raise ConfigError("generation.max_new_tokens, batch_size and shard_size must be >= 1.")
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise ConfigError("generation.temperature must be >= 0 and top_p in (0, 1].")
        if not 0 < self.gpu_memory_utilization <= 1 or (self.max_model_len is not None and self.max_model_len < 1):
            raise ConfigError("generation.gpu_memory_utilization must be in (0, 1] and max_model_len >= 1 (or null).")


@dataclass(frozen=True)
class Completion:
    """One response: its text (stripped, cut at a stop string), whether it ended by itself (EOS
    or a stop string) rather than at ``max_new_tokens``, and its number of tokens."""

    text: str
    finished: bool
    num_tokens: int


def cut_at_stop(text: str, stops: Sequence[str]) -> tuple[str, bool]:
    """The text before the earliest stop string, and whether one was found."""
    positions = [text.find(stop) for stop in stops if stop and stop in text]
    if not positions:
        return text, False
    return text[:min(positions)], True


class HFBackend:
    """transformers ``generate``; left padding so a batch of prompts decodes together."""

    def __init__(self, model_dir: str | Path, cfg: GenerationConfig) -> None:
        """Load the HF model in ``model_dir`` on the GPU when there is one (``cfg.dtype``; auto:
        bf16 on GPU, fp32 on CPU)."""
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from megatron_sami.runtime.quiet import quiet_transformers

        quiet_transformers()
        self.cfg = cfg
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        dtype = {"auto": torch.bfloat16 if self.device == "cuda" else torch.float32, "bf16": torch.bfloat16,
                 "fp16": torch.float16, "fp32": torch.float32}[cfg.dtype]
        self.tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype).to(self.device).eval()

    def generate(self, prompts: list[str]) -> list[Completion]:
        """One completion per prompt, in order, ``cfg.batch_size`` prompts at a time."""
        import torch

        results: list[Completion] = []
        eos_ids = self._eos_ids()
        for start in range(0, len(prompts), self.cfg.batch_size):
            batch = self.tokenizer(prompts[start:start + self.cfg.batch_size], return_tensors="pt", padding=True)
            batch = {key: value.to(self.device) for key, value in batch.items()}
            sampling = {"do_sample": False} if self.cfg.temperature == 0 else {
                "do_sample": True, "temperature": self.cfg.temperature, "top_p": self.cfg.top_p}
            torch.manual_seed(self.cfg.seed + start)
            with torch.no_grad():
                output = self.model.generate(**batch, max_new_tokens=self.cfg.max_new_tokens,
                                             pad_token_id=self.tokenizer.pad_token_id,
                                             stop_strings=[s for s in self.cfg.stop if s] or None,
                                             tokenizer=self.tokenizer, **sampling)
            new_tokens = output[:, batch["input_ids"].shape[1]:].cpu()
            for row in new_tokens.tolist():
                results.append(self._completion(row, eos_ids))
        return results

    def _eos_ids(self) -> set[int]:
        ids = self.model.generation_config.eos_token_id
        ids = ids if isinstance(ids, list) else [ids]
        return {i for i in ids + [self.tokenizer.eos_token_id] if i is not None}

    def _completion(self, row: list[int], eos_ids: set[int]) -> Completion:
        pad = self.tokenizer.pad_token_id
        hit_eos = next((i for i, token in enumerate(row) if token in eos_ids), None)
        kept = row if hit_eos is None else row[:hit_eos]
        kept = [t for t in kept if t != pad] if pad not in eos_ids else kept
        text = self.tokenizer.decode(kept, skip_special_tokens=True)
        text, stopped = cut_at_stop(text, self.cfg.stop)
        return Completion(text.strip(), hit_eos is not None or stopped, len(kept))


class VLLMBackend:
    """Offline vLLM with tensor parallelism: the backend for GPU clusters."""

    def __init__(self, model_dir: str | Path, cfg: GenerationConfig) -> None:
        """Start ``vllm.LLM`` on ``model_dir`` over ``cfg.tensor_parallel`` GPUs.

        Raises:
            EnvironmentSetupError: vLLM is not installed.
        """
        try:
            import vllm
        except ImportError as err:
            raise EnvironmentSetupError("generation backend 'vllm' is not installed; install vllm on the GPU machines "
                                        "(pip install vllm) or use generation.backend=hf.") from err
        self.cfg = cfg
        self.llm = vllm.LLM(**vllm_engine_args(model_dir, cfg))
        self.params = vllm.SamplingParams(**vllm_sampling_args(cfg))

    def generate(self, prompts: list[str]) -> list[Completion]:
        """One completion per prompt, in order."""
        outputs = self.llm.generate(prompts, self.params, use_tqdm=False)
        return [Completion(o.outputs[0].text.strip(), o.outputs[0].finish_reason == "stop",
                           len(o.outputs[0].token_ids)) for o in outputs]


def vllm_engine_args(model_dir: str | Path, cfg: GenerationConfig) -> dict:
    """The keyword arguments of ``vllm.LLM``: one engine over ``cfg.tensor_parallel`` GPUs (the
    GPUs of one node when the driver launches one engine per node), its memory share and length.

    "auto" dtype is bf16 on GPUs, as for the hf backend (vLLM's own "auto" turns an fp32 config
    into fp16).
    """
    dtype = {"auto": "bfloat16", "bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}[cfg.dtype]
    return {"model": str(model_dir), "tensor_parallel_size": cfg.tensor_parallel, "dtype": dtype, "seed": cfg.seed,
            "gpu_memory_utilization": cfg.gpu_memory_utilization, "max_model_len": cfg.max_model_len}


def vllm_sampling_args(cfg: GenerationConfig) -> dict:
    """The keyword arguments of ``vllm.SamplingParams``; a fixed per-request seed makes a prompt's
    sample independent of the batch (and the node) it is generated in."""
    return {"temperature": cfg.temperature, "top_p": cfg.top_p, "max_tokens": cfg.max_new_tokens,
            "stop": [s for s in cfg.stop if s], "seed": cfg.seed}


def check_engine_devices(cfg: GenerationConfig, num_visible_gpus: int) -> None:
    """Refuse a vLLM engine wider than the GPUs its process sees, before the model is loaded.

    Raises:
        EnvironmentSetupError: ``cfg.tensor_parallel`` > ``num_visible_gpus`` with the vllm backend.
    """
    if cfg.backend == "vllm" and cfg.tensor_parallel > num_visible_gpus:
        raise EnvironmentSetupError(
            f"generation.tensor_parallel={cfg.tensor_parallel} but this node's generation process sees "
            f"{num_visible_gpus} GPU(s); set generation.tensor_parallel to the GPUs per node (one engine per node) "
            f"or give the job that many GPUs per node.")


def check_backend_available(cfg: GenerationConfig) -> None:
    """Refuse a backend that cannot run here, before any work is done.

    Raises:
        EnvironmentSetupError: ``vllm`` without vLLM installed, or ``megatron`` (not available yet).
    """
    import importlib.util

    if cfg.backend == "vllm" and importlib.util.find_spec("vllm") is None:
        raise EnvironmentSetupError("generation backend 'vllm' is not installed; install vllm on the GPU machines "
                                    "(pip install vllm) or use generation.backend=hf.")
    if cfg.backend == "megatron":
        raise EnvironmentSetupError("generation backend 'megatron' (Megatron-Core's inference engine) is not "
                                    "available in this version; use generation.backend=hf or vllm.")


def make_backend(model_dir: str | Path, cfg: GenerationConfig):
    """The ``cfg.backend`` backend (:class:`HFBackend` or :class:`VLLMBackend`) on ``model_dir``.

    Raises:
        ConfigError: ``model_dir`` is not an HF model directory.
        EnvironmentSetupError: as :func:`check_backend_available`.
    """
    if not (Path(model_dir) / "config.json").is_file():
        raise ConfigError(f"{model_dir} is not an HF model directory (no config.json); export the checkpoint first.")
    check_backend_available(cfg)
    return HFBackend(model_dir, cfg) if cfg.backend == "hf" else VLLMBackend(model_dir, cfg)


# The constitution samplers a GenerationTask may name.
SAMPLERS: dict[str, Callable] = {"sample": sample_constitutions, "evaluation": evaluation_constitutions,
                                 "positive": positive_constitution}


def query_rng(seed: int, query: Query) -> random.Random:
    """The generator that samples one query's constitutions: the same on every rerun."""
    return random.Random(f"{seed}:{query.id}")


def shard_path(out_dir: Path, index: int) -> Path:
    """``out_dir/shard-NNNNN.jsonl``."""
    return out_dir / f"shard-{index:05d}.jsonl"


def shard_paths(out_dir: Path, num_queries: int, shard_size: int) -> list[Path]:
    """Every shard of ``num_queries`` queries in shards of ``shard_size``, in query order."""
    return [shard_path(out_dir, index) for index in range(-(-num_queries // shard_size))]


def assigned_shards(num_shards: int, node: int, num_nodes: int, offset: int = 0) -> list[int]:
    """The shards node ``node`` of ``num_nodes`` writes: round robin over the job's shards, this
    set's first being the job's shard ``offset`` (so that the nodes' shares of a whole job differ
    by at most one shard, also when each of its sets has fewer shards than there are nodes).

    Raises:
        ConfigError: ``node`` is not in ``[0, num_nodes)``.
    """
    if not 0 <= node < num_nodes:
        raise ConfigError(f"generation node {node} is not one of the {num_nodes} nodes (0..{num_nodes - 1}).")
    return [index for index in range(num_shards) if (offset + index) % num_nodes == node]


def writer_path(shard: Path) -> Path:
    """``written_by/shard-NNNNN.json`` beside ``shard``: who wrote it, when and how fast."""
    return shard.parent / "written_by" / f"{shard.stem}.json"


def node_name() -> str:
    """This process's node: Slurm's name for it (``SLURMD_NODENAME``), else the host name."""
    return os.environ.get("SLURMD_NODENAME") or socket.gethostname()


def shard_writers(shards: list[Path]) -> dict[str, int]:
    """How many of ``shards`` each node wrote (``{node name: count}``; ``unknown`` where a
    shard's ``written_by`` file is missing, e.g. written by an older version)."""
    names = []
    for shard in shards:
        try:
            names.append(json.loads(writer_path(shard).read_text(encoding="utf-8"))["node"])
        except (OSError, ValueError, KeyError, TypeError):
            names.append("unknown")
    return dict(sorted(Counter(names).items()))


def generate_records(backend_factory, queries: list[Query], cset: ConstitutionSet, sampling: SamplingConfig,
                     template: PromptTemplate, out_dir: Path, shard_size: int, seed: int,
                     sample=sample_constitutions, before_shard=None, node: int = 0, num_nodes: int = 1,
                     offset: int = 0) -> list[Path]:
    """Records (one per query, C responses) in shards; completed shards are kept and skipped.

    Queries are cut into shards of ``shard_size`` under ``out_dir``; this process writes the
    missing ones of its share, :func:`assigned_shards` of ``node`` of ``num_nodes`` (all of
    them for one node), counted from the job's shard ``offset``. Each query's constitutions are drawn by ``sample(cset, sampling, rng)``
    (default :func:`sample_constitutions`) with :func:`query_rng` of ``seed``, so a rerun, or
    another node, draws the same ones. A record row is ``{"id", "query", "constitutions",
    "responses", "metadata": {"principles", "signs", "finished", "num_tokens"}}``; beside each
    shard, :func:`writer_path` records the node that wrote it.
    ``backend_factory`` is called only when a shard of this share is missing, so a finished
    phase loads no model.
    ``before_shard()`` runs before each shard (the driver raises there when asked to stop).

    Returns:
        All the shard paths, in query order (with several nodes, the other nodes' may not exist yet).

    Raises:
        ConfigError: as ``sample`` and :func:`assigned_shards`; whatever ``backend_factory`` and
            ``before_shard`` raise.
    """
    (out_dir / "written_by").mkdir(parents=True, exist_ok=True)
    shards = [queries[i:i + shard_size] for i in range(0, len(queries), shard_size)]
    paths = shard_paths(out_dir, len(queries), shard_size)
    mine = assigned_shards(len(shards), node, num_nodes, offset)
    todo = [index for index in mine if not paths[index].exists()]
    share = "" if num_nodes == 1 else f" (node {node} of {num_nodes}: {len(mine)} shards)"
    if len(todo) < len(mine):
        logger.info("generation: %d of %d shards already complete in %s%s", len(mine) - len(todo), len(mine),
                    out_dir, share)
    backend = backend_factory() if todo else None
    start, total_tokens = time.perf_counter(), 0
    for done, index in enumerate(todo, start=1):
        if before_shard is not None:
            before_shard()
        shard_start = time.perf_counter()
        rows = _generate_shard(backend, shards[index], cset, sampling, template, seed, sample)
        atomic_write_jsonl(paths[index], rows)
        tokens = sum(sum(r["metadata"]["num_tokens"]) for r in rows)
        atomic_write_json(writer_path(paths[index]), {
            "node": node_name(), "host": socket.gethostname(), "node_index": node, "num_nodes": num_nodes,
            "seconds": round(time.perf_counter() - shard_start, 3), "num_tokens": tokens})
        total_tokens += tokens
        elapsed = time.perf_counter() - start
        logger.info("generation shard %d/%d%s: %d queries x %d responses, %.0f tokens/s, ETA %.0f s", index + 1,
                    len(shards), share, len(rows), sampling.num_constitutions, total_tokens / elapsed,
                    elapsed / done * (len(todo) - done))
    return paths


@dataclass
class GenerationTask:
    """One query set's records in shards under ``out_dir``: each query's constitutions drawn by
    the sampler named ``sampler`` (:data:`SAMPLERS`) under ``sampling``, per-query seeds from
    ``seed`` (:func:`query_rng`).

    Raises:
        ConfigError: an unknown sampler.
    """

    out_dir: str
    sampling: SamplingConfig
    sampler: str = "sample"
    seed: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.sampling, dict):
            self.sampling = SamplingConfig(**self.sampling)
        if self.sampler not in SAMPLERS:
            raise ConfigError(f"unknown constitution sampler '{self.sampler}'; use one of: {', '.join(SAMPLERS)}.")


def run_task(backend_factory, queries: list[Query], cset: ConstitutionSet, template: PromptTemplate,
             task: GenerationTask, shard_size: int, before_shard=None, node: int = 0,
             num_nodes: int = 1, offset: int = 0) -> list[Path]:
    """:func:`generate_records` of one task (this node's share of it); returns all its shard paths.

    Raises:
        As :func:`generate_records`.
    """
    return generate_records(backend_factory, queries, cset, task.sampling, template, Path(task.out_dir), shard_size,
                            task.seed, sample=SAMPLERS[task.sampler], before_shard=before_shard, node=node,
                            num_nodes=num_nodes, offset=offset)


@dataclass
class GenerationJob:
    """What one launch of ``python -m megatron_sami.cli.generate`` generates: ``tasks`` on the
    queries of ``queries`` (a JSONL file of ``{"id", "text"}`` rows) with the HF model in
    ``model``, all through one engine per node. Written as JSON by :func:`write_job`."""

    model: str
    queries: str
    constitution_set: str  # a catalogue name or a .yaml path
    template: PromptTemplate
    generation: GenerationConfig
    tasks: list[GenerationTask]

    def read_queries(self) -> list[Query]:
        """The job's queries, in order.

        Raises:
            DataError: the queries file is missing or not JSONL of ``{"id", "text"}`` rows.
        """
        try:
            with open(self.queries, encoding="utf-8") as handle:
                return [Query(**json.loads(line)) for line in handle if line.strip()]
        except (OSError, ValueError, TypeError) as err:
            raise DataError(f"cannot read the generation queries {self.queries} ({err}); rerun sami-iterate, which "
                            f"writes them.") from err

    def missing_shards(self) -> list[Path]:
        """The shards of every task that do not exist yet (none: the job is complete)."""
        count = len(self.read_queries())
        return [path for task in self.tasks for path in shard_paths(Path(task.out_dir), count,
                                                                     self.generation.shard_size)
                if not path.exists()]

    def shards(self) -> list[Path]:
        """Every shard of every task, in task and query order."""
        count = len(self.read_queries())
        return [path for task in self.tasks
                for path in shard_paths(Path(task.out_dir), count, self.generation.shard_size)]


def write_job(path: Path, job: GenerationJob) -> None:
    """``job`` as JSON at ``path`` (atomically; its folder made), for :func:`read_job`."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, asdict(job))


def read_job(path: Path) -> GenerationJob:
    """The job :func:`write_job` wrote at ``path``.

    Raises:
        DataError: the file is missing or is not such a job.
        ConfigError: a setting in it is invalid.
    """
    try:
        values = json.loads(Path(path).read_text(encoding="utf-8"))
        return GenerationJob(model=values["model"], queries=values["queries"],
                             constitution_set=values["constitution_set"], template=PromptTemplate(**values["template"]),
                             generation=GenerationConfig(**values["generation"]),
                             tasks=[GenerationTask(**task) for task in values["tasks"]])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise DataError(f"{path} is not a generation job written by sami-iterate ({err}); rerun sami-iterate, which "
                        f"writes it.") from err


def run_job(job: GenerationJob, node: int = 0, num_nodes: int = 1, before_shard=None,
            num_visible_gpus: int | None = None) -> list[Path]:
    """This node's share of every task of ``job``, through one engine, built when a shard of
    the share is missing; returns all the job's shard paths.

    Raises:
        EnvironmentSetupError: the backend cannot run here, or a vLLM engine is wider than the
            ``num_visible_gpus`` this process sees (:func:`check_engine_devices`).
        ConfigError, DataError: as :func:`read_job`'s checks and :func:`generate_records`.
    """
    queries, cset = job.read_queries(), load_constitution_set(job.constitution_set)
    engine: list = []

    def backend():
        if not engine:
            check_backend_available(job.generation)
            if num_visible_gpus is not None:
                check_engine_devices(job.generation, num_visible_gpus)
            engine.append(make_backend(job.model, job.generation))
        return engine[0]

    paths: list[Path] = []
    for task in job.tasks:  # each set's shards continue the round robin where the previous set's ended
        paths += run_task(backend, queries, cset, job.template, task, job.generation.shard_size, before_shard,
                          node, num_nodes, offset=len(paths))
    return paths


def _generate_shard(backend, shard: list[Query], cset: ConstitutionSet, sampling: SamplingConfig,
                    template: PromptTemplate, seed: int, sample) -> list[dict]:
    drawn = [sample(cset, sampling, query_rng(seed, query)) for query in shard]
    prompts = [template.render(c.text, q.text) for q, d in zip(shard, drawn, strict=False) for c in d.constitutions]
    completions = backend.generate(prompts)
    rows, per_query = [], len(drawn[0].constitutions) if drawn else 0
    for position, (query, constitutions) in enumerate(zip(shard, drawn, strict=False)):
        mine = completions[position * per_query:(position + 1) * per_query]
        rows.append({
            "id": query.id, "query": query.text, "constitutions": constitutions.texts(),
            "responses": [c.text for c in mine],
            "metadata": {"principles": list(constitutions.constitutions[0].principles),
                         "signs": [list(c.signs) for c in constitutions.constitutions],
                         "finished": [c.finished for c in mine], "num_tokens": [c.num_tokens for c in mine]},
        })
    return rows


def read_shards(paths: list[Path]) -> list[dict]:
    """Every row of the JSONL files, in order."""
    rows = []
    for path in paths:
        with path.open() as handle:
            rows += [json.loads(line) for line in handle if line.strip()]
    return rows
