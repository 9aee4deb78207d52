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
