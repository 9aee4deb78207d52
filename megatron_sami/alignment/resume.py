"""What a resumed ``sami-train`` run may change, and the trainer state it continues from.

A training checkpoint holds, beside the weights and the optimizer state, the trainer's own
counters in ``trainer_state/``: ``state.json`` (global: step, data position, optimizer update
count, the layout and optimizer format it was saved at) and ``rng/rankNNNNN.pt`` (each rank's
RNG states, tensors only, read with ``weights_only=True``). Nothing here is per rank except the
RNG streams, so a run may resume at another data-parallel size, and at another TP/PP/EP when
the optimizer state was saved in a reshardable format (see
:mod:`megatron_sami.training.checkpointing`).

Settings on resume: the new resolved config is compared with the run's ``config.yaml`` before
anything is written. Keys in :data:`CHANGEABLE_ON_RESUME` and :data:`CHANGEABLE_SECTIONS` take effect from the next step (the
step count, checkpoint interval, learning-rate peak and schedule, gradient clipping, the layout,
recomputation); the replaced ``config.yaml`` is kept in ``config_history/``. Any other change
(data, model, loss, optimizer kind, seed, ...) would make the checkpoints beside the config
describe another run, and is refused in one sentence naming the key.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from omegaconf import OmegaConf

from megatron_sami.errors import CheckpointError, ConfigError, LayoutError
from megatron_sami.io import atomic_write_json, atomic_write_text
from megatron_sami.typed_config import flatten

STATE_FORMAT = 2  # trainer_state/state.json; 1 was a pickle per rank (no longer loaded)
CHANGEABLE_ON_RESUME = ("steps", "save_interval", "recompute_activations", "queries_per_microbatch",
                        "optimizer.lr", "optimizer.clip_grad", "optimizer.checkpoint_format",
                        "optimizer.overlap_grad_reduce", "optimizer.overlap_param_gather",
                        "precision.peak_tflops")
CHANGEABLE_SECTIONS = ("lr_schedule.", "parallel.")  # every key below these
# Paths compare by what they point at: ./run and /abs/run are the same run.
PATH_KEYS = ("checkpoint", "run_dir", "data.records", "data.tokenizer")


@dataclass(frozen=True)
class Layout:
    """How the ranks of a run were arranged (sizes, processes)."""

    world_size: int
    tensor: int
    pipeline: int
    expert: int
    context: int
    data_parallel: int

    def describe(self) -> str:
        """``TP=2 PP=1 EP=1 CP=1 DP=2`` (for messages)."""
        return (f"TP={self.tensor} PP={self.pipeline} EP={self.expert} CP={self.context} "
                f"DP={self.data_parallel}")

    def model_parallel(self) -> tuple[int, int, int, int]:
        """The sizes that split the model itself (TP, PP, EP, CP)."""
        return self.tensor, self.pipeline, self.expert, self.context


@dataclass(frozen=True)
class TrainerState:
    """The trainer's counters at a checkpoint (``trainer_state/state.json``)."""

    step: int  # optimizer steps done
    position: int  # queries consumed from the endless seeded order
    optimizer_steps: int  # torch's per-parameter update count
    optimizer_format: str  # dp_reshardable | fully_reshardable | model_space (no distributed optimizer)
    layout: Layout

    def write(self, directory: Path) -> None:
        """Write ``directory/state.json`` (atomically)."""
        atomic_write_json(directory / "state.json", {"format": STATE_FORMAT, **asdict(self)})

    @classmethod
    def read(cls, directory: Path) -> TrainerState:
        """Read ``directory/state.json``.

        Raises:
            CheckpointError: the file is missing (a checkpoint of an older megatron-sami, whose
                pickled per-rank state is not loaded) or malformed.
        """
        path = directory / "state.json"
        if not path.is_file():
            raise CheckpointError(f"{directory.parent} has no trainer_state/state.json (a checkpoint written by an "
                                  "older megatron-sami, whose pickled trainer state is no longer loaded because a "
                                  "planted file could run code); start a new run_dir from the same source checkpoint.")
        try:
            values = json.loads(path.read_text())
            values.pop("format")
            return cls(**{**values, "layout": Layout(**values["layout"])})
        except (ValueError, KeyError, TypeError) as err:
            raise CheckpointError(f"{path} is not a valid trainer state ({err}); resume from an earlier "
                                  "checkpoint by pointing checkpoints/latest at it.") from err


def check_layout(saved: TrainerState, current: Layout, checkpoint: Path) -> None:
    """Refuse a layout the saved optimizer state cannot be loaded at.

    Raises:
        LayoutError: the state was saved ``dp_reshardable`` (the distributed
            optimizer's default) and TP, PP, EP or CP differ; the message names the layout to keep.
    """
    if saved.optimizer_format == "dp_reshardable" and saved.layout.model_parallel() != current.model_parallel():
        old = saved.layout
        raise LayoutError(
            f"{checkpoint} holds distributed-optimizer state saved at {old.describe()} in the dp_reshardable format, "
            f"which loads only at the same TP/PP/EP/CP (the data-parallel size may change); resume with "
            f"parallel.tensor={old.tensor} parallel.pipeline={old.pipeline} parallel.expert={old.expert} "
            f"parallel.context={old.context}, or save with optimizer.checkpoint_format=fully_reshardable to change "
            f"layouts.")


def flat_settings(yaml_text: str, typed: Callable[[dict], object] | None = None) -> dict[str, object]:
    """The settings of a resolved config, flat; through ``typed`` (the owner's typed config) when
    given, so that a setting added since the run started reads as its default and a value written
    in an older form (``recompute_activations: false``) as what it means now (``none``)."""
    values = OmegaConf.to_container(OmegaConf.create(yaml_text))
    if typed is not None:
        try:
            values = asdict(typed(values))
        except ConfigError:
            pass  # e.g. a key this version no longer has: compared as written, so the change is named
    return flatten(values)


def _same(key: str, old: object, new: object) -> bool:
    if key in PATH_KEYS and isinstance(old, str) and isinstance(new, str):
        return os.path.realpath(old) == os.path.realpath(new)
    return old == new


def config_changes(saved_yaml: str, resolved_yaml: str, run_dir: Path,
                   typed: Callable[[dict], object] | None = None) -> dict[str, tuple[object, object]]:
    """The keys whose values differ between the run's saved config and this start's: ``key ->
    (old, new)``.

    Args:
        typed: builds the typed config from a config's values (e.g. ``TrainConfig``); both sides
            are compared as it normalises them (defaults for keys added since, current forms).

    Raises:
        ConfigError: a changed key is not in :data:`CHANGEABLE_ON_RESUME`; the message names it.
    """
    old, new = flat_settings(saved_yaml, typed), flat_settings(resolved_yaml, typed)
    changes = {key: (old.get(key), new.get(key)) for key in sorted(set(old) | set(new))
               if not _same(key, old.get(key), new.get(key))}
    refused = [key for key in changes if key not in CHANGEABLE_ON_RESUME and not key.startswith(CHANGEABLE_SECTIONS)]
    if refused:
        key = refused[0]
        before, after = changes[key]
        may_change = ", ".join([*CHANGEABLE_ON_RESUME, *(f"{section}*" for section in CHANGEABLE_SECTIONS)])
        raise ConfigError(f"{key} changed from {before!r} to {after!r}, but {run_dir} already holds checkpoints "
                          f"trained with {before!r}; rerun with {key}={_override_value(before)} to resume (only "
                          f"{may_change} may change), or use a new run_dir.")
    return changes


def _override_value(value: object) -> str:
    """``value`` as a command-line override writes it (``null``, ``true``, quoted strings)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, str) and (not value or any(c in value for c in " ,'\"=[]{}")):
        return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
    return str(value)


def record_config(run_dir: Path, resolved_yaml: str, changes: dict[str, tuple[object, object]], step: int) -> None:
    """Write ``config.yaml``; on a resume with changes, keep the replaced one as
    ``config_history/<time>-step_<N>.yaml`` first (the settings the checkpoints up to step N were
    trained with)."""
    saved = run_dir / "config.yaml"
    if changes and saved.is_file():
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
        (run_dir / "config_history").mkdir(exist_ok=True)
        atomic_write_text(run_dir / "config_history" / f"{stamp}-step_{step:06d}.yaml", saved.read_text())
    if changes or not saved.is_file() or step == 0:
        atomic_write_text(saved, resolved_yaml)
