"""sami-score: MI matrices through Megatron at a training layout equal transformers', its command
line reads back exactly what the driver passes, the data-parallel split, and resuming from parts.

Tolerance (fp32 on both sides): matrices within rtol 1e-5 / atol 1e-4 nats (as the SAMI step's
tests), both estimators within 1e-4 nats.
"""

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import sami_jobs
import torch
from hydra import compose, initialize_config_dir

from megatron_sami.alignment import scoring
from megatron_sami.alignment.data import SamiRecord
from megatron_sami.alignment.trainer import TrainConfig
from megatron_sami.cli.schemas import defaults_tree, register_schema
from megatron_sami.errors import ConfigError, DataError, SamiError
from megatron_sami.evaluation import mi
from megatron_sami.resources import config_dir
from megatron_sami.runtime.layout import ParallelConfig
from megatron_sami.testing.multiprocess import run_distributed
from megatron_sami.typed_config import to_typed

ROOT = Path(__file__).resolve().parents[1]


def composed(overrides: list[str]) -> scoring.ScoreConfig:
    register_schema("score_schema", defaults_tree(scoring.ScoreConfig))
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return to_typed(scoring.ScoreConfig, compose(config_name="score", overrides=overrides), "score")


@pytest.mark.parametrize("path", ["/runs/a b/x", "/runs/café/x", "/runs/it's/x", "/runs/a,b/x", "/runs/k=v/x",
                                  "/runs/${HOME}/x", "/runs/back\\slash\\", "/runs/q\\'t/x", '/runs/"d"/x'])
def test_score_args_read_back_as_the_exact_paths_and_the_training_layout(path):
    train = TrainConfig(checkpoint="-", run_dir="-", queries_per_microbatch=2,
                        parallel=ParallelConfig(tensor=2, pipeline=2, expert=1))
    train.data.share_prompts = False
    train.precision.params_dtype = "fp32"
    cfg = composed(scoring.score_args(train, path + "/ckpt", path + "/records.jsonl", path + "/m.jsonl",
                                      queries_per_chunk=5))
    assert (cfg.checkpoint, cfg.records, cfg.output) == (path + "/ckpt", path + "/records.jsonl", path + "/m.jsonl")
    assert cfg.parallel == train.parallel and cfg.template.name == train.template.name == "dialogue"
    assert (cfg.params_dtype, cfg.share_prompts, cfg.queries_per_microbatch, cfg.queries_per_chunk) == \
        ("fp32", False, 2, 5)


@pytest.mark.parametrize("values, fix", [
    ({"queries_per_chunk": 0}, "queries_per_chunk must be >= 1"),
    ({"seq_length": 0}, "seq_length must be >= 1"),
    ({"on_overlength": "cut"}, "use error or drop"),
    ({"params_dtype": "fp16"}, "use one of bf16, fp32"),
])
def test_bad_settings_are_refused_with_the_fix(values, fix):
    with pytest.raises(ConfigError, match=fix):
        scoring.ScoreConfig(**values)


@pytest.mark.parametrize("num_queries, size, per_microbatch, shares", [
    (3, 1, 1, [([0, 1, 2], 3)]),
    (3, 2, 1, [([0, 2], 2), ([1, 1], 1)]),
    (5, 2, 2, [([0, 2, 4, 4], 3), ([1, 3, 3, 3], 2)]),
    (1, 3, 1, [([0], 1), ([0], 0), ([0], 0)]),
    (4, 2, 3, [([0, 2, 2], 2), ([1, 3, 3], 2)]),
])
def test_every_query_is_scored_once_and_every_rank_runs_the_same_microbatches(num_queries, size, per_microbatch,
                                                                             shares):
    got = [scoring.data_parallel_share(num_queries, rank, size, per_microbatch) for rank in range(size)]
    assert got == shares
    assert sorted(q for indices, own in got for q in indices[:own]) == list(range(num_queries))


def write_rows(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def record_row(query_id: str, responses: list[str]) -> dict:
    return {"id": query_id, "query": "q?", "constitutions": ["1. a", "1. b"][:len(responses)], "responses": responses}


def test_records_come_from_a_file_or_generation_shards_without_empty_responses(tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    write_rows(shards / "shard-00000.jsonl", [record_row("a", ["x", "y"]), record_row("b", ["x", " "])])
    write_rows(shards / "shard-00001.jsonl", [record_row("c", ["x", "z"])])
    records, empty = scoring.read_scoring_records(shards)
    assert [r.id for r in records] == ["a", "c"] and empty == 1
    assert [r.id for r in scoring.read_scoring_records(shards / "shard-00001.jsonl")[0]] == ["c"]
    with pytest.raises(DataError, match="does not exist"):
        scoring.read_scoring_records(tmp_path / "missing.jsonl")
    with pytest.raises(DataError, match="no shard"):
        scoring.read_scoring_records(tmp_path)
    three = {**record_row("d", ["x", "y"]), "constitutions": ["1. a", "1. b", "1. c"], "responses": ["x", "y", "z"]}
    with pytest.raises(DataError, match="must share C"):
        scoring.read_scoring_records(write_rows(tmp_path / "mixed.jsonl", [record_row("a", ["x", "y"]), three]))


def test_parts_from_other_records_or_settings_are_discarded(tmp_path):
    records = [SamiRecord(f"q{i}", "q?", ["1. a", "1. b"], ["x", "y"]) for i in range(5)]
    cfg = scoring.ScoreConfig(checkpoint=str(tmp_path), records="-", output=str(tmp_path / "out" / "m.jsonl"),
                              queries_per_chunk=2)
    assert scoring.chunks_to_score(cfg, records) == [0, 1, 2]
    write_rows(scoring.part_path(cfg.output, 1), [])
    assert scoring.chunks_to_score(cfg, records) == [0, 2]  # kept
    other = scoring.ScoreConfig(**{**vars(cfg), "params_dtype": "fp32"})
    assert scoring.chunks_to_score(other, records) == [0, 1, 2]  # another dtype: discarded
    write_rows(scoring.part_path(cfg.output, 1), [])
    records[3].responses = ["x", "changed"]
    assert scoring.chunks_to_score(other, records) == [0, 1, 2]  # other records: discarded


# -- through Megatron, against transformers -------------------------------------------------------

NUM_QUERIES, C = 3, 2


@pytest.fixture(scope="module")
def scored_model(tmp_path_factory):
    """(HF dir, checkpoint dir, records file, transformers' matrices) of a tiny Llama."""
    root = tmp_path_factory.mktemp("scoring")
    hf_dir, ckpt = sami_jobs.make_tiny_sami_model(root)
    records = sami_jobs.make_records(NUM_QUERIES, C)
    sami_jobs.write_records(root / "records.jsonl", records)
    return hf_dir, ckpt, root / "records.jsonl", mi.hf_matrices(hf_dir, records, sami_jobs.TEMPLATE)


def assert_equal_scores(rows: list[dict], expected: list[dict[str, torch.Tensor]]) -> None:
    assert [row["id"] for row in rows] == [f"q{i}" for i in range(NUM_QUERIES)]
    got = [{key: torch.tensor(row[key]) for key in ("sum", "mean")} for row in rows]
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g["sum"], e["sum"], rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(g["mean"], e["mean"], rtol=1e-5, atol=1e-4)
    got_estimates, expected_estimates = mi.estimates(got), mi.estimates(expected)
    for key in ("info_nce_bound", "paper_mi"):
        assert got_estimates[key]["mean"] == pytest.approx(expected_estimates[key]["mean"], abs=1e-4)
        assert got_estimates[key]["se"] == pytest.approx(expected_estimates[key]["se"], abs=1e-4)


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.slow
@pytest.mark.parametrize(("world", "tensor", "pipeline", "share"),
                         [(1, 1, 1, False), (1, 1, 1, True), (2, 2, 1, True), (2, 1, 2, False), (2, 1, 1, True)],
                         ids=["TP1-pairs", "TP1-shared", "TP2-shared", "PP2-pairs", "DP2-shared"])
def test_megatron_scores_equal_transformers(scored_model, tmp_path, world, tensor, pipeline, share):
    """Shared prompts on and off, at TP=1, TP=2, PP=2 and DP=2 (3 queries over 2 ranks: one rank
    repeats a query), two queries per chunk, two per microbatch."""
    _, ckpt, records, expected = scored_model
    cfg = scoring.ScoreConfig(checkpoint=str(ckpt), records=str(records), output=str(tmp_path / "m.jsonl"),
                              share_prompts=share, queries_per_microbatch=2, queries_per_chunk=2,
                              params_dtype="fp32", template=sami_jobs.TEMPLATE,
                              parallel=ParallelConfig(tensor=tensor, pipeline=pipeline))
    assert set(run_distributed(scoring.score, world, cfg, backend="gloo")) == {Path(cfg.output)}
    assert_equal_scores(read_rows(Path(cfg.output)), expected)
    assert not scoring.parts_dir(cfg.output).exists()


@pytest.mark.slow
def test_the_command_line_resumes_from_finished_chunks(scored_model, tmp_path):
    """A part left by an interrupted run is kept (its planted values come back) and the rest is
    scored; generation shards with an empty response are read as the MI evaluation reads them."""
    _, ckpt, records_file, expected = scored_model
    shards = tmp_path / "eval shards"
    shards.mkdir()
    rows = [json.loads(line) for line in records_file.read_text().splitlines()]
    write_rows(shards / "shard-00000.jsonl", rows[:2] + [record_row("empty", ["x", ""])])
    write_rows(shards / "shard-00001.jsonl", rows[2:])
    output = tmp_path / "out é" / "m.jsonl"
    train = TrainConfig(checkpoint="-", run_dir="-")
    train.precision.params_dtype = "fp32"
    args = scoring.score_args(train, ckpt, shards, output, queries_per_chunk=2) + [
        scoring.override_arg(f"template.{key}", value) for key, value in vars(sami_jobs.TEMPLATE).items()]
    cfg = composed(args)
    assert cfg.template == sami_jobs.TEMPLATE
    planted = [{"id": f"q{i}", "sum": [[-1.0, -2.0], [-3.0, -4.0]], "mean": [[-0.5, -1.0], [-1.5, -2.0]],
                "response_tokens": [2, 2]} for i in range(2)]
    scoring.chunks_to_score(cfg, scoring.read_scoring_records(shards)[0])
    write_rows(scoring.part_path(output, 0), planted)
    result = subprocess.run([sys.executable, "-m", "megatron_sami.cli.score", *args], capture_output=True, text=True,
                            timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    got = read_rows(output)
    assert got[:2] == planted and [row["id"] for row in got] == ["q0", "q1", "q2"]
    torch.testing.assert_close(torch.tensor(got[2]["sum"]), expected[2]["sum"], rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(torch.tensor(got[2]["mean"]), expected[2]["mean"], rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(torch.tensor(got[2]["mean"]) * torch.tensor(got[2]["response_tokens"]),
                               torch.tensor(got[2]["sum"]))
    assert not scoring.parts_dir(output).exists()


@pytest.mark.parametrize("share", [False, True])
@pytest.mark.parametrize("each", [False, True])
def test_microbatches_are_the_trainers_whole_blocks(share, each):
    """Whole C x C blocks per microbatch, lengths rounded to the multiple (per microbatch only
    with ``each``), every scored token kept; with ``share`` one row per constitution."""
    def item(used: int) -> dict[str, torch.Tensor]:
        mask = torch.zeros(C * C, used)
        mask[:, 3:used] = 1
        tokens = (torch.arange(used) % 7 + 1).expand(C * C, used).clone()  # the same prompt in every row
        return {"tokens": tokens, "labels": torch.ones(C * C, used, dtype=torch.long), "loss_mask": mask}

    items = [item(9), item(5), item(6)]
    micro = scoring.scoring_microbatches(items, 2, C, 4, share, each)
    assert len(micro) == 2
    assert [m["loss_mask"].shape[0] for m in micro] == [2 * C * C, C * C]
    assert sum(float(m["loss_mask"].sum()) for m in micro) == sum(float(i["loss_mask"].sum()) for i in items)
    widths = [m["tokens"].shape[1] for m in micro]
    assert all(w % 4 == 0 for w in widths) and (len(set(widths)) == 2) == each
    if share:
        assert [m["tokens"].shape[0] for m in micro] == [2 * C, C] and all("score_index" in m for m in micro)


@pytest.mark.parametrize("rank", ["0", "1"])
def test_a_bad_input_is_one_sentence_from_the_first_process_only(tmp_path, monkeypatch, capsys, rank):
    """The others wait for the launcher to end them (here: not at all), so the first is not killed
    before it prints."""
    from megatron_sami.cli import score as score_cli

    monkeypatch.setenv("RANK", rank)
    monkeypatch.setattr(score_cli, "FOLLOWER_WAIT_S", 0.0)
    cfg = scoring.ScoreConfig(checkpoint=str(tmp_path / "nope"), records=str(tmp_path / "r.jsonl"),
                              output=str(tmp_path / "m.jsonl"))
    with pytest.raises(SystemExit) as stop:
        score_cli._read_or_exit(cfg)
    lines = capsys.readouterr().err.splitlines()
    assert stop.value.code == 2
    if rank == "0":
        assert len(lines) == 1 and lines[0].startswith("error: ") and "is not a converted checkpoint" in lines[0]
    else:
        assert lines == []


@pytest.mark.parametrize("where", ["records", "inside-records", "checkpoint", "directory"])
def test_an_output_that_is_or_holds_an_input_is_refused_before_anything_is_written(tmp_path, where):
    """sami-score's output (and its .parts directory, removed when stale) must not replace an input."""
    records, checkpoint = tmp_path / "shards", tmp_path / "ckpt"
    records.mkdir()
    checkpoint.mkdir()
    (records / "shard-00000.jsonl").write_text("{}\n")
    output = {"records": records, "inside-records": records / "m.jsonl", "checkpoint": checkpoint / "m.jsonl",
              "directory": tmp_path}[where]
    cfg = scoring.ScoreConfig(checkpoint=str(checkpoint), records=str(records), output=str(output))
    with pytest.raises(SamiError, match="output"):
        scoring.read_scoring_data(cfg, world_size=1)
    assert sorted(p.name for p in records.iterdir()) == ["shard-00000.jsonl"]
    assert not list(tmp_path.rglob("*.parts"))


@pytest.mark.parametrize(("content", "message"), [
    (b'{"id": "q1"}\n\xff\n', "r.jsonl:2: byte 1 is not UTF-8"),
    (b'{"id": "q1", "query": "a"}\n{"id": "q1", "query": "b"}\n', "record ids q1 appear more than once"),
])
def test_unreadable_or_ambiguous_records_are_one_sentence(tmp_path, content, message):
    (tmp_path / "r.jsonl").write_bytes(content)
    with pytest.raises(DataError, match=message):
        scoring.read_scoring_records(tmp_path / "r.jsonl")


def test_a_tokenizer_beyond_the_models_vocabulary_is_one_sentence(scored_model, tmp_path):
    """Another model's tokenizer makes ids the embedding has no row for: refused before any process
    group starts, naming the tokenizer (it used to be an IndexError inside the first forward)."""
    from megatron_sami.testing.tiny import make_tiny_tokenizer

    _, ckpt, records, _ = scored_model
    make_tiny_tokenizer(tmp_path / "big tokenizer", vocab_size=4000)
    cfg = scoring.ScoreConfig(checkpoint=str(ckpt), records=str(records), output=str(tmp_path / "m.jsonl"),
                              tokenizer=str(tmp_path / "big tokenizer"), template=sami_jobs.TEMPLATE)
    with pytest.raises(DataError, match=r"big tokenizer produces token id \d+, beyond .*vocabulary of"):
        scoring.read_scoring_data(cfg, world_size=1)
    scoring.read_scoring_data(dataclasses.replace(cfg, tokenizer=None), world_size=1)  # its own tokenizer fits
