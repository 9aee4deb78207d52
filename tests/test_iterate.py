"""sami-iterate end to end on a tiny random model: two iterations, rerun, kills and resume, bad input."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megatron_sami.testing.processes import wait_until_gone

import iterate_jobs

pytestmark = pytest.mark.slow

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return iterate_jobs.make_inputs(tmp_path_factory.mktemp("iterate"))


def iterate_command(tiny: Path, run_dir: Path, *overrides: str) -> list[str]:
    return [sys.executable, "-m", "megatron_sami.cli.iterate", "--config-name", f"recipe/{iterate_jobs.RECIPE}",
            f"run_dir={run_dir}", f"base.hf={tiny / 'hf'}", *iterate_jobs.overrides(tiny), *overrides]


def run(command, timeout=900):
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, (result.stdout[-3000:], result.stderr[-5000:])
    return result


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def finished_run(tiny):
    run_dir = tiny / "run"
    run(iterate_command(tiny, run_dir))
    return run_dir


def test_two_iterations_complete_with_everything_in_one_run_directory(finished_run):
    summary = json.loads((finished_run / "summary.json").read_text())
    assert summary["complete"]
    rows = {row["iteration"]: row for row in summary["iterations"]}
    assert sorted(rows) == [0, 1, 2]
    for t in (1, 2):
        assert rows[t]["filter"]["input"] == 4 and rows[t]["filter"]["kept"] <= 4
        assert rows[t]["train_last_step"]["step"] == 2
        assert (Path(rows[t]["hf"]) / "config.json").is_file()
    for t in (0, 1, 2):
        for key in ("info_nce_bound", "paper_mi"):
            assert rows[t]["mi"]["learned"][key]["n"] == 3
    assert (finished_run / "mi.png").stat().st_size > 0 and (finished_run / "config.yaml").is_file()
    # disjoint query sets; iteration 2 generated with iteration 1's model; both trained from the base
    ids = [{r["id"] for r in read_jsonl(finished_run / "queries" / f"{name}.jsonl")} for name in ("eval", "iter1", "iter2")]
    assert not (ids[0] & ids[1] or ids[0] & ids[2] or ids[1] & ids[2])
    state = json.loads((finished_run / "state.json").read_text())["phases"]
    assert state["iter2/generate"]["model"] == str(finished_run / "iter1" / "hf")
    # generation ran as its own process (one local node without srun), which recorded the node of each shard
    assert state["iter1/generate"]["shards"] == 4 and sum(state["iter1/generate"]["written_by"].values()) == 4
    assert (finished_run / "iter1" / "generate-job.json").is_file()
    assert sum(state["iter0/evaluate"]["written_by"].values()) == 3
    assert state["iter2/train"]["trained_from"] == state["iter1/train"]["trained_from"] == \
        str(finished_run / "base" / "megatron")
    records = read_jsonl(finished_run / "iter1" / "records.jsonl")
    assert all(len(r["constitutions"]) == len(r["responses"]) == 2 for r in records)


def test_rerunning_a_finished_run_does_no_work(tiny, finished_run):
    before = (finished_run / "state.json").read_text()
    result = run(iterate_command(tiny, finished_run))
    assert result.stderr.count("already complete") == 15  # 13 phases + one cleanup per iteration
    assert "runtime:" not in result.stderr  # no conversion, training or export was launched
    assert (finished_run / "state.json").read_text() == before


@pytest.mark.parametrize("changed", ["train.optimizer.lr=2e-3", "train.steps=3", "generation.max_new_tokens=13"])
def test_rerunning_with_changed_settings_is_refused_and_names_them(tiny, finished_run, changed):
    before = (finished_run / "config.yaml").read_text()
    result = subprocess.run(iterate_command(tiny, finished_run, changed), capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "holds a run with a different configuration" in result.stderr
    assert f"changed: {changed.split('=')[0]})" in result.stderr
    assert (finished_run / "config.yaml").read_text() == before


def test_restating_a_recipe_value_is_no_change(tiny, finished_run):
    """tiny-llama's lr is 1e-3: the same value on the command line resolves to the same config."""
    result = run(iterate_command(tiny, finished_run, "train.optimizer.lr=1e-3"))
    assert result.stderr.count("already complete") == 15  # 13 phases + one cleanup per iteration


def wait_for(path_glob: Path, process, timeout=600):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if list(path_glob.parent.glob(path_glob.name)):
            return
        assert process.poll() is None, "the run ended before the kill point"
        time.sleep(0.02)
    raise AssertionError(f"{path_glob} never appeared")


def kill(process):
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def test_kills_in_generation_and_training_resume_to_the_same_result(tiny, finished_run, tmp_path):
    run_dir = tmp_path / "run"
    command = iterate_command(tiny, run_dir)
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    wait_for(run_dir / "iter1" / "generated" / "shard-00000.jsonl", process)
    kill(process)
    phases = json.loads((run_dir / "state.json").read_text())["phases"]
    assert "iter1/generate" not in phases
    shards_after_kill = len(list((run_dir / "iter1" / "generated").glob("shard-*.jsonl")))
    assert 1 <= shards_after_kill < 4

    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    wait_for(run_dir / "iter1" / "train" / "checkpoints" / "step_000001", process)
    kill(process)
    assert "iter1/train" not in json.loads((run_dir / "state.json").read_text())["phases"]
    # kill -9 of sami-iterate's group ends torchrun and its workers too (issue 16: they used to keep
    # training in sessions of their own, beside the rerun's trainer).
    wait_until_gone(run_dir, [run_dir, run_dir / "iter1" / "train"])

    result = run(command)
    assert "resumed from" in result.stderr
    for t in (1, 2):
        assert read_jsonl(run_dir / f"iter{t}" / "records.jsonl") == read_jsonl(finished_run / f"iter{t}" / "records.jsonl")
        assert_same_training(run_dir, finished_run, t)
    resumed = json.loads((run_dir / "summary.json").read_text())["iterations"]
    reference = json.loads((finished_run / "summary.json").read_text())["iterations"]
    assert [r["mi"] for r in resumed] == [r["mi"] for r in reference]


def assert_same_training(run_dir, reference, t):
    """Bit-identical losses and gradient norms step by step (timings aside)."""
    keys = ("step", "loss", "loss_row", "loss_col", "grad_norm", "mi_bound_nats")
    mine = [{k: r[k] for k in keys} for r in read_jsonl(run_dir / f"iter{t}" / "train" / "metrics.jsonl")]
    theirs = [{k: r[k] for k in keys} for r in read_jsonl(reference / f"iter{t}" / "train" / "metrics.jsonl")]
    assert mine == theirs


@pytest.mark.parametrize("override, message", [
    ("queries.source=hub", "unknown query source 'hub'"),
    ("queries.path=/nonexistent/queries.jsonl", "does not exist"),
    ("sampling.num_constitutions=5", "larger than the constitutions allow"),
    ("generation.backend=vllm", "'vllm' is not installed"),
    ("constitution_set=no-such-set", "not found"),
    ("constitution_set=NO_ANTITHESIS", "has no antithesis"),
    ("base.hf=/nonexistent/model", "is not an HF model directory"),
])
def test_bad_input_is_one_sentence_and_writes_nothing(tiny, tmp_path, override, message):
    run_dir = tmp_path / "bad"
    if "NO_ANTITHESIS" in override:
        (tmp_path / "one.yaml").write_text("name: one\nprinciples:\n  - name: kind\n    definition: Be kind.\n")
        override = override.replace("NO_ANTITHESIS", str(tmp_path / "one.yaml"))
    result = subprocess.run(iterate_command(tiny, run_dir, override), capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    assert message in result.stderr and "Traceback" not in result.stderr
    assert not (run_dir / "state.json").exists()


def test_sami_eval_reports_a_run_and_compares_models_on_learned_and_heldout_principles(tiny, finished_run, tmp_path):
    table = run([sys.executable, "-m", "megatron_sami.cli.eval", "mi", "--run-dir", str(finished_run)]).stdout
    assert table.count("learned") == 3 and "InfoNCE bound" in table
    out = tmp_path / "eval"
    result = run([sys.executable, "-m", "megatron_sami.cli.eval", "mi", "--model", f"base={tiny / 'hf'}",
                  "--model", f"iter1={finished_run / 'iter1' / 'hf'}", "--out", str(out),
                  "--constitutions", "diverse_summarization", "--template", "summarization",
                  "--queries", "builtin:summarization", "--num-queries", "2", "--max-new-tokens", "6"])
    rows = json.loads((out / "mi.json").read_text())
    assert [row["label"] for row in rows] == ["base", "iter1"]
    for row in rows:
        assert set(row["mi"]) == {"learned", "heldout"}
        assert row["mi"]["heldout"]["paper_mi"]["n"] == 2 and row["mi"]["learned"]["num_constitutions"] == 4
    assert (out / "mi.png").stat().st_size > 0 and "heldout" in result.stdout


def test_principle_writer_refuses_a_model_that_writes_no_valid_principles(tiny, tmp_path):
    out = tmp_path / "mine.yaml"
    result = subprocess.run([sys.executable, "-m", "megatron_sami.cli.write_principles", "--model", str(tiny / "hf"),
                             "--out", str(out), "--count", "3", "--seed-prompt", "Write principles for recipes.",
                             "--attempts", "2", "--max-new-tokens", "16"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "valid principles of 3" in result.stderr, result.stderr[-2000:]
    assert not out.exists() and not [p.name for p in tmp_path.iterdir() if p.name != "mine.yaml" and "mine" in p.name]


def judged_rows(path: Path) -> list[dict]:
    return read_jsonl(path / "judgements.jsonl")


def test_sami_eval_winrate_judges_each_iteration_of_a_run_against_its_base(finished_run):
    from judge_server import FakeJudge

    with FakeJudge(always="A") as judge:
        result = subprocess.run(
            [sys.executable, "-m", "megatron_sami.cli.eval", "winrate", "--run-dir", str(finished_run),
             "--judge-url", judge.url, "--judge-model", "judge"], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(judge.answered) == 2 * 3 * 2  # iterations x evaluation queries x principles per query
    for t in (1, 2):
        out = finished_run / "winrate" / f"iter{t}-vs-base"
        rows = judged_rows(out)
        # A judge that always answers A prefers whichever response was placed first.
        assert [row["score"] for row in rows] == [1.0 if row["test_first"] else 0.0 for row in rows]
        learned = json.loads((out / "result.json").read_text())["splits"]["learned"]
        assert learned["win_rate"]["mean"] == sum(r["test_first"] for r in rows) / len(rows)
        # the responses judged are the MI evaluation's positive-constitution responses
        shards = sorted((finished_run / "eval" / f"iter{t}-learned").glob("shard-*.jsonl"))
        evaluated = {r["id"]: r["responses"][0] for shard in shards for r in read_jsonl(shard)}
        assert [row["test"] for row in rows] == [evaluated[row["query_id"]] for row in rows]
    assert (finished_run / "winrate.png").stat().st_size > 0 and "iter2" in result.stdout


def test_iterate_runs_the_winrate_phase_when_a_judge_is_configured(tiny, tmp_path):
    from judge_server import FakeJudge

    run_dir = tmp_path / "judged"
    with FakeJudge(always="B") as judge:
        run(iterate_command(tiny, run_dir, "iterations=1", "winrate.enabled=true", f"winrate.judge.base_url={judge.url}",
                            "winrate.judge.model=judge"))
    summary = json.loads((run_dir / "summary.json").read_text())
    row = next(r for r in summary["iterations"] if r["iteration"] == 1)
    overall = row["winrate"]["base"]["all"]["win_rate"]
    rows = judged_rows(run_dir / "winrate" / "iter1-vs-base")
    assert overall["n"] == len(rows) == 6 and len(judge.answered) == 6
    assert overall["mean"] == sum(not r["test_first"] for r in rows) / 6
    assert "iter1/winrate" in json.loads((run_dir / "state.json").read_text())["phases"]
    assert (run_dir / "winrate.png").stat().st_size > 0


def test_a_finished_iteration_keeps_only_final_weights_that_export_scoring_and_training_read(tiny, finished_run,
                                                                                             tmp_path, capsys):
    """Issue 15 item 10: iteration t's other checkpoints and its optimizer state are removed once its
    training is recorded; export and MI scoring (after the cleanup) read the final weights, and a
    new sami-train starts from them as iteration t+1 does with train_from=previous."""
    from megatron_sami.iteration.report import report

    state = json.loads((finished_run / "state.json").read_text())["phases"]
    names = list(state)
    for t in (1, 2):
        checkpoints = finished_run / f"iter{t}" / "train" / "checkpoints"
        assert sorted(p.name for p in checkpoints.iterdir()) == ["latest", "step_000002"]
        assert sorted(p.name for p in (checkpoints / "step_000002").iterdir()) == \
            ["conversion.json", "hf", "model.yaml", "trainer_state", "weights"]
        assert state[f"iter{t}/cleanup"]["removed"] == ["step_000001", "step_000002/optimizer"]
        assert names.index(f"iter{t}/train") < names.index(f"iter{t}/cleanup") < names.index(f"iter{t}/export")
        # Issue 14 item 4: each phase's wall time, node count and tokens; the launched scoring's seconds.
        assert state[f"iter{t}/train"]["tokens"]["trained"] > 0 and state[f"iter{t}/train"]["nodes"] == 1
        assert state[f"iter{t}/generate"]["tokens"]["generated"] > 0
        assert 0 < state[f"iter{t}/evaluate"]["launched_seconds"]["score"] < state[f"iter{t}/evaluate"]["seconds"]
    pruned = finished_run / "iter1" / "train" / "checkpoints" / "step_000002"
    run([sys.executable, "-m", "megatron_sami.cli.train", f"checkpoint={pruned}", "template=dialogue",
         f"data.records={finished_run / 'iter2' / 'records.jsonl'}", f"run_dir={tmp_path / 'next'}", "steps=1",
         "queries_per_step=2", "data.seq_length=256", "optimizer.use_distributed_optimizer=false",
         "precision.params_dtype=fp32"])
    assert (tmp_path / "next" / "checkpoints" / "step_000001" / "optimizer").is_dir()
    assert report(finished_run) == 0
    printed = capsys.readouterr().out
    assert "Where the time went" in printed and "\ntrain " in printed and "\nscore " in printed
