"""Expert-iteration data: constitutions and their sampling, query sources, filters, principle parsing."""

import itertools
import json
import random
from collections import Counter

import pytest

from megatron_sami.errors import ConfigError
from megatron_sami.rollout.constitutions import (
    SamplingConfig,
    all_sign_patterns,
    available_sets,
    evaluation_constitutions,
    load_constitution_set,
    sample_constitutions,
    validate_sampling,
)
from megatron_sami.rollout.filters import FilterConfig, filter_records
from megatron_sami.rollout.principles import Draft, accept, parse_drafts, to_constitution_yaml
from megatron_sami.rollout.queries import (
    QueryDataError,
    QuerySourceConfig,
    first_human_turn,
    load_queries,
    split_queries,
)


def write_set(path, principles):
    lines = ["name: custom", "task: dialogue", "principles:"]
    for p in principles:
        lines.append(f"  - name: {p['name']}")
        for key in ("definition", "antithesis", "split"):
            if key in p:
                lines.append(f"    {key}: \"{p[key]}\"")
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def three_principles(tmp_path):
    return load_constitution_set(write_set(tmp_path / "three.yaml", [
        {"name": n, "definition": f"Be {n}.", "antithesis": f"Be not {n}."} for n in ("a", "b", "c")]))


# -- constitutions --------------------------------------------------------------------------------

def test_shipped_sets_have_the_promised_shape():
    assert {"dialogue", "summarization", "diverse_summarization"} <= set(available_sets())
    dialogue, summary = load_constitution_set("dialogue"), load_constitution_set("summarization")
    assert [p.name for p in dialogue.principles] == ["helpful", "harmless"]
    assert [p.name for p in summary.principles] == ["concise", "comprehensive"]
    diverse = load_constitution_set("diverse_summarization")
    assert Counter(p.split for p in diverse.principles) == {"train": 15, "heldout": 5}
    for cset in (dialogue, summary, diverse):
        assert all(p.definition != p.antithesis for p in cset.principles)


def test_two_constitutions_are_the_positive_and_a_negation_of_one_or_both(tmp_path):
    cset = load_constitution_set("dialogue")
    seen_negatives = Counter()
    for seed in range(200):
        drawn = sample_constitutions(cset, SamplingConfig(num_constitutions=2), random.Random(seed)).constitutions
        assert len(drawn) == 2 and drawn[0].is_positive and not drawn[1].is_positive
        assert drawn[0].principles == drawn[1].principles  # same shuffled order in both
        by_name = {p.name: p for p in cset.principles}
        for number, (name, sign) in enumerate(zip(drawn[1].principles, drawn[1].signs, strict=True), start=1):
            assert f"{number}. {by_name[name].text(sign)}" in drawn[1].text.splitlines()
        seen_negatives[drawn[1].signs] += 1
    assert set(seen_negatives) == {(False, False), (True, False), (False, True)}  # all three negations occur
    orders = {sample_constitutions(cset, SamplingConfig(), random.Random(s)).constitutions[0].principles
              for s in range(50)}
    assert len(orders) == 2  # the principle order is shuffled


def test_sampling_is_reproducible_from_the_seed(tmp_path):
    cset = three_principles(tmp_path)
    cfg = SamplingConfig(num_constitutions=5)
    first = sample_constitutions(cset, cfg, random.Random(7)).texts()
    assert first == sample_constitutions(cset, cfg, random.Random(7)).texts()
    assert any(sample_constitutions(cset, cfg, random.Random(s)).texts() != first for s in range(8, 20))


def test_more_than_two_constitutions_are_distinct_flip_patterns(tmp_path):
    cset = three_principles(tmp_path)
    for seed in range(50):
        drawn = sample_constitutions(cset, SamplingConfig(num_constitutions=8), random.Random(seed)).constitutions
        assert drawn[0].is_positive and len({c.signs for c in drawn}) == 8  # every pattern exactly once


def test_c_larger_than_the_principles_allow_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="larger than the constitutions allow"):
        validate_sampling(load_constitution_set("dialogue"), SamplingConfig(num_constitutions=5))
    with pytest.raises(ConfigError, match="exceeds"):
        validate_sampling(load_constitution_set("dialogue"), SamplingConfig(principles_per_query=3))


def test_a_principle_without_antithesis_is_refused(tmp_path):
    path = write_set(tmp_path / "bad.yaml", [{"name": "kind", "definition": "Be kind."}])
    with pytest.raises(ConfigError, match="'kind' has no antithesis"):
        load_constitution_set(path)
    with pytest.raises(ConfigError, match="not found"):
        load_constitution_set("no-such-set")


def test_evaluation_uses_every_sign_pattern_with_the_positive_first():
    patterns = all_sign_patterns(2)
    assert patterns[0] == (True, True) and patterns[-1] == (False, False)
    assert set(patterns[1:3]) == {(True, False), (False, True)}
    cset = load_constitution_set("diverse_summarization")
    drawn = evaluation_constitutions(cset, SamplingConfig(num_constitutions=4, principles_per_query=2,
                                                          split="heldout"), random.Random(0)).constitutions
    heldout = {p.name for p in cset.principles if p.split == "heldout"}
    assert len(drawn) == 4 and drawn[0].is_positive and not any(drawn[-1].signs)
    assert set(drawn[0].principles) <= heldout


# -- queries --------------------------------------------------------------------------------------

def hh_row(human, assistant="Sure."):
    text = f"\n\nHuman: {human}\n\nAssistant: {assistant}\n\nHuman: and then?\n\nAssistant: done"
    return {"chosen": text, "rejected": text.replace(assistant, "No.")}


def test_hh_rlhf_first_human_turn_from_the_hub_layout(tmp_path):
    import gzip

    (tmp_path / "helpful-base").mkdir()
    rows = [hh_row(f"question {i}?") for i in range(5)]
    with gzip.open(tmp_path / "helpful-base" / "train.jsonl.gz", "wt") as handle:
        handle.writelines(json.dumps(r) + "\n" for r in rows)
    queries = load_queries(QuerySourceConfig(source="hh-rlhf", path=str(tmp_path), subset="helpful-base"))
    assert [q.text for q in queries] == [f"question {i}?" for i in range(5)]
    assert first_human_turn("\n\nHuman: hi there\n\nAssistant: hello") == "hi there"


def test_tldr_posts_are_deduplicated_by_id_and_parquet_works(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"info": {"id": f"t{i % 3}", "post": f"post {i % 3}", "title": "x", "subreddit": "r"},
             "summaries": [{"text": "a"}, {"text": "b"}], "choice": 0} for i in range(7)]
    (tmp_path / "tldr").mkdir()
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "tldr" / "train.parquet")
    queries = load_queries(QuerySourceConfig(source="tldr", path=str(tmp_path / "tldr")))
    assert [(q.id, q.text) for q in queries] == [("t0", "post 0"), ("t1", "post 1"), ("t2", "post 2")]


def test_local_jsonl_and_builtin_sets(tmp_path):
    path = tmp_path / "q.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"p{i}", "key": i}) + "\n" for i in range(4)))
    queries = load_queries(QuerySourceConfig(source="jsonl", path=str(path), field="prompt", id_field="key"))
    assert [(q.id, q.text) for q in queries] == [("0", "p0"), ("1", "p1"), ("2", "p2"), ("3", "p3")]
    with pytest.raises(QueryDataError, match="no 'question' column"):
        load_queries(QuerySourceConfig(source="jsonl", path=str(path), field="question"))
    builtin = load_queries(QuerySourceConfig(source="builtin", name="dialogue"))
    assert len(builtin) >= 64 and len({q.id for q in builtin}) == len(builtin)


def test_missing_or_unknown_sources_are_one_sentence(tmp_path):
    with pytest.raises(QueryDataError, match="does not exist"):
        load_queries(QuerySourceConfig(source="jsonl", path=str(tmp_path / "absent.jsonl")))
    with pytest.raises(QueryDataError, match="unknown built-in query set"):
        load_queries(QuerySourceConfig(source="builtin", name="nope"))
    with pytest.raises(ConfigError, match="unknown query source 'hub'"):
        QuerySourceConfig(source="hub")


def test_query_sets_per_iteration_are_disjoint_and_seeded(tmp_path):
    queries = load_queries(QuerySourceConfig(source="builtin", name="dialogue"))
    split = split_queries(queries, iterations=3, per_iteration=10, num_eval=8, seed=1)
    groups = [split.evaluation, *split.per_iteration]
    ids = [q.id for group in groups for q in group]
    assert [len(g) for g in groups] == [8, 10, 10, 10] and len(set(ids)) == len(ids)
    assert split == split_queries(queries, 3, 10, 8, seed=1)
    assert split != split_queries(queries, 3, 10, 8, seed=2)
    with pytest.raises(QueryDataError, match="distinct queries"):
        split_queries(queries, iterations=100, per_iteration=10, num_eval=0, seed=1)


# -- filters ----------------------------------------------------------------------------------------

def record(positive, negative, finished=(True, True)):
    return {"id": "x", "query": "q", "constitutions": ["c+", "c-"], "responses": [positive, negative],
            "metadata": {"finished": list(finished)}}


def test_filters_count_each_reason_once():
    cases = {
        "kept": record("Here is how.", "No."),
        "empty": record("Fine.", "  "),
        "truncated": record("Here is how", "No.", finished=(False, True)),
        "debris": record("Sure. [insert answer]", "No."),
        "no_sentence_end": record("Here is how", "No."),
        "identical": record("Same answer.", "Same answer."),
    }
    kept, counts = filter_records(list(cases.values()), FilterConfig())
    assert kept == [cases["kept"]]
    assert counts == {"input": 6, "empty": 1, "truncated": 1, "debris": 1, "no_sentence_end": 1, "identical": 1,
                      "kept": 1}
    assert filter_records([record('He said "stop."', "No")], FilterConfig())[1]["kept"] == 1  # closing quote
    relaxed = FilterConfig(require_sentence_end=False, drop_truncated=False)
    assert filter_records([cases["truncated"], cases["no_sentence_end"]], relaxed)[1]["kept"] == 2


# -- principle writer -------------------------------------------------------------------------------

def test_principle_drafts_are_parsed_validated_and_saved(tmp_path):
    text = (" The summary is brief.\nAntithesis: The summary rambles.\n\nPrinciple: The summary is brief.\n"
            "Antithesis: The summary is long.\nPrinciple: Same.\nAntithesis: same.\nPrinciple: The summary cites "
            "numbers.\nAntithesis: The summary drops numbers.\n")
    drafts = parse_drafts(text)
    assert drafts[0] == Draft("The summary is brief.", "The summary rambles.") and len(drafts) == 4
    kept, rejected = accept(drafts, existing=set())
    assert [d.definition for d in kept] == ["The summary is brief.", "The summary cites numbers."]
    assert rejected == {"duplicate": 1, "antithesis equals principle": 1}
    path = tmp_path / "mine.yaml"
    path.write_text(to_constitution_yaml("mine", "summarization", kept, heldout=1))
    cset = load_constitution_set(str(path))
    assert [p.split for p in cset.principles] == ["train", "heldout"]
    assert cset.principles[1].antithesis == "The summary drops numbers."


def test_all_flip_patterns_helper_matches_itertools():
    assert sorted(all_sign_patterns(3)) == sorted(itertools.product((True, False), repeat=3))


def test_vllm_gets_the_memory_share_and_length_and_bf16_for_auto(monkeypatch):
    """The engine must not take the whole GPU by default nor turn an fp32 config into fp16."""
    import sys
    import types

    from megatron_sami.rollout.generation import GenerationConfig, VLLMBackend

    seen = {}
    fake = types.ModuleType("vllm")
    fake.LLM = lambda **kwargs: seen.update(kwargs)
    fake.SamplingParams = lambda **kwargs: kwargs
    monkeypatch.setitem(sys.modules, "vllm", fake)
    VLLMBackend("/models/x", GenerationConfig(backend="hf", gpu_memory_utilization=0.5, max_model_len=2048))
    assert (seen["gpu_memory_utilization"], seen["max_model_len"], seen["dtype"]) == (0.5, 2048, "bfloat16")


# -- generation spread over nodes -----------------------------------------------------------------

def generation_job(root, model, backend="hf", temperature=1.0):
    """A job of two tasks (sampled training records, every-sign-pattern evaluation records) on
    5 queries in shards of 2: 3 shards per task, so 2 nodes get unequal shares."""
    from megatron_sami.alignment.data import PromptTemplate
    from megatron_sami.rollout.generation import GenerationConfig, GenerationJob, GenerationTask

    queries = root / "queries.jsonl"
    queries.write_text("".join(json.dumps({"id": f"q{i}", "text": f"How do I fix thing {i}?"}) + "\n"
                               for i in range(5)))
    generation = GenerationConfig(backend=backend, max_new_tokens=3, temperature=temperature, shard_size=2,
                                  batch_size=3, seed=11, stop=[])  # stop strings: slow in transformers
    tasks = [GenerationTask(str(root / "generated"), SamplingConfig(num_constitutions=2), "sample", 5),
             GenerationTask(str(root / "eval"), SamplingConfig(num_constitutions=4, principles_per_query=2),
                            "evaluation", 6)]
    return GenerationJob(str(model), str(queries), "dialogue", PromptTemplate(), generation, tasks)


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory):
    from megatron_sami.testing.tiny import make_tiny_hf_model, make_tiny_tokenizer

    directory = tmp_path_factory.mktemp("tiny-hf") / "hf"
    tokenizer = make_tiny_tokenizer(directory, vocab_size=300)
    make_tiny_hf_model("llama", directory, num_layers=1, vocab_size=len(tokenizer), max_position_embeddings=256)
    return directory


def shard_bytes(root):
    return {str(path.relative_to(root)): path.read_bytes() for path in sorted(root.rglob("shard-*.jsonl"))}


def test_records_are_byte_identical_at_any_node_count(tmp_path, tiny_hf, monkeypatch):
    """Node k of N writes the job's shards k, k + N, ...; sampled (temperature 1) records at N = 2 and 3 are
    the bytes N = 1 writes, each shard written once, by its node (written_by/)."""
    from megatron_sami.rollout import generation
    from megatron_sami.rollout.generation import assigned_shards, run_job, shard_writers, write_job

    assert [assigned_shards(4, node, 3) for node in range(3)] == [[0, 3], [1], [2]]
    assert [assigned_shards(1, node, 2, offset=1) for node in range(2)] == [[], [0]]  # a second one-shard set
    # One model for every node's engine (a shard's seeds are its own, whichever engine runs it).
    engine = generation.make_backend(tiny_hf, generation_job(tmp_path, tiny_hf).generation)
    monkeypatch.setattr(generation, "make_backend", lambda model, cfg: engine)
    reference = None
    for num_nodes in (1, 2, 3):
        root = tmp_path / f"nodes{num_nodes}"
        root.mkdir()
        job = generation_job(root, tiny_hf)
        write_job(root / "job.json", job)
        for node in range(num_nodes):
            assert job.missing_shards()  # the last node's share is still missing
            run_job(job, node, num_nodes)
        assert job.missing_shards() == [] and len(job.shards()) == 6
        written = {str(shard.relative_to(root)): json.loads((shard.parent / "written_by" / f"{shard.stem}.json")
                                                            .read_text())["node_index"] for shard in job.shards()}
        # One round robin over the whole job: the second set's shards continue where the first's ended.
        assert written == {f"{task}/shard-{i:05d}.jsonl": (first + i) % num_nodes
                           for first, task in ((0, "generated"), (3, "eval")) for i in range(3)}
        assert sum(shard_writers(job.shards()).values()) == 6
        records = shard_bytes(root)
        reference = reference or records
        assert records == reference


def test_the_generate_command_runs_its_share_and_stops_at_a_shard_boundary(tmp_path, monkeypatch):
    """Node index from srun's task id; a stop signal before a shard exits 75 with the written
    shards kept; a rerun writes only what is missing; a launch with another task count is refused."""
    import signal

    from megatron_sami.cli import generate
    from megatron_sami.rollout import generation
    from megatron_sami.rollout.generation import Completion, write_job

    shards_generated = []

    class Echo:
        def __init__(self):
            self.calls = 0

        def generate(self, prompts):
            self.calls += 1
            shards_generated.append(len(prompts))
            if len(shards_generated) == 1:  # a signal arrives while the first shard is generated
                signal.raise_signal(signal.SIGUSR1)
            return [Completion(f"echo {len(p)}", True, 2) for p in prompts]

    built = []
    monkeypatch.setattr(generation, "make_backend", lambda model, cfg: built.append(Echo()) or built[-1])
    job = generation_job(tmp_path, tmp_path / "no-model", temperature=0.0)
    write_job(tmp_path / "job.json", job)
    monkeypatch.setenv("SLURM_NTASKS", "2")
    monkeypatch.setenv("SLURM_PROCID", "1")
    handlers = {number: signal.getsignal(number) for number in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)}
    try:
        with pytest.raises(SystemExit) as stopped:
            generate.main([str(tmp_path / "job.json"), "--num-nodes", "2"])
        assert stopped.value.code == 75
        written = sorted(p.name for p in (tmp_path / "generated").glob("shard-*.jsonl"))
        assert written == ["shard-00001.jsonl"]  # node 1's share of the first task
        assert generate.main([str(tmp_path / "job.json"), "--num-nodes", "2"]) == 0
        # Node 1 wrote the job's shards 1, 3 and 5: the first set's shard 1, the second set's 0 and 2.
        assert [p.name for p in job.missing_shards()] == ["shard-00000.jsonl", "shard-00002.jsonl",
                                                          "shard-00001.jsonl"]
        assert generate.main([str(tmp_path / "job.json"), "--num-nodes", "2", "--node", "0"]) == 0
        assert job.missing_shards() == [] and built[-1].calls == 3 and len(shards_generated) == 6
        monkeypatch.setenv("SLURM_PROCID", "0")  # the first task prints the error (the others wait for srun)
        with pytest.raises(SystemExit) as refused:
            generate.main([str(tmp_path / "job.json"), "--num-nodes", "3"])
        assert refused.value.code == 2
    finally:
        for number, handler in handlers.items():
            signal.signal(number, handler)


def test_vllm_gets_tensor_parallel_and_one_engine_per_node_launch(monkeypatch):
    """The engine spans generation.tensor_parallel GPUs and is refused where the node's process
    sees fewer; the driver launches generation with one srun task per node holding the CPUs of
    the node's GPU tasks (one local process without srun)."""
    from megatron_sami.errors import EnvironmentSetupError
    from megatron_sami.iteration.driver import LauncherConfig
    from megatron_sami.rollout.generation import (
        GenerationConfig,
        check_engine_devices,
        vllm_engine_args,
        vllm_sampling_args,
    )

    cfg = GenerationConfig(backend="vllm", tensor_parallel=8, temperature=0.7, seed=3, max_new_tokens=350)
    assert vllm_engine_args("/m", cfg) == {"model": "/m", "tensor_parallel_size": 8, "dtype": "bfloat16", "seed": 3,
                                           "gpu_memory_utilization": 0.9, "max_model_len": None}
    assert vllm_sampling_args(cfg)["seed"] == 3 and vllm_sampling_args(cfg)["max_tokens"] == 350
    check_engine_devices(cfg, 8)
    with pytest.raises(EnvironmentSetupError, match="sees 4 GPU"):
        check_engine_devices(cfg, 4)
    check_engine_devices(GenerationConfig(backend="hf"), 0)

    monkeypatch.setenv("SLURM_RESTART_COUNT", "0")
    monkeypatch.delenv("SLURM_GPUS_PER_TASK", raising=False)
    launcher = LauncherConfig(prefix=["srun", "--nodes=4", "--ntasks-per-node=8", "--kill-on-bad-exit=1",
                                      "--cpus-per-task=12"], python="python3", log_dir="/run/logs")
    assert launcher.num_nodes() == 4
    assert launcher.node_command("megatron_sami.cli.generate", ["job.json"], "iter1/generate") == [
        "srun", "--nodes=4", "--ntasks-per-node=8", "--kill-on-bad-exit=1", "--cpus-per-task=12",
        "--ntasks-per-node=1", "--ntasks=4", "--cpus-per-task=96",
        "--output=/run/logs/iter1-generate-%j.0-rank%t.log", "--open-mode=append",
        "python3", "-m", "megatron_sami.cli.generate", "job.json"]
    # A site binding one GPU per task: the node's one generation task gets its 8 tasks' GPUs.
    monkeypatch.setenv("SLURM_GPUS_PER_TASK", "1")
    assert "--gpus-per-task=8" in launcher.node_command("megatron_sami.cli.generate", ["job.json"], "iter1/generate")
    bound = LauncherConfig(prefix=["srun", "--ntasks-per-node=4", "--gpus-per-task=2"])
    assert bound.node_command("m", ["a"], "p")[-5] == "--gpus-per-task=8"
    local = LauncherConfig(nproc_per_node=8)
    assert local.num_nodes() == 1
    assert local.node_command("m", ["a"], "p")[1:] == ["-m", "m", "a"]
