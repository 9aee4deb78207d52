"""sami-iterate's checks that need no model: what its run directory may be, how MI is scored, and the
judge asked before any work (issues 14, 16, 17)."""

from pathlib import Path

import pytest
from test_configs import compose_config

from megatron_sami.cli.iterate import iterate_config
from megatron_sami.cli.schemas import register_iterate_schema
from megatron_sami.errors import ConfigError, DataError, JudgeError, OutputOverlapError
from megatron_sami.iteration.driver import Run


def open_run(run_dir: Path, base_hf: Path, *overrides: str, claim: bool = False) -> Run:
    register_iterate_schema()
    cfg = compose_config("iterate", [f"run_dir={run_dir}", f"base.hf={base_hf}", *overrides])
    return Run(iterate_config(cfg), "resolved: yaml\n" if claim else None)


def hf_dir(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text("{}")
    return path


@pytest.mark.parametrize(("run_dir", "model"), [
    ("model", "model"),  # the run directory is the model
    ("model/run", "model"),  # inside it: exports and state files would land in the model's directory
    ("runs", "runs/model"),  # holds it
    ("runs", "runs/iter1/hf"),  # iteration 1's export (--overwrite) would replace the base model
])
def test_a_run_directory_that_is_holds_or_lies_inside_the_base_model_is_refused(tmp_path, run_dir, model):
    base = hf_dir(tmp_path / model)
    before = sorted(p.name for p in base.iterdir())
    with pytest.raises(OutputOverlapError, match="base.hf"):
        open_run(tmp_path / run_dir, base, claim=True)
    assert sorted(p.name for p in base.iterdir()) == before
    assert not (tmp_path / run_dir / "config.yaml").exists()


def test_mi_is_scored_through_megatron_at_the_training_layout_unless_asked_otherwise(tmp_path):
    run = open_run(tmp_path / "run", hf_dir(tmp_path / "hf"), "train.parallel.tensor=2")
    launched = []
    (run.train_dir(1) / "checkpoints" / "step_000002").mkdir(parents=True)
    (run.train_dir(1) / "checkpoints" / "latest").write_text("step_000002\n")
    run.launch = lambda phase, module, args, distributed=True: launched.append((phase, module, args))
    scorer = run.scorer(1)
    with pytest.raises(DataError, match="does not exist"):  # the stand-in launcher scored nothing
        scorer("learned", [])
    [(phase, module, args)] = launched
    assert (phase, module) == ("iter1/evaluate", "megatron_sami.cli.score")
    assert "parallel.tensor=2" in args and any(str(run.final_checkpoint(1)) in arg for arg in args)
    assert open_run(tmp_path / "run2", tmp_path / "hf", "evaluation.scorer=hf").scorer(1) is None
    with pytest.raises(ConfigError, match="evaluation.scorer 'vllm' is unknown"):
        open_run(tmp_path / "run3", tmp_path / "hf", "evaluation.scorer=vllm")


def test_an_unreachable_judge_is_reported_before_any_phase_runs(tmp_path):
    run = open_run(tmp_path / "run", hf_dir(tmp_path / "hf"), "winrate.enabled=true",
                   "winrate.judge.base_url=http://127.0.0.1:9/v1", "winrate.judge.model=judge",
                   "winrate.judge.timeout_s=5")
    run.prepare = lambda: pytest.fail("a phase ran before the judge was asked")
    with pytest.raises(JudgeError):
        run.run()


@pytest.mark.parametrize("content", ["{", "[]", '{"phases": 3}', "\xff"])
def test_a_damaged_run_state_is_one_sentence(tmp_path, content):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "state.json").write_text(content, encoding="latin-1")
    with pytest.raises(DataError, match="state.json is not a run state written by sami-iterate"):
        open_run(run_dir, hf_dir(tmp_path / "hf"))


# -- keep only the weights of a finished iteration (issue 15, item 10) ----------------------------------

def fake_training_run(train_dir: Path, steps: int = 2) -> Path:
    """A sami-train run directory as the trainer leaves it: step_N checkpoints (model description,
    a real torch_dist weights/ checkpoint, optimizer/, trainer_state/), ``latest`` naming the last,
    and a staging leftover."""
    import torch
    import torch.distributed.checkpoint as dcp

    from megatron_sami.models.catalogue import load_model_config
    from megatron_sami.models.checkpoint_dir import write_model_files

    checkpoints = train_dir / "checkpoints"
    for step in range(1, steps + 1):
        step_dir = checkpoints / f"step_{step:06d}"
        (step_dir / "hf").mkdir(parents=True)
        write_model_files(step_dir, load_model_config("tiny-llama"), {"params_dtype": "fp32"})
        dcp.save({"embedding.weight": torch.full((4, 3), float(step))}, checkpoint_id=str(step_dir / "weights"))
        (step_dir / "weights" / "metadata.json").write_text('{"sharded_backend": "torch_dist"}')
        for sub in ("optimizer", "trainer_state/rng"):
            (step_dir / sub).mkdir(parents=True)
        (step_dir / "optimizer" / "__0_0.distcp").write_bytes(b"\0" * 1000)
        (step_dir / "trainer_state" / "state.json").write_text("{}")
    (checkpoints / f"step_{steps + 1:06d}.incomplete").mkdir()  # a write a kill interrupted
    (checkpoints / "latest").write_text(f"step_{steps:06d}\n")
    return checkpoints


def tree(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


def test_a_finished_iteration_keeps_only_its_final_weights(tmp_path):
    from megatron_sami.iteration.pruning import final_checkpoint, prune_training_checkpoints
    from megatron_sami.models.checkpoint import damaged_file

    checkpoints = fake_training_run(tmp_path / "train")
    weights_before = tree(checkpoints / "step_000002" / "weights")
    result = prune_training_checkpoints(checkpoints)
    assert result["kept"] == "step_000002" and result["freed_bytes"] > 1000
    assert result["removed"] == ["step_000001", "step_000002/optimizer", "step_000003.incomplete"]
    assert sorted(p.name for p in checkpoints.iterdir()) == ["latest", "step_000002"]
    final = checkpoints / "step_000002"
    assert sorted(p.name for p in final.iterdir()) == ["conversion.json", "hf", "model.yaml", "trainer_state", "weights"]
    assert tree(final / "weights") == weights_before and damaged_file(final / "weights") is None
    assert final_checkpoint(checkpoints) == final
    again = prune_training_checkpoints(checkpoints)  # idempotent
    assert again["removed"] == [] and again["freed_bytes"] == 0


@pytest.mark.parametrize("stage, calls", [("_mark", 0), ("_mark", 2), ("_remove", 0), ("_remove", 1), ("_remove", 2)])
def test_a_cleanup_killed_midway_leaves_the_final_weights_and_a_rerun_finishes_it(tmp_path, monkeypatch, stage, calls):
    from megatron_sami.iteration import pruning

    reference = fake_training_run(tmp_path / "reference")
    pruning.prune_training_checkpoints(reference)
    checkpoints = fake_training_run(tmp_path / "killed")
    real, done = getattr(pruning, stage), []

    def killed_after(path):
        if len(done) == calls:
            raise KeyboardInterrupt  # what a kill at this point leaves behind
        done.append(path)
        return real(path)

    monkeypatch.setattr(pruning, stage, killed_after)
    with pytest.raises(KeyboardInterrupt):
        pruning.prune_training_checkpoints(checkpoints)
    monkeypatch.setattr(pruning, stage, real)
    assert pruning.final_checkpoint(checkpoints) == checkpoints / "step_000002"  # still whole and loadable
    result = pruning.prune_training_checkpoints(checkpoints)
    assert tree(checkpoints) == tree(reference)
    assert set(result["removed"]) <= {"step_000001", "step_000002/optimizer", "step_000003.incomplete"}


@pytest.mark.parametrize("damage", ["no pointer", "pointer to staging", "truncated weights", "no model.yaml"])
def test_nothing_is_removed_beside_a_final_checkpoint_that_is_not_whole(tmp_path, damage):
    from megatron_sami.errors import CheckpointError
    from megatron_sami.iteration.pruning import prune_training_checkpoints

    checkpoints = fake_training_run(tmp_path / "train")
    final = checkpoints / "step_000002"
    if damage == "no pointer":
        (checkpoints / "latest").unlink()
    elif damage == "pointer to staging":
        (checkpoints / "latest").write_text("step_000003.incomplete\n")
    elif damage == "truncated weights":
        data = final / "weights" / "__0_0.distcp"
        data.write_bytes(data.read_bytes()[:40])
    else:
        (final / "model.yaml").unlink()
    before = tree(checkpoints)
    with pytest.raises(CheckpointError, match="nothing was removed"):
        prune_training_checkpoints(checkpoints)
    assert tree(checkpoints) == before


def test_the_cleanup_phase_follows_training_unless_the_optimizer_state_is_kept(tmp_path):
    names = [name for name, _ in open_run(tmp_path / "run", hf_dir(tmp_path / "hf"), "iterations=2").phases()]
    assert names[names.index("iter1/train") + 1] == "iter1/cleanup" and "iter2/cleanup" in names
    kept = open_run(tmp_path / "run2", tmp_path / "hf", "keep_optimizer_state=true").phases()
    assert not [name for name, _ in kept if name.endswith("/cleanup")]
    with pytest.raises(ConfigError, match="keep_optimizer_state"):
        open_run(tmp_path / "run3", tmp_path / "hf", "keep_optimizer_state=maybe")


# -- the phase split and the whole-iteration scaling study (issue 14, item 4) --------------------------

def write_jsonl(path: Path, rows: list[dict]) -> None:
    import json

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def fake_timed_run(run_dir: Path, nodes: int, scale: float = 1.0) -> Path:
    """A run directory whose state.json holds timed phases as the driver records them."""
    import json

    phases = {"queries": {"seconds": 0.5}, "prepare": {"seconds": 10.0},
              "iter0/evaluate": {"seconds": 20.0 * scale, "launched_seconds": {"score": 15.0 * scale},
                                 "tokens": {"generated": 30, "scored": 60}}}
    for t in (1, 2):
        phases |= {f"iter{t}/generate": {"seconds": 4.0 * scale, "tokens": {"generated": 100}},
                   f"iter{t}/filter": {"seconds": 0.1},
                   f"iter{t}/train": {"seconds": 40.0 * scale, "tokens": {"trained": 2000}},
                   f"iter{t}/cleanup": {"seconds": 0.2, "removed": []},
                   f"iter{t}/export": {"seconds": 8.0, "launched_seconds": {"convert": 7.5}}}
    for result in phases.values():
        result["nodes"] = nodes
    run_dir.mkdir(parents=True)
    (run_dir / "state.json").write_text(json.dumps({"phases": phases}))
    write_jsonl(run_dir / "iter1" / "train" / "metrics.jsonl", [{"step": 1, "world_size": nodes}])
    return run_dir


def test_the_phase_split_sums_each_kind_and_splits_scoring_out_of_evaluation(tmp_path):
    from megatron_sami.iteration.report import format_phase_split, phase_split

    rows = {row["phase"]: row for row in phase_split(fake_timed_run(tmp_path / "run", nodes=1))}
    assert list(rows) == ["queries", "prepare", "generate", "filter", "train", "cleanup", "export", "evaluate",
                          "score", "total"]
    assert rows["train"] == {"phase": "train", "count": 2, "seconds": 80.0, "mean_seconds": 40.0, "tokens": 4000,
                             "tokens_per_s": 50.0, "share": round(80 / rows["total"]["seconds"], 4)}
    assert (rows["evaluate"]["seconds"], rows["evaluate"]["tokens"]) == (5.0, 30)
    assert (rows["score"]["seconds"], rows["score"]["tokens"], rows["score"]["tokens_per_s"]) == (15.0, 60, 4.0)
    assert rows["export"]["tokens"] is None and rows["total"]["seconds"] == pytest.approx(0.5 + 10 + 20 + 2 * (4 + 0.1 + 40 + 0.2 + 8))
    assert "train" in format_phase_split(list(rows.values()))


def test_the_whole_iteration_study_writes_one_csv_row_per_node_count_and_phase(tmp_path):
    import csv

    from megatron_sami.cli.report import main
    from megatron_sami.errors import SamiError
    from megatron_sami.iteration.report import iteration_scaling

    runs = [fake_timed_run(tmp_path / "two", nodes=2, scale=0.5), fake_timed_run(tmp_path / "one", nodes=1)]
    assert main(["--scaling", *map(str, runs), "--out", str(tmp_path / "study")]) == 0
    with (tmp_path / "study" / "iteration_scaling.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [row["nodes"] for row in rows] == ["1"] * 10 + ["2"] * 10
    train = {row["nodes"]: row for row in rows if row["phase"] == "train"}
    assert (train["1"]["world_size"], train["1"]["tokens_per_s"], train["2"]["tokens_per_s"]) == ("1", "50.0", "100.0")
    assert (tmp_path / "study" / "iteration_scaling.png").stat().st_size > 0
    with pytest.raises(SamiError, match="same node count"):
        iteration_scaling([runs[1], fake_timed_run(tmp_path / "again", nodes=1)])
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "state.json").write_text('{"phases": {"queries": {"seconds": 1.0}}}')
    with pytest.raises(SamiError, match="recorded no node count"):
        iteration_scaling([tmp_path / "old"])


def test_each_phase_records_its_nodes_tokens_and_launched_seconds(tmp_path, monkeypatch):
    from megatron_sami.iteration.report import phase_tokens

    run = open_run(tmp_path / "run", hf_dir(tmp_path / "hf"))
    responses = {"constitutions": ["a", "b"], "metadata": {"num_tokens": [3, 5]}}
    write_jsonl(run.dir / "iter1" / "generated" / "shard-00000.jsonl", [responses, responses])
    write_jsonl(run.dir / "iter1" / "train" / "metrics.jsonl", [{"tokens_per_s": 10.0, "step_time_s": 2.0}] * 3)
    write_jsonl(run.dir / "eval" / "iter1-learned" / "shard-00000.jsonl", [responses])
    write_jsonl(run.dir / "eval" / "iter1-learned-scores" / "shard-00000.jsonl", [responses])  # the scorer's work
    write_jsonl(run.dir / "eval" / "iter10-learned" / "shard-00000.jsonl", [responses])  # another iteration's
    assert phase_tokens(run.dir, "iter1/generate") == {"generated": 16}
    assert phase_tokens(run.dir, "iter1/train") == {"trained": 60}
    assert phase_tokens(run.dir, "iter1/evaluate") == {"generated": 8, "scored": 16}
    assert phase_tokens(run.dir, "iter1/export") == {}
    monkeypatch.setenv("SLURM_JOB_NUM_NODES", "2")
    run.launch("iter1/evaluate", "this", [], distributed=False)  # python -m this: a quick launched command
    measured = run.measures("iter1/evaluate")
    assert measured["nodes"] == 2 and measured["tokens"] == {"generated": 8, "scored": 16}
    assert list(measured["launched_seconds"]) == ["this"] and measured["launched_seconds"]["this"] >= 0


def test_a_run_started_before_a_setting_existed_resumes_and_a_changed_one_is_refused(tmp_path):
    """The saved config.yaml lacks a key a later version added (keep_optimizer_state): the typed
    config reads it as its default, so the run resumes; so does one launched differently (another
    allocation); a value that differs is still refused."""
    import json

    from omegaconf import OmegaConf

    register_iterate_schema()
    run_dir, base = tmp_path / "run", hf_dir(tmp_path / "hf")
    cfg = compose_config("iterate", [f"run_dir={run_dir}", f"base.hf={base}"])
    settings = iterate_config(cfg)
    resolved = OmegaConf.to_yaml(cfg, resolve=True)
    assert "keep_optimizer_state: false" in resolved
    run_dir.mkdir()
    (run_dir / "state.json").write_text(json.dumps({"phases": {"queries": {}}}))
    (run_dir / "config.yaml").write_text(resolved.replace("keep_optimizer_state: false\n", ""))
    Run(settings, resolved).lock.release()
    # A resubmission on another allocation: srun's options differ, the run is the same.
    assert "  prefix: null\n" in resolved
    (run_dir / "config.yaml").write_text(resolved.replace("  prefix: null\n", "  prefix:\n  - srun\n  - --nodes=4\n"))
    Run(settings, resolved).lock.release()
    (run_dir / "config.yaml").write_text(resolved.replace("keep_optimizer_state: false", "keep_optimizer_state: true"))
    with pytest.raises(ConfigError, match=r"changed: keep_optimizer_state\)"):
        Run(settings, resolved)
