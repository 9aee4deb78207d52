"""The expert-iteration driver (``sami-iterate``): generate, filter, train, export, evaluate.

For iteration t = 1..T: the model of iteration t-1 (t = 1: the base model) generates one
response per (query, constitution) on a fresh, disjoint query set; the records are filtered;
the BASE model (or, with ``train_from=previous``, the last iteration's) is trained on them with
``sami-train`` for a few steps; the result is exported to HF and its mutual information is
evaluated on held-out queries (the base model is evaluated once, as iteration 0). Between
training and export, ``iterT/cleanup`` keeps only the final checkpoint's weights of the finished
training (:mod:`megatron_sami.iteration.pruning`; ``keep_optimizer_state=true`` skips it).

Every phase records its completion in ``state.json`` (written atomically), with its wall time,
the node count and the tokens it processed (``iteration/report.py``'s phase split); a rerun of the same
command skips completed phases and resumes inside an incomplete one (generation keeps finished
shards, training resumes from its last checkpoint). Training and export run as subprocesses
through the configured launcher (torchrun locally, srun on Slurm); generation (also the
evaluation's) runs as its own processes, one engine per node over that node's share of the
shards (``megatron_sami.cli.generate``; one local process without srun), which exit when done
so that no phase inherits their GPU memory; filtering and the MI estimates run in this process.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from megatron_sami.alignment.data import PromptTemplate, load_template
from megatron_sami.alignment.resume import flat_settings
from megatron_sami.alignment.scoring import score_args
from megatron_sami.errors import EXIT_PREEMPTED, ConfigError, DataError, PhaseError, Preempted
from megatron_sami.evaluation import mi
from megatron_sami.evaluation import pairwise as winrate
from megatron_sami.evaluation.splits import split_label
from megatron_sami.io import atomic_write_json, atomic_write_jsonl, atomic_write_text, check_output_apart
from megatron_sami.iteration.pruning import prune_training_checkpoints
from megatron_sami.iteration.report import phase_tokens
from megatron_sami.resources import config_dir
from megatron_sami.rollout.constitutions import (
    ConstitutionSet,
    SamplingConfig,
    load_constitution_set,
    validate_sampling,
)
from megatron_sami.rollout.filters import FilterConfig, filter_records
from megatron_sami.rollout.generation import (
    GenerationConfig,
    GenerationJob,
    GenerationTask,
    check_backend_available,
    read_shards,
    shard_writers,
    write_job,
)
from megatron_sami.rollout.queries import Query, QuerySourceConfig, load_queries, split_queries
from megatron_sami.runlock import RunLock
from megatron_sami.runtime.distributed import logger
from megatron_sami.typed_config import flatten, to_typed

TRAIN_FROM = ("base", "previous")
# sami-train settings the driver sets itself for every iteration; a train: section cannot set them.
DRIVER_TRAIN_KEYS = ("checkpoint", "run_dir", "template", "data.records")


@dataclass
class BaseModelConfig:
    """The model every iteration starts from: an HF directory, a converted checkpoint, or both
    (the missing one is made in the ``prepare`` phase)."""

    hf: str | None = None  # HF directory of the base model
    checkpoint: str | None = None  # converted Megatron checkpoint (made from ``hf`` when null)


LAUNCH_KEYS = ("launcher.",)  # settings a resumed run may change (Run._claim)


@dataclass
class LauncherConfig:
    """How launched phases start their processes: ``torchrun --standalone`` with ``nproc_per_node``
    ranks on this node, or ``prefix`` inside an allocation.

    ``prefix`` is the launcher's argv as a list (``[srun,--kill-on-bad-exit=1]``; slurm/launcher.sh
    writes it): each element reaches the launcher as one argument, so paths with spaces, quotes,
    commas or non-ASCII characters stay intact. A string (``'srun --kill-on-bad-exit=1'``, the old
    form) is still read, split as a shell would, so it must not hold such paths. ``python``: the
    interpreter the launched ranks run (a container's ``python3``); null: this driver's.
    ``log_dir`` (srun only): each phase's ranks log to ``<log_dir>/<phase>-<job>.<attempt>-rank<N>.log``
    (attempt: ``SLURM_RESTART_COUNT``), opened for appending, so neither a later phase nor a
    requeue truncates an earlier attempt's logs.

    Raises:
        ConfigError: ``prefix`` is neither a string nor a list of strings, or ``log_dir`` without it.
    """

    nproc_per_node: int = 1
    prefix: Any = None  # list of argv strings (or the old string); null: torchrun --standalone
    python: str | None = None  # null: sys.executable
    log_dir: str | None = None  # srun --output per phase, attempt and rank

    def __post_init__(self) -> None:
        if self.prefix is not None and not isinstance(self.prefix, str) and (
                not isinstance(self.prefix, list | tuple)
                or not all(isinstance(part, str | int | float) for part in self.prefix)):
            raise ConfigError(f"launcher.prefix must be a list of arguments such as [srun,--kill-on-bad-exit=1], "
                              f"got {self.prefix!r}.")
        if self.log_dir and not self.prefix:
            raise ConfigError("launcher.log_dir names srun's per-rank logs and needs launcher.prefix (srun ...); "
                              "set both or neither.")

    def command(self, module: str, args: list[str], phase: str = "train") -> list[str]:
        """The argv that runs ``python -m module args`` under this launcher; ``phase`` names its logs."""
        python = self.python or sys.executable
        if not self.prefix:
            return [python, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                    str(self.nproc_per_node), "-m", module, *args]
        prefix = self._argv()
        if self.log_dir:
            # srun expands %j (job) and %t (task); a literal % in the path is written %%.
            name = f"{self.log_dir.replace('%', '%%')}/{phase.replace('/', '-')}-%j." \
                   f"{os.environ.get('SLURM_RESTART_COUNT', '0')}-rank%t.log"
            prefix += [f"--output={name}", "--open-mode=append"]
        return [*prefix, python, "-m", module, *args]

    def _argv(self) -> list[str]:
        """``prefix`` as argv (the old string form split as a shell would)."""
        return shlex.split(self.prefix) if isinstance(self.prefix, str) else [str(part) for part in self.prefix or []]

    def _srun_prefix(self) -> list[str] | None:
        prefix = self._argv()
        return prefix if prefix and Path(prefix[0]).name == "srun" else None

    @staticmethod
    def _option(prefix: list[str], name: str, default: str = "") -> str:
        """The value of ``--name=value`` in ``prefix`` (srun takes the last one given), else ``default``."""
        values = [part.split("=", 1)[1] for part in prefix if part.startswith(f"--{name}=")]
        return values[-1] if values else default

    def num_nodes(self) -> int:
        """The nodes a per-node phase runs on: srun's ``--nodes`` (else the allocation's); 1
        without an srun prefix (one local process)."""
        prefix = self._srun_prefix()
        if prefix is None:
            return 1
        return int(self._option(prefix, "nodes") or os.environ.get("SLURM_JOB_NUM_NODES") or 1)

    def num_processes(self) -> int | None:
        """The ranks of a launched phase: torchrun's ``nproc_per_node``, or srun's ``--nodes`` x
        ``--ntasks-per-node``; None for another launcher prefix, or one that does not say."""
        if not self.prefix:
            return self.nproc_per_node
        per_node = self._option(self._srun_prefix() or [], "ntasks-per-node")
        return int(per_node) * self.num_nodes() if per_node.isdigit() else None

    def node_command(self, module: str, args: list[str], phase: str) -> list[str]:
        """The argv that runs ``python -m module args`` once per node (generation: one engine per
        node over all its GPUs): srun with one task per node, each task given the CPUs of the
        node's tasks; without an srun prefix one local process."""
        prefix = self._srun_prefix()
        if prefix is None:
            return [self.python or sys.executable, "-m", module, *args]
        per_node = self._option(prefix, "ntasks-per-node")
        tasks = int(per_node) if per_node.isdigit() else 1
        cpus = self._option(prefix, "cpus-per-task")
        # Later options win in srun; --ntasks too, since the batch environment's SLURM_NTASKS counts GPU tasks.
        options = ["--ntasks-per-node=1", f"--ntasks={self.num_nodes()}"]
        if cpus.isdigit():
            options.append(f"--cpus-per-task={int(cpus) * tasks}")
        # A site that binds one GPU per task (--gpus-per-task, also inherited from sbatch through
        # SLURM_GPUS_PER_TASK) would give the node's one engine one GPU: give it the node's tasks' GPUs.
        gpus_per_task = self._option(prefix, "gpus-per-task", os.environ.get("SLURM_GPUS_PER_TASK", ""))
        if gpus_per_task.isdigit():
            options.append(f"--gpus-per-task={int(gpus_per_task) * tasks}")
        command = LauncherConfig(prefix=[*prefix, *options], python=self.python, log_dir=self.log_dir)
        return command.command(module, args, phase)


@dataclass
class EvalConfig:
    """The MI evaluation after each iteration: ``num_queries`` held-out queries, every sign
    pattern of ``principles_per_query`` principles (C = 2**P constitutions; P = 2 gives the C = 4 of
    Fränken et al. 2024, arXiv:2404.14313), greedy responses."""

    enabled: bool = True
    num_queries: int = 16
    principles_per_query: int = 2  # two principles -> C = 4 sign patterns, as in Fränken et al. 2024
    max_new_tokens: int = 0  # 0: generation.max_new_tokens
    # megatron: the C x C matrices are scored by sami-score from the Megatron checkpoint at the training
    # layout, through the launcher (every GPU of the allocation, the model sharded as in training);
    # hf: by transformers in the driver's process, the whole model on one device (small models only).
    scorer: str = "megatron"

    def __post_init__(self) -> None:
        if self.scorer not in ("megatron", "hf"):
            raise ConfigError(f"evaluation.scorer '{self.scorer}' is unknown; use megatron or hf.")


@dataclass
class IterateConfig:
    """Everything ``sami-iterate`` runs (``configs/iterate.yaml``, the recipes in ``configs/recipe/``).

    Raises:
        ConfigError: no base model, fewer than one iteration or query, or an unknown ``train_from``.
    """

    run_dir: str = "???"
    base: BaseModelConfig = field(default_factory=BaseModelConfig)
    iterations: int = 3
    queries_per_iteration: int = 128
    seed: int = 1234
    train_from: str = "base"
    constitution_set: str = "dialogue"
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    queries: QuerySourceConfig = field(default_factory=QuerySourceConfig)
    template: PromptTemplate = field(default_factory=PromptTemplate)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    filters: FilterConfig = field(default_factory=FilterConfig)
    evaluation: EvalConfig = field(default_factory=EvalConfig)
    winrate: winrate.WinRateConfig = field(default_factory=winrate.WinRateConfig)
    launcher: LauncherConfig = field(default_factory=LauncherConfig)
    export_dtype: str | None = None
    # false: once an iteration's training is recorded complete, its other checkpoints and the final
    # one's optimizer state are removed (nothing reads them again: iteration/pruning.py; 0.56 TB per
    # checkpoint at 70B with RMSprop, 0.85 with AdamW); true keeps every checkpoint whole.
    keep_optimizer_state: bool = False
    # The sami-train settings this run sets (the rest are sami-train's own defaults, so a changed
    # default reaches every iteration); checked as a TrainConfig when the run opens.
    train: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.iterations < 1 or self.queries_per_iteration < 1:
            raise ConfigError("iterations and queries_per_iteration must be >= 1.")
        if self.train_from not in TRAIN_FROM:
            raise ConfigError(f"train_from '{self.train_from}' is unknown; use base or previous.")
        if not isinstance(self.keep_optimizer_state, bool):
            raise ConfigError(f"keep_optimizer_state must be true or false, got {self.keep_optimizer_state!r}.")
        if not self.base.hf and not self.base.checkpoint:
            raise ConfigError("set base.hf (an HF model directory) or base.checkpoint (a converted checkpoint).")


def train_section_schema() -> dict:
    """Every key an iterate config's ``train:`` section may set, each unset (``???``), nested as
    in :class:`~megatron_sami.alignment.trainer.TrainConfig` (less :data:`DRIVER_TRAIN_KEYS`).

    Hydra needs a key to exist before ``train.x=...`` can override it; the unset ones are dropped
    by :func:`set_values` before the config is used, so sami-train's own defaults apply to them.
    """
    from megatron_sami.alignment.trainer import TrainConfig

    def unset(values: dict, prefix: str) -> dict:
        return {key: unset(value, f"{prefix}{key}.") if isinstance(value, dict) else "???"
                for key, value in values.items() if f"{prefix}{key}" not in DRIVER_TRAIN_KEYS}

    return unset(OmegaConf.to_container(OmegaConf.structured(TrainConfig)), "")


def set_values(values: dict) -> dict:
    """``values`` (a plain nested mapping) without its unset (``???``) leaves and emptied sections."""
    kept: dict = {}
    for key, value in values.items():
        if isinstance(value, dict):
            value = set_values(value)
            if value:
                kept[key] = value
        elif value != "???":
            kept[key] = value
    return kept


def train_settings(cfg: IterateConfig):
    """The :class:`~megatron_sami.alignment.trainer.TrainConfig` that every iteration's sami-train
    builds: configs/train.yaml, the run's template and its ``train:`` section on TrainConfig's
    defaults (the driver's own keys filled with placeholders). A run builds it when it opens, so
    that a bad key fails before any phase runs.

    Raises:
        ConfigError: if the ``train:`` section sets one of :data:`DRIVER_TRAIN_KEYS`, names an
            unknown key or holds an invalid value (the message names ``train.<key>``).
    """
    from megatron_sami.alignment.trainer import TrainConfig

    flat = flatten(cfg.train)
    for key in DRIVER_TRAIN_KEYS:
        if any(name == key or name.startswith(key + ".") for name in flat):
            raise ConfigError(f"train.{key} is set by sami-iterate for every iteration; remove it from the "
                              f"train: section.")
    values = OmegaConf.to_container(OmegaConf.load(config_dir() / "train.yaml"))
    values = {k: v for k, v in values.items() if k not in ("defaults", "hydra")}
    driver = {"checkpoint": "-", "run_dir": "-", "data": {"records": "-"}, "template": OmegaConf.structured(cfg.template)}
    return to_typed(TrainConfig, OmegaConf.merge(values, driver, cfg.train), "train")


def hydra_quote(text: str) -> str:
    """``text`` as a single-quoted Hydra value that reaches the program unchanged: spaces, commas
    (not a sweep), quotes, non-ASCII characters and ``${`` (not an interpolation) included.

    Hydra 1.3 unescapes only backslashes that precede a quote or the closing quote, so those are
    doubled, each ``'`` becomes ``\\'``, and ``${`` becomes OmegaConf's escaped ``\\${``.
    """
    out, backslashes = [], ""
    for char in text.replace("${", "\\${"):
        if char == "\\":
            backslashes += char
            continue
        out.append(backslashes * 2 + "\\'" if char == "'" else backslashes + char)
        backslashes = ""
    return "'" + "".join(out) + backslashes * 2 + "'"


def override(key: str, value: object) -> str:
    """One Hydra command-line override ``key=value`` (None as null, booleans lower-case, strings
    quoted by :func:`hydra_quote` so that every character reaches the program as it is)."""
    if value is None:
        return f"{key}=null"
    if isinstance(value, bool):
        return f"{key}={str(value).lower()}"
    if isinstance(value, str):
        return f"{key}={hydra_quote(value)}"
    return f"{key}={value}"


class Run:
    """One run directory: its state, paths and phases."""

    def __init__(self, cfg: IterateConfig, resolved_yaml: str | None) -> None:
        """``resolved_yaml`` None: open an existing run to read or evaluate it, without claiming it."""
        self.cfg = cfg
        self.dir = Path(cfg.run_dir)
        self.cset: ConstitutionSet = load_constitution_set(cfg.constitution_set)
        validate_sampling(self.cset, cfg.sampling)
        self._check_eval_sampling()
        self.train_settings = train_settings(cfg)
        self._check_template()
        self._check_paths()
        if cfg.launcher.python is None:  # else generation runs in another interpreter (a container's), which checks
            check_backend_available(cfg.generation)
        # Only a run this process claimed launches generation per node (a report opens a run
        # outside its allocation and generates what it lacks in one local process).
        self.claimed = resolved_yaml is not None
        if resolved_yaml is not None:
            self._claim(resolved_yaml)
        self.state = read_state(self.dir / "state.json")
        self.started = time.perf_counter()
        self.stop_signal: int | None = None
        self.child: subprocess.Popen | None = None
        self.launched_s: dict[str, float] = {}  # the running phase's launched commands: module -> seconds
        self.launched_layouts: dict[str, dict] = {}  # the same commands: module -> layout and processes

    # -- set-up -------------------------------------------------------------------------------------
    def _check_eval_sampling(self) -> None:
        if self.cfg.evaluation.enabled:
            for split in self.eval_splits():
                validate_sampling(self.cset, self.eval_sampling(split))

    def _check_template(self) -> None:
        """sami-train receives the template by name (``template=<name>``): a field changed on the
        command line would reach generation and evaluation but not training."""
        if load_template(self.cfg.template.name) != self.cfg.template:
            raise ConfigError(f"template '{self.cfg.template.name}' differs from configs/template/"
                              f"{self.cfg.template.name}.yaml, and sami-train reads templates by name; save the "
                              "changed template as a file in configs/template/ and select it with template=<name>.")

    def _check_paths(self) -> None:
        if self.cfg.base.hf and not (Path(self.cfg.base.hf) / "config.json").is_file():
            raise ConfigError(f"base.hf={self.cfg.base.hf} is not an HF model directory (no config.json); check the "
                              f"path.")
        if self.cfg.base.checkpoint and not (Path(self.cfg.base.checkpoint) / "model.yaml").is_file():
            raise ConfigError(f"base.checkpoint={self.cfg.base.checkpoint} is not a converted checkpoint (no "
                              f"model.yaml); convert it with sami-convert hf-to-megatron or set base.hf instead.")
        # What this run writes, replaces (--overwrite exports) or deletes must not be or hold an input.
        inputs = {f"base.{key}": value for key, value in vars(self.cfg.base).items() if value}
        check_output_apart(self.dir, inputs)
        outputs = [self.model_hf(t) for t in range(1, self.cfg.iterations + 1)]
        outputs += [] if self.cfg.base.hf else [self.base_hf()]
        outputs += [] if self.cfg.base.checkpoint else [self.base_checkpoint()]
        for output in outputs:
            check_output_apart(output, inputs, siblings=(".incomplete", ".replaced"))

    def _claim(self, resolved_yaml: str) -> None:
        # One driver per run directory, held until this process exits (the kernel releases it).
        self.lock = RunLock(self.dir, "sami-iterate").acquire()
        saved, state = self.dir / "config.yaml", self.dir / "state.json"
        started = read_state(state)["phases"]
        changed: list[str] = []
        if started and saved.exists() and saved.read_text() != resolved_yaml:
            # As the typed config reads them: a setting added since the run started is its default.
            typed = lambda values: to_typed(IterateConfig, values, "")  # noqa: E731
            old, new = flat_settings(saved.read_text(), typed), flat_settings(resolved_yaml, typed)
            # How phases are launched (srun's --nodes, CPUs, memory, container) may change with the
            # allocation: sami-train resumes at another data-parallel size and generation writes the
            # same records at any node count.
            changed = sorted(k for k in set(old) | set(new)
                             if old.get(k) != new.get(k) and not k.startswith(LAUNCH_KEYS))
        if changed:
            raise ConfigError(f"{self.dir} holds a run with a different configuration (changed: "
                              f"{', '.join(changed[:6])}); rerun with the same overrides to resume, or use a new "
                              f"run_dir.")
        atomic_write_text(saved, resolved_yaml)

    def eval_splits(self) -> list[str]:
        """The principle splits evaluated: ``train`` (learned), and ``heldout`` when the set has any."""
        splits = ["train"]
        if any(p.split == "heldout" for p in self.cset.principles):
            splits.append("heldout")
        return splits

    def eval_sampling(self, split: str) -> SamplingConfig:
        """The constitution sampling of the MI evaluation for ``split`` (all 2**P sign patterns)."""
        return mi.evaluation_sampling(self.cset, split, self.cfg.evaluation.principles_per_query)

    # -- bookkeeping --------------------------------------------------------------------------------
    def done(self, phase: str) -> bool:
        """Whether ``phase`` is recorded as complete in ``state.json``."""
        return phase in self.state["phases"]

    def record(self, phase: str, result: dict) -> None:
        """Mark ``phase`` complete with its result (``state.json``, fsynced), then rewrite the summary."""
        self.state["phases"][phase] = result | {"completed_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
        atomic_write_json(self.dir / "state.json", self.state)
        self.write_summary()

    def result(self, phase: str) -> dict:
        """The recorded result of a completed ``phase``."""
        return self.state["phases"][phase]

    # -- paths --------------------------------------------------------------------------------------
    def base_checkpoint(self) -> Path:
        """The converted base checkpoint (given, or made under ``run_dir/base/megatron``)."""
        return Path(self.cfg.base.checkpoint) if self.cfg.base.checkpoint else self.dir / "base" / "megatron"

    def base_hf(self) -> Path:
        """The base model's HF directory (given, or exported under ``run_dir/base/hf``)."""
        return Path(self.cfg.base.hf) if self.cfg.base.hf else self.dir / "base" / "hf"

    def model_hf(self, iteration: int) -> Path:
        """The HF directory of iteration ``iteration``'s model (0: the base model)."""
        return self.base_hf() if iteration == 0 else self.dir / f"iter{iteration}" / "hf"

    def train_dir(self, iteration: int) -> Path:
        """The ``sami-train`` run directory of iteration ``iteration``."""
        return self.dir / f"iter{iteration}" / "train"

    def final_checkpoint(self, iteration: int) -> Path:
        """The newest complete training checkpoint of iteration ``iteration`` (its ``latest`` pointer)."""
        train_dir = self.train_dir(iteration)
        return train_dir / "checkpoints" / (train_dir / "checkpoints" / "latest").read_text().strip()

    # -- running ------------------------------------------------------------------------------------
    def phases(self) -> list[tuple[str, Callable[[], dict]]]:
        """Every phase of the run in order, as (name recorded in ``state.json``, action)."""
        phases = [("queries", self.split), ("prepare", self.prepare)]
        if self.cfg.evaluation.enabled:
            phases.append(("iter0/evaluate", lambda: self.evaluate(0)))
        for t in range(1, self.cfg.iterations + 1):
            phases += [(f"iter{t}/generate", lambda t=t: self.generate(t)),
                       (f"iter{t}/filter", lambda t=t: self.filter(t)),
                       (f"iter{t}/train", lambda t=t: self.train(t))]
            if not self.cfg.keep_optimizer_state:
                phases.append((f"iter{t}/cleanup", lambda t=t: self.cleanup(t)))
            phases.append((f"iter{t}/export", lambda t=t: self.export(t)))
            if self.cfg.evaluation.enabled:
                phases.append((f"iter{t}/evaluate", lambda t=t: self.evaluate(t)))
            if self.cfg.winrate.enabled:
                phases.append((f"iter{t}/winrate", lambda t=t: {"winrate": self.winrate(t)}))
        return phases

    def _on_signal(self, number, frame) -> None:
        """SIGUSR1 (time-limit warning), SIGTERM (preemption) or SIGINT (Ctrl-C): pass it on to the
        running phase's processes, which checkpoint and exit; in-process phases stop at their next
        safe point. A second SIGINT stops at once."""
        if number == signal.SIGINT:
            signal.signal(signal.SIGINT, signal.default_int_handler)
        self.stop_signal = number
        logger.warning("[iterate] received %s: stopping at the next safe point", signal.Signals(number).name)
        if number == signal.SIGUSR1 and not self.cfg.launcher.prefix:
            # torchrun passes on only SIGTERM, SIGINT, SIGHUP and SIGQUIT (torch 2.13); SIGUSR1 would
            # end it and, with it, its workers, before they checkpoint. SIGTERM means the same to them.
            number = signal.SIGTERM
        if self.child is not None and self.child.poll() is None:
            self.child.send_signal(number)

    def check_stop(self) -> None:
        """Raises Preempted when a stop signal arrived (called between phases and shards)."""
        if self.stop_signal is not None:
            raise Preempted(f"stopped by {signal.Signals(self.stop_signal).name}; completed phases are kept")

    def run(self) -> dict:
        """Run every incomplete phase in order and return the summary.

        Raises:
            Preempted: a signal stopped the run (completed phases are kept; rerun to resume).
            PhaseError: a launched phase failed.
            SamiError: a phase's input or configuration is wrong (the message names the fix).
        """
        for number in (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT):
            signal.signal(number, self._on_signal)
        phases = self.phases()
        if self.cfg.winrate.enabled and not all(self.done(name) for name, _ in phases):
            winrate.check_judge(self.cfg.winrate.judge)  # an unreachable judge is found before hours of work
        for number, (name, action) in enumerate(phases, start=1):
            self.check_stop()
            if self.done(name):
                logger.info("[iterate] phase %d/%d %s: already complete", number, len(phases), name)
                continue
            logger.info("[iterate] phase %d/%d %s (elapsed %.0f s)", number, len(phases), name,
                        time.perf_counter() - self.started)
            phase_start, self.launched_s, self.launched_layouts = time.perf_counter(), {}, {}
            result = action()
            self.record(name, result | {"seconds": round(time.perf_counter() - phase_start, 1)} | self.measures(name))
        self.write_samples()
        return self.summary()

    def launch(self, phase: str, module: str, args: list[str], distributed: bool = True,
               per_node: bool = False) -> None:
        """Run a phase's command: through the launcher (training), once per node (``per_node``:
        :meth:`LauncherConfig.node_command`), or as one local process.

        Raises:
            Preempted: the command exited with code 75, or failed after this driver got a stop signal.
            PhaseError: the command failed (its output is above).
        """
        command = self.cfg.launcher.node_command(module, args, phase) if per_node else \
            self.cfg.launcher.command(module, args, phase) if distributed else [sys.executable, "-m", module, *args]
        logger.info("[iterate] %s: %s", phase, shlex.join(command))
        # The phase runs in a session of its own, so that a terminal's Ctrl-C reaches it once, through
        # _on_signal, and dies with this driver (die_with_parent), so that kill -9 of the driver's
        # group leaves nothing running. torchrun gives its workers 10 minutes (not 30 s) to checkpoint
        # after a signal before it kills them.
        env = {"TORCH_ELASTIC_SHUTDOWN_TIMEOUT": "600"} | os.environ | {"PYTHONUNBUFFERED": "1"}
        self.child = subprocess.Popen(command, env=env, start_new_session=True, preexec_fn=die_with_parent)
        launched = time.perf_counter()
        returncode = self.child.wait()
        part = module.rsplit(".", 1)[-1]  # megatron_sami.cli.score -> score
        self.launched_s[part] = self.launched_s.get(part, 0.0) + time.perf_counter() - launched
        self.launched_layouts[part] = self.placement(distributed, per_node)
        self.child = None
        if returncode == EXIT_PREEMPTED or (returncode != 0 and self.stop_signal is not None):
            by = signal.Signals(self.stop_signal).name if self.stop_signal is not None else "a signal"
            raise Preempted(f"phase {phase} stopped by {by} and saved what it had")
        if returncode != 0:
            raise PhaseError(f"phase {phase} failed with exit code {returncode} (its output is above); fix "
                             f"the cause and rerun the same command to resume at this phase.")

    # -- phases -------------------------------------------------------------------------------------
    def prepare(self) -> dict:
        """Make the missing form of the base model: convert HF -> Megatron, or export Megatron -> HF."""
        if not self.cfg.base.checkpoint:
            self.launch("prepare", "megatron_sami.cli.convert",
                        ["hf-to-megatron", str(self.base_hf()), str(self.base_checkpoint()), "--overwrite"],
                        distributed=False)
        elif not self.cfg.base.hf:
            self.launch("prepare", "megatron_sami.cli.convert",
                        ["megatron-to-hf", str(self.base_checkpoint()), str(self.base_hf()), "--overwrite"],
                        distributed=False)
        return {"base_hf": str(self.base_hf()), "base_checkpoint": str(self.base_checkpoint())}

    def split(self) -> dict:
        """Load the query source and write disjoint, seeded query sets: evaluation and one per iteration."""
        queries = load_queries(self.cfg.queries)
        num_eval = self.cfg.evaluation.num_queries if self.cfg.evaluation.enabled else 0
        split = split_queries(queries, self.cfg.iterations, self.cfg.queries_per_iteration, num_eval, self.cfg.seed)
        out = self.dir / "queries"
        out.mkdir(exist_ok=True)
        atomic_write_jsonl(out / "eval.jsonl", [vars(q) for q in split.evaluation])
        for t, chunk in enumerate(split.per_iteration, start=1):
            atomic_write_jsonl(out / f"iter{t}.jsonl", [vars(q) for q in chunk])
        return {"source": self.cfg.queries.source, "available": len(queries), "eval": len(split.evaluation),
                "per_iteration": self.cfg.queries_per_iteration}

    def queries(self, name: str) -> list[Query]:
        """The query set ``name`` (``eval`` or ``iterT``) written by :meth:`split`."""
        with (self.dir / "queries" / f"{name}.jsonl").open() as handle:
            return [Query(**json.loads(line)) for line in handle if line.strip()]

    def backend_factory(self, model_dir: Path, generation: GenerationConfig):
        """A function that would build the generation backend of ``model_dir``: called only when
        a shard is missing after :meth:`run_generation`, which is a bug."""
        def refuse():
            raise PhaseError(f"generation with {model_dir} left shards missing that the driver found complete; "
                             f"rerun the same command to resume.")
        return refuse

    def run_generation(self, phase: str, job_path: Path, model_dir: Path, queries: str,
                       generation: GenerationConfig, tasks: list[GenerationTask]) -> dict:
        """Write the generation job of ``tasks`` (the query set ``queries``) to ``job_path`` and run
        it as its own processes (``megatron_sami.cli.generate``): one per node of the allocation,
        each with one engine over its share of the shards, or one local process without srun.
        They exit when done, so their GPU memory is free for the next phase. Shards already
        written are kept; with every shard written nothing is launched.

        Returns:
            ``{"shards": count, "written_by": {node: shards}}``.

        Raises:
            Preempted: a signal stopped it (the written shards are kept).
            PhaseError: it failed, or ended with shards missing.
        """
        job = GenerationJob(str(model_dir), str(self.dir / "queries" / f"{queries}.jsonl"), self.cfg.constitution_set,
                            self.cfg.template, generation, tasks)
        if job.missing_shards():
            self.check_stop()
            write_job(job_path, job)
            nodes = self.cfg.launcher.num_nodes() if self.claimed else 1
            self.launch(phase, "megatron_sami.cli.generate", [str(job_path), "--num-nodes", str(nodes)],
                        distributed=False, per_node=self.claimed)
        missing = job.missing_shards()
        if missing:
            raise PhaseError(f"phase {phase}: generation ended without {len(missing)} shard(s) (first: {missing[0]}); "
                             f"rerun the same command to generate them.")
        return {"shards": len(job.shards()), "written_by": shard_writers(job.shards())}

    def generate(self, t: int) -> dict:
        """Iteration t's records: the previous model answers each query under each of its C
        constitutions, written in atomic shards by one engine per node (:meth:`run_generation`;
        a rerun keeps finished shards)."""
        model_dir = self.model_hf(t - 1)
        task = GenerationTask(str(self.dir / f"iter{t}" / "generated"), self.cfg.sampling, "sample", self.cfg.seed + t)
        done = self.run_generation(f"iter{t}/generate", self.dir / f"iter{t}" / "generate-job.json", model_dir,
                                   f"iter{t}", self.cfg.generation, [task])
        return {"model": str(model_dir)} | done

    def filter(self, t: int) -> dict:
        """Filter iteration t's records into ``records.jsonl``.

        Raises:
            DataError: fewer records than one training step (``train.queries_per_step``) survive.
        """
        rows = read_shards(sorted((self.dir / f"iter{t}" / "generated").glob("shard-*.jsonl")))
        kept, counts = filter_records(rows, self.cfg.filters)
        logger.info("[iterate] iter%d filters: %s", t, ", ".join(f"{k} {v}" for k, v in counts.items()))
        needed = self.train_settings.queries_per_step
        if len(kept) < needed:
            raise DataError(f"iteration {t}: only {len(kept)} of {len(rows)} records passed the filters ({counts}); "
                            f"training needs at least queries_per_step={needed}: raise queries_per_iteration or "
                            f"max_new_tokens, or relax the filters.")
        atomic_write_jsonl(self.dir / f"iter{t}" / "records.jsonl", kept)
        return {"counts": counts}

    def train_source(self, t: int) -> Path:
        """The checkpoint iteration t trains from: the base model, or with ``train_from=previous``
        the last iteration's."""
        return self.base_checkpoint() if self.cfg.train_from == "base" or t == 1 else self.final_checkpoint(t - 1)

    def train_args(self, t: int) -> list[str]:
        """sami-train's overrides for iteration t: the driver's own keys, then only what the user or
        the recipe set in the train: section (everything else is sami-train's default)."""
        return [override("checkpoint", str(self.train_source(t))),
                override("data.records", str(self.dir / f"iter{t}" / "records.jsonl")),
                override("run_dir", str(self.train_dir(t))), f"template={self.cfg.template.name}",
                *[override(k, v) for k, v in flatten(self.cfg.train).items()]]

    def train(self, t: int) -> dict:
        """Run ``sami-train`` for iteration t through the launcher; returns its checkpoint and last step."""
        source = self.train_source(t)
        self.launch(f"iter{t}/train", "megatron_sami.cli.train", self.train_args(t))
        metrics = (self.train_dir(t) / "metrics.jsonl").read_text().splitlines()
        return {"checkpoint": str(self.final_checkpoint(t)), "trained_from": str(source),
                "last_step": json.loads(metrics[-1])}

    def cleanup(self, t: int) -> dict:
        """Remove what iteration t's finished training leaves that nothing reads again: its
        checkpoints but the final one, and the final one's optimizer state
        (:func:`~megatron_sami.iteration.pruning.prune_training_checkpoints`; crash-safe, a rerun
        finishes it). Returns what was kept and removed, and the bytes freed."""
        result = prune_training_checkpoints(self.train_dir(t) / "checkpoints")
        logger.info("[iterate] iter%d: kept %s (weights only); removed %s (%.1f GB)", t, result["kept"],
                    ", ".join(result["removed"]) or "nothing", result["freed_bytes"] / 1e9)
        return result

    def placement(self, distributed: bool, per_node: bool) -> dict:
        """Where a launched command ran (``state.json``'s ``launched_layouts`` and summary.json's
        ``layouts``): ``processes`` (None where the launcher prefix does not say) and ``layout``:
        the training layout for a launched Megatron command (``sami-train``, ``sami-score``), the
        generation engine for one per node, None for one local process (conversion, export)."""
        if per_node:
            generation = self.cfg.generation
            return {"processes": self.cfg.launcher.num_nodes(), "layout": {
                "engine": generation.backend, "tensor": generation.tensor_parallel if generation.backend == "vllm" else 1}}
        if not distributed:
            return {"processes": 1, "layout": None}
        parallel = self.train_settings.parallel
        return {"processes": self.cfg.launcher.num_processes(), "layout": {
            "tensor": parallel.tensor, "pipeline": parallel.pipeline, "expert": parallel.expert,
            "context": parallel.context}}

    def measures(self, phase: str) -> dict:
        """What a just-finished phase measured besides its wall time (``state.json``): the nodes of
        the allocation, the tokens it processed (:func:`~megatron_sami.iteration.report.phase_tokens`)
        and the seconds of each launched command (``launched_seconds``: ``{"score": s}``)."""
        measured: dict = {"nodes": int(os.environ.get("SLURM_JOB_NUM_NODES") or 1)}
        tokens = phase_tokens(self.dir, phase)
        if tokens:
            measured["tokens"] = tokens
        if self.launched_s:
            measured["launched_seconds"] = {key: round(value, 1) for key, value in self.launched_s.items()}
            measured["launched_layouts"] = dict(self.launched_layouts)
        return measured

    def export(self, t: int) -> dict:
        """Export iteration t's final checkpoint to HF (``iterT/hf``) with ``sami-convert megatron-to-hf``."""
        args = ["megatron-to-hf", str(self.final_checkpoint(t)), str(self.model_hf(t)), "--overwrite"]
        if self.cfg.export_dtype:
            args += ["--dtype", self.cfg.export_dtype]
        # Conversion reads and writes files: one local process, on the node running the driver.
        self.launch(f"iter{t}/export", "megatron_sami.cli.convert", args, distributed=False)
        return {"hf": str(self.model_hf(t))}

    def evaluate(self, t: int) -> dict:
        """The MI estimates of iteration t's model (0: the base model) on the evaluation queries,
        per principle split; the greedy responses are generated first as their own processes
        (:meth:`run_generation`), so that the scoring starts with every GPU free."""
        model_dir, generation = self.model_hf(t), self.eval_generation()

        def shard_dir(split: str) -> Path:
            return self.dir / "eval" / f"iter{t}-{split_label(split)}"

        tasks = mi.generation_tasks(self.cset, self.cfg.evaluation.principles_per_query, shard_dir, self.cfg.seed)
        generated = self.run_generation(f"iter{t}/evaluate", self.dir / "eval" / f"iter{t}-generate-job.json",
                                        model_dir, "eval", generation, tasks)
        results = mi.evaluate_model(model_dir, self.queries("eval"), self.cset, self.cfg.template, generation,
                                    self.cfg.evaluation.principles_per_query, shard_dir, self.cfg.seed,
                                    f"iteration {t}",
                                    backend_factory=self.backend_factory(model_dir, generation),
                                    before_shard=self.check_stop, scorer=self.scorer(t))
        for label, result in results.items():
            bound, paper = result["info_nce_bound"], result["paper_mi"]
            logger.info("[iterate] iter%d MI (%s principles, %d queries): InfoNCE bound %.3f +- %.3f nats, paper "
                        "estimator %.2f +- %.2f nats", t, label, bound["n"], bound["mean"], bound["se"],
                        paper["mean"], paper["se"])
        return {"mi": results, "written_by": generated["written_by"]}

    def scorer(self, t: int) -> mi.Scorer | None:
        """How iteration t's evaluation records get their C x C matrices: ``sami-score`` on its
        Megatron checkpoint (the base one for t = 0) at the training layout, through the launcher;
        None (transformers in this process) with ``evaluation.scorer=hf``."""
        if self.cfg.evaluation.scorer == "hf":
            return None
        def launch(records: Path, matrices: Path) -> None:
            checkpoint = self.base_checkpoint() if t == 0 else self.final_checkpoint(t)
            self.launch(f"iter{t}/evaluate", "megatron_sami.cli.score",
                        score_args(self.train_settings, checkpoint, records, matrices))

        return mi.launched_scorer(launch, lambda label: self.dir / "eval" / f"iter{t}-{label}-scores")

    # -- win rates ----------------------------------------------------------------------------------
    def eval_generation(self) -> GenerationConfig:
        """The generation settings of evaluation: greedy, ``evaluation.max_new_tokens`` if set."""
        return GenerationConfig(**{**vars(self.cfg.generation), "temperature": 0.0,
                                   "max_new_tokens": self.cfg.evaluation.max_new_tokens
                                   or self.cfg.generation.max_new_tokens})

    def positive_responses(self, label: str, model_dir: Path, iteration: int | None) -> list[dict]:
        """Greedy positive-constitution responses on the evaluation queries: those of the MI
        evaluation when it ran with the same principles per query, else generated once."""
        same_draw = self.cfg.evaluation.enabled and \
            self.cfg.evaluation.principles_per_query == self.cfg.winrate.principles_per_query
        if iteration is not None and same_draw:
            rows = []
            for split in self.eval_splits():
                shard_dir = self.dir / "eval" / f"iter{iteration}-{winrate.SPLIT_LABELS[split]}"
                rows += winrate.response_rows(read_shards(sorted(shard_dir.glob("shard-*.jsonl"))), split)
            if rows:
                return rows
        generation = self.eval_generation()
        if self.cfg.winrate.max_new_tokens:
            generation.max_new_tokens = self.cfg.winrate.max_new_tokens
        out_dir = self.dir / "winrate" / "responses" / label
        self.run_generation(f"iter{iteration}/winrate" if iteration is not None else f"winrate/{label}",
                            out_dir / "generate-job.json", model_dir, "eval", generation,
                            winrate.response_tasks(self.cset, self.cfg.winrate.principles_per_query, out_dir,
                                                   self.cfg.seed))
        return winrate.generate_responses(model_dir, self.queries("eval"), self.cset, self.cfg.template, generation,
                                          self.cfg.winrate.principles_per_query,
                                          self.dir / "winrate" / "responses" / label, self.cfg.seed,
                                          before_shard=self.check_stop)

    def winrate(self, t: int, judge: winrate.JudgeConfig | None = None) -> dict:
        """Iteration t's responses judged against each baseline's; {baseline: result}."""
        judge = judge or self.cfg.winrate.judge
        test_rows = self.positive_responses(f"iter{t}", self.model_hf(t), t)
        results = {}
        for label, path in winrate.parse_baselines(self.cfg.winrate.baselines):
            baseline_rows = self.positive_responses("base", self.model_hf(0), 0) if path is None else \
                self.positive_responses(label, Path(path), None)
            results[label] = winrate.evaluate_pair(test_rows, baseline_rows, self.cset, judge,
                                                   self.dir / "winrate" / f"iter{t}-vs-{label}", self.cfg.winrate.seed,
                                                   cache_dir=None if judge.cache_dir else
                                                   self.dir / "winrate" / "judge-cache")
            overall = results[label]["all"]
            logger.info("[iterate] iter%d vs %s: win rate %s over %d comparisons, length-balanced %s, "
                        "length-controlled %s", t, label, winrate.rate_text(overall["win_rate"]),
                        overall["win_rate"]["n"], winrate.rate_text(overall["length_balanced"]),
                        winrate.rate_text(overall["length_controlled"]))
        return results

    # -- reports ------------------------------------------------------------------------------------
    def summary(self) -> dict:
        """What the run has measured so far, per iteration (``summary.json``)."""
        phases = self.state["phases"]
        rows = []
        for t in range(0, self.cfg.iterations + 1):
            row: dict = {"iteration": t}
            if f"iter{t}/filter" in phases:
                row["filter"] = phases[f"iter{t}/filter"]["counts"]
            if f"iter{t}/train" in phases:
                row["train_last_step"] = phases[f"iter{t}/train"]["last_step"]
                row["checkpoint"] = phases[f"iter{t}/train"]["checkpoint"]
            if f"iter{t}/export" in phases:
                row["hf"] = phases[f"iter{t}/export"]["hf"]
            if f"iter{t}/evaluate" in phases:
                row["mi"] = phases[f"iter{t}/evaluate"]["mi"]
            if f"iter{t}/winrate" in phases:
                row["winrate"] = phases[f"iter{t}/winrate"]["winrate"]
            if len(row) > 1:
                rows.append(row)
        complete = all(self.done(name) for name, _ in self.phases())
        return {"run_dir": str(self.dir), "complete": complete, "constitutions": self.cset.name,
                "estimators": {"info_nce_bound": "log C - InfoNCE loss from mean log-probs, capped at log C",
                               "paper_mi": "(1/C) sum_j [S[j,j] - mean_k S[k,j]] from summed log-probs (uncapped)"},
                "iterations": rows, "layouts": {name: result["launched_layouts"] for name, result in phases.items()
                                                if "launched_layouts" in result}}

    def write_summary(self) -> None:
        """Write ``summary.json`` (atomically) and the MI and win-rate plots."""
        summary = self.summary()
        atomic_write_json(self.dir / "summary.json", summary)
        if any("mi" in row for row in summary["iterations"]):
            mi.plot_mi(summary["iterations"], self.dir / "mi.png")
        rows = winrate_rows(summary["iterations"])
        if rows:
            winrate.plot_winrates(rows, self.dir / "winrate.png")

    def write_samples(self, count: int = 3) -> None:
        """Side-by-side responses of the base model and the last iteration (positive and negative)."""
        last = self.cfg.iterations
        base_dir, last_dir = self.dir / "eval" / "iter0-learned", self.dir / "eval" / f"iter{last}-learned"
        if not (base_dir.is_dir() and last_dir.is_dir()):
            return
        base_rows = read_shards(sorted(base_dir.glob("shard-*.jsonl")))[:count]
        last_rows = {row["id"]: row for row in read_shards(sorted(last_dir.glob("shard-*.jsonl")))}
        lines = [f"# Sample responses: base model vs iteration {last}", ""]
        for row in base_rows:
            other = last_rows.get(row["id"])
            if other is None:
                continue
            lines += [f"## Query: {row['query']}", ""]
            for index, label in ((0, "positive"), (len(row["constitutions"]) - 1, "negative")):
                lines += [f"### {label} constitution", "", "```", row["constitutions"][index], "```", "",
                          f"- base: {row['responses'][index]}", f"- iteration {last}: {other['responses'][index]}", ""]
        atomic_write_text(self.dir / "samples.md", "\n".join(lines))


def winrate_rows(iterations: list[dict]) -> list[dict]:
    """Flatten summary rows into {label, iteration, baseline, result} for tables and plots."""
    return [{"label": f"iter{row['iteration']}", "iteration": row["iteration"], "baseline": baseline, "result": result}
            for row in iterations for baseline, result in row.get("winrate", {}).items()]


def read_state(path: Path) -> dict:
    """A run's ``state.json`` (``{"phases": {...}}``; empty for a new run).

    Raises:
        DataError: the file is not the JSON object this driver writes.
    """
    if not path.exists():
        return {"phases": {}}
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError):
        state = None
    if not isinstance(state, dict) or not isinstance(state.get("phases"), dict):
        raise DataError(f"{path} is not a run state written by sami-iterate (damaged or edited); restore it, or "
                        "delete it to redo every phase of this run directory.")
    return state


def die_with_parent() -> None:
    """In a child between fork and exec: have the kernel send it SIGKILL when this driver's thread
    that started it ends (Linux ``prctl(PR_SET_PDEATHSIG)``; survives exec). Elsewhere a no-op."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGKILL, 0, 0, 0)  # 1: PR_SET_PDEATHSIG


def run_iterations(cfg: IterateConfig, resolved_yaml: str) -> dict:
    """Open (or resume) the run directory of ``cfg`` and run every incomplete phase; returns the
    summary.

    Raises:
        ConfigError: the run directory holds a run with other settings, or the settings are invalid.
        Preempted: a signal stopped the run; rerun the same command to resume.
        PhaseError: a launched phase failed.
    """
    return Run(cfg, resolved_yaml).run()
