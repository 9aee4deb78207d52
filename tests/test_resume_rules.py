"""The rules a resume follows, without training: which settings may change, which layouts load,
the trainer state's file format, and the run-directory lock (issue 16)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_sami.alignment.resume import Layout, TrainerState, check_layout, config_changes, record_config
from megatron_sami.errors import CheckpointError, ConfigError, LayoutError, RunInUse
from megatron_sami.runlock import RunLock

SAVED = """checkpoint: /ckpt
run_dir: /runs/a
steps: 4
seed: 1234
data:
  records: /data/r.jsonl
  seq_length: 512
optimizer:
  lr: 1.0e-06
  name: adam
loss:
  temperature: 1.0
lr_schedule:
  warmup_steps: 0
parallel:
  tensor: 2
"""


def changed(**values: object) -> str:
    text = SAVED
    for dotted, value in values.items():
        key = dotted.split("__")[-1]
        lines = [line if not line.strip().startswith(f"{key}:") else line.split(":")[0] + f": {value}"
                 for line in text.splitlines()]
        text = "\n".join(lines) + "\n"
    return text


@pytest.mark.parametrize(("change", "key"), [
    ({"steps": 8}, "steps"), ({"optimizer__lr": 2.0e-06}, "optimizer.lr"),
    ({"lr_schedule__warmup_steps": 2}, "lr_schedule.warmup_steps"), ({"parallel__tensor": 1}, "parallel.tensor"),
])
def test_settings_that_can_take_effect_are_accepted(change, key, tmp_path):
    changes = config_changes(SAVED, changed(**change), tmp_path)
    assert list(changes) == [key]


@pytest.mark.parametrize(("change", "key"), [
    ({"seed": 7}, "seed"), ({"loss__temperature": 0.5}, "loss.temperature"),
    ({"data__records": "/data/other.jsonl"}, "data.records"), ({"optimizer__name": "rmsprop"}, "optimizer.name"),
    ({"data__seq_length": 256}, "data.seq_length"), ({"checkpoint": "/other"}, "checkpoint"),
])
def test_other_changes_are_refused_naming_the_key_and_the_value_to_keep(change, key, tmp_path):
    with pytest.raises(ConfigError) as refused:
        config_changes(SAVED, changed(**change), tmp_path)
    message = str(refused.value)
    assert message.startswith(f"{key} changed from") and f"rerun with {key}=" in message


def test_the_same_path_written_another_way_is_no_change(tmp_path, monkeypatch):
    monkeypatch.chdir("/")
    assert config_changes(SAVED, SAVED.replace("/data/r.jsonl", "/data/../data/r.jsonl"), tmp_path) == {}


def test_a_resume_with_changes_keeps_the_replaced_config(tmp_path):
    (tmp_path / "config.yaml").write_text(SAVED)
    record_config(tmp_path, SAVED, {}, step=2)  # no change: nothing rewritten, no history
    assert not (tmp_path / "config_history").exists()
    new = changed(steps=8)
    record_config(tmp_path, new, config_changes(SAVED, new, tmp_path), step=2)
    assert (tmp_path / "config.yaml").read_text() == new
    [kept] = (tmp_path / "config_history").iterdir()
    assert kept.read_text() == SAVED and kept.name.endswith("-step_000002.yaml")


def layout(**sizes: int) -> Layout:
    values = {"world_size": 2, "tensor": 2, "pipeline": 1, "expert": 1, "context": 1, "data_parallel": 1} | sizes
    return Layout(**values)


@pytest.mark.parametrize(("fmt", "now", "refused"), [
    ("dp_reshardable", layout(world_size=4, data_parallel=2), False),
    ("dp_reshardable", layout(world_size=1, tensor=1), True),
    ("dp_reshardable", layout(world_size=4, pipeline=2), True),
    ("fully_reshardable", layout(world_size=1, tensor=1), False),
    ("model_space", layout(world_size=2, tensor=1, pipeline=2), False),
])
def test_which_layouts_a_saved_optimizer_state_loads_at(fmt, now, refused):
    state = TrainerState(step=2, position=8, optimizer_steps=2, optimizer_format=fmt, layout=layout())
    if refused:
        with pytest.raises(LayoutError, match="parallel.tensor=2 parallel.pipeline=1"):
            check_layout(state, now, Path("ckpt"))
    else:
        check_layout(state, now, Path("ckpt"))


def test_trainer_state_is_json_and_an_old_pickled_state_is_refused(tmp_path):
    state = TrainerState(step=3, position=12, optimizer_steps=3, optimizer_format="dp_reshardable", layout=layout())
    state.write(tmp_path)
    assert json.loads((tmp_path / "state.json").read_text())["format"] == 2
    assert TrainerState.read(tmp_path) == state
    old = tmp_path / "old" / "trainer_state"
    old.mkdir(parents=True)
    (old / "rank00000.pt").write_bytes(b"pickle")
    with pytest.raises(CheckpointError, match="older megatron-sami"):
        TrainerState.read(old)
    (tmp_path / "state.json").write_text("{")
    with pytest.raises(CheckpointError, match="not a valid trainer state"):
        TrainerState.read(tmp_path)


def test_a_second_holder_of_a_run_directory_is_refused_with_the_first_named(tmp_path):
    with RunLock(tmp_path, "sami-train"):
        with pytest.raises(RunInUse, match=r"in use by sami-train \(pid \d+ on"):
            RunLock(tmp_path, "sami-train").acquire()
    RunLock(tmp_path, "sami-train").acquire().release()  # released on exit


def test_the_lock_dies_with_its_holder(tmp_path):
    """kill -9 of the holder releases the lock: a stale lock file never blocks a rerun."""
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from megatron_sami.runlock import RunLock; "
                               f"RunLock({str(tmp_path)!r}, 'sami-train').acquire(); print('held', flush=True); "
                               "time.sleep(600)"], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(RunInUse, match=f"pid {holder.pid}"):
        RunLock(tmp_path, "test").acquire()
    holder.kill()
    holder.wait()
    RunLock(tmp_path, "test").acquire().release()


def test_a_latest_pointer_to_a_missing_checkpoint_is_refused_naming_those_present(tmp_path):
    """Starting over instead would drop the run's metrics and overwrite its checkpoints."""
    from megatron_sami.alignment.trainer import latest_checkpoint

    checkpoints = tmp_path / "checkpoints"
    (checkpoints / "step_000004").mkdir(parents=True)
    assert latest_checkpoint(tmp_path) is None
    (checkpoints / "latest").write_text("step_000006\n")
    with pytest.raises(CheckpointError, match="names step_000006, which does not exist \\(present: step_000004\\)"):
        latest_checkpoint(tmp_path)
    (checkpoints / "latest").write_text("step_000004\n")
    with pytest.raises(CheckpointError, match="holds weights but no optimizer state .* in a new run_dir with "
                                              "checkpoint=.*step_000004"):
        latest_checkpoint(tmp_path)  # what sami-iterate's cleanup leaves of a finished iteration
    (checkpoints / "step_000004" / "optimizer").mkdir()
    assert latest_checkpoint(tmp_path) == checkpoints / "step_000004"


@pytest.mark.parametrize("run_dir", ["ckpt", "ckpt/weights", "."])
def test_a_training_run_directory_apart_from_its_source_checkpoint(tmp_path, monkeypatch, run_dir):
    from types import SimpleNamespace

    from megatron_sami.alignment.trainer import TrainConfig, claim_run_dir
    from megatron_sami.errors import OutputOverlapError

    monkeypatch.chdir(tmp_path)
    (tmp_path / "ckpt" / "weights").mkdir(parents=True)
    cfg = TrainConfig(checkpoint=str(tmp_path / "ckpt"), run_dir=run_dir)
    with pytest.raises(OutputOverlapError, match="checkpoint"):
        claim_run_dir(cfg, SimpleNamespace(is_rank0=True), "")
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["weights"]


def test_sigusr1_reaches_torchrun_workers_as_sigterm(tmp_path):
    """torchrun (torch 2.13) passes on only SIGTERM, SIGINT, SIGHUP and SIGQUIT."""
    import signal as signals

    from test_driver_rules import hf_dir, open_run

    run = open_run(tmp_path / "run", hf_dir(tmp_path / "hf"))
    sent = []
    run.child = SimpleChild(sent)
    run._on_signal(signals.SIGUSR1, None)
    assert sent == [signals.SIGTERM] and run.stop_signal == signals.SIGUSR1


class SimpleChild:
    def __init__(self, sent: list) -> None:
        self.sent = sent

    def poll(self) -> None:
        return None

    def send_signal(self, number: int) -> None:
        self.sent.append(number)


def test_a_refusal_writes_the_value_to_keep_as_an_override_would():
    with pytest.raises(ConfigError, match=r"rerun with data.tokenizer=null to resume \(only steps, "):
        config_changes(SAVED.replace("  seq_length: 512", "  seq_length: 512\n  tokenizer: null"),
                       SAVED.replace("  seq_length: 512", "  seq_length: 512\n  tokenizer: /tok"), Path("run"))


def test_a_setting_added_or_rewritten_since_the_run_started_is_no_change(tmp_path):
    """Compared through TrainConfig, as the trainer compares: a key the saved config lacks reads as
    its default, and an older spelling (recompute_activations: false) as its current form (none)."""
    from omegaconf import OmegaConf

    from megatron_sami.alignment.trainer import TrainConfig
    from megatron_sami.typed_config import to_typed

    def typed(values):
        return to_typed(TrainConfig, values, "train")

    minimal = {"checkpoint": "/ckpt", "run_dir": "/runs/a", "data": {"records": "/data/r.jsonl"}}
    current = OmegaConf.to_yaml(OmegaConf.structured(typed(OmegaConf.create(minimal))))
    assert "overlap_grad_reduce: null" in current and "recompute_activations: none" in current
    older = current.replace("  overlap_grad_reduce: null\n", "").replace("recompute_activations: none",
                                                                         "recompute_activations: false")
    assert config_changes(older, current, tmp_path, typed=typed) == {}
    full = older.replace("recompute_activations: false", "recompute_activations: true")
    assert config_changes(full, current, tmp_path, typed=typed) == {"recompute_activations": ("full", "none")}
    assert "recompute_activations" in config_changes(older, current, tmp_path)  # compared as written: a change
