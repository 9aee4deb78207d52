"""The per-process device budget (``SAMI_DEVICE_BUDGET_PARAMS``, megatron_sami/device_budget.py):
every Megatron build and whole-model HF load refuses to materialise more parameters than it allows.

The fast tests read the setting, count parameters from configs and load HF models; the slow one
builds the real ``GPTModel`` at TP=1, TP=2, PP=2 (also tied) and EP=2 and checks that the count
taken before the build is exactly what is built, and that one parameter over the budget is
refused before anything is allocated.
"""

from __future__ import annotations

import json
import os

import pytest

from megatron_sami.device_budget import BUDGET_ENV, check_device_budget, check_hf_model, device_budget
from megatron_sami.errors import ConfigError, DeviceBudgetError
from megatron_sami.models.build import process_parameters
from megatron_sami.models.catalogue import load_model_config
from megatron_sami.runtime.layout import ParallelConfig

# tiny-llama: h 64, f 160, 4 heads of 16, 2 KV groups, 4 layers, vocabulary 250 padded to 256, untied
# (tiny-llama-tied: the same with 2 layers and tied embeddings).
# A layer: attention 64 x 16 x (8 + 4) = 12,288, MLP 3 x 64 x 160 = 30,720, two norms 128.
LAYER, EMBEDDING, NORM = 12_288 + 30_720 + 128, 256 * 64, 64
TP2_LAYER = (12_288 + 30_720) // 2 + 128
# tiny-mixtral: h 64, f 96, 4 experts, 2 layers: attention 12,288, each expert 3 x 64 x 96 = 18,432,
# the router 4 x 64 = 256, two norms.
MOE_LAYER_EP2 = 12_288 + 2 * 18_432 + 256 + 128
WHOLE_TINY_LLAMA = 4 * LAYER + 2 * EMBEDDING + NORM

COUNTS = [  # model, (TP, PP, EP), (first stage, last stage), parameters on that rank
    ("tiny-llama", (1, 1, 1), (True, True), WHOLE_TINY_LLAMA),
    ("tiny-llama", (2, 1, 1), (True, True), 4 * TP2_LAYER + EMBEDDING + NORM),
    ("tiny-llama", (1, 2, 1), (True, False), 2 * LAYER + EMBEDDING),
    ("tiny-llama", (1, 2, 1), (False, True), 2 * LAYER + EMBEDDING + NORM),
    ("tiny-llama-tied", (1, 1, 1), (True, True), 2 * LAYER + EMBEDDING + NORM),  # 2 layers, one embedding
    ("tiny-llama-tied", (1, 2, 1), (False, True), LAYER + EMBEDDING + NORM),  # the last stage's copy
    ("tiny-mixtral", (1, 1, 2), (True, True), 2 * MOE_LAYER_EP2 + 2 * EMBEDDING + NORM),
]


@pytest.mark.parametrize(("name", "layout", "stages", "expected"), COUNTS,
                         ids=[f"{n}-TP{t}PP{p}EP{e}-{'first' if f else ''}{'last' if la else ''}"
                              for n, (t, p, e), (f, la), _ in COUNTS])
def test_process_parameters_counts_this_ranks_share(name, layout, stages, expected):
    tensor, pipeline, expert = layout
    parallel = ParallelConfig(tensor=tensor, pipeline=pipeline, expert=expert)
    assert process_parameters(load_model_config(name), parallel, *stages) == expected


@pytest.mark.parametrize(("value", "budget"), [(None, None), ("", None), ("150000", 150_000), ("1.5e5", 150_000),
                                               ("1_000", 1000), (" 7e10 ", 70_000_000_000)])
def test_budget_reads_the_environment(monkeypatch, value, budget):
    monkeypatch.delenv(BUDGET_ENV, raising=False)
    if value is not None:
        monkeypatch.setenv(BUDGET_ENV, value)
    assert device_budget() == budget


@pytest.mark.parametrize("value", ["0", "-5", "0.5", "many", "nan", "inf"])
def test_a_budget_that_is_not_a_count_is_refused_with_the_fix(monkeypatch, value):
    monkeypatch.setenv(BUDGET_ENV, value)
    with pytest.raises(ConfigError, match=f"{BUDGET_ENV}=.*positive number"):
        device_budget()


@pytest.mark.parametrize(("budget", "num_params", "refused"), [
    (None, 10**12, False), ("100", 100, False), ("100", 101, True), ("1e9", 10**9 + 1, True)])
def test_check_refuses_only_above_the_budget(monkeypatch, budget, num_params, refused):
    monkeypatch.delenv(BUDGET_ENV, raising=False)
    if budget is not None:
        monkeypatch.setenv(BUDGET_ENV, budget)
    if not refused:
        check_device_budget(num_params, "this", "fix it")
        return
    with pytest.raises(DeviceBudgetError) as refusal:
        check_device_budget(num_params, "rank 0's part", "set parallel.tensor=2")
    message = str(refusal.value)
    assert f"{num_params:,} parameters" in message and f"budget of {device_budget():,}" in message
    assert BUDGET_ENV in message and message.endswith("set parallel.tensor=2.") and message.count(". ") == 0


@pytest.fixture(scope="module")
def hf_model(tmp_path_factory):
    from megatron_sami.testing.tiny import make_tiny_hf_model, make_tiny_tokenizer

    directory = tmp_path_factory.mktemp("hf") / "tiny"
    tokenizer = make_tiny_tokenizer(directory)
    return make_tiny_hf_model("llama", directory, vocab_size=len(tokenizer))


def hf_parameters(model_dir) -> int:
    from transformers import AutoModelForCausalLM

    return sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(str(model_dir)).parameters())


@pytest.mark.parametrize("over", [False, True], ids=["at-budget", "over-budget"])
def test_whole_model_hf_loads_check_the_budget(monkeypatch, hf_model, over):
    """MI scoring with transformers (the old single-process scorer) and verify's reference."""
    from megatron_sami.alignment.data import load_template
    from megatron_sami.conversion.verify import hf_reference
    from megatron_sami.evaluation.mi import hf_matrices

    total = hf_parameters(hf_model)
    monkeypatch.setenv(BUDGET_ENV, str(total - 1 if over else total))
    if not over:
        check_hf_model(hf_model, "the model", "no fix needed")
        assert hf_matrices(hf_model, [], load_template("dialogue")) == []
        return
    with pytest.raises(DeviceBudgetError, match=f"{total:,} parameters.*evaluation.scorer=megatron"):
        hf_matrices(hf_model, [], load_template("dialogue"))
    with pytest.raises(DeviceBudgetError, match="verify's transformers reference"):
        hf_reference(hf_model, None, 0, None)


# -- the real build, as one rank of a multi-process job ------------------------------------------------
def build_under_budget(name: str, tensor: int, pipeline: int, expert: int) -> tuple[int, int, str]:
    """(counted before the build, built, the refusal one parameter below) on this rank."""
    import megatron.core.models.gpt as gpt_module
    import torch

    from megatron_sami.models.build import build_gpt_model
    from megatron_sami.models.config import PrecisionConfig
    from megatron_sami.runtime.distributed import megatron_runtime

    model, parallel = load_model_config(name), ParallelConfig(tensor=tensor, pipeline=pipeline, expert=expert)
    precision = PrecisionConfig(params_dtype="fp32")
    with megatron_runtime(parallel, backend="gloo"):
        from megatron.core import parallel_state

        counted = process_parameters(model, parallel, parallel_state.is_pipeline_first_stage(),
                                     parallel_state.is_pipeline_last_stage())
        os.environ[BUDGET_ENV] = str(counted - 1)
        real_gpt = gpt_module.GPTModel
        gpt_module.GPTModel = None  # reaching the constructor would fail with a TypeError, not the budget
        try:
            build_gpt_model(model, parallel, precision, seq_length=32)
            refusal = "built"
        except DeviceBudgetError as err:
            refusal = str(err)
        finally:
            gpt_module.GPTModel = real_gpt
        with torch.device("meta"):  # a meta build allocates nothing: not checked
            build_gpt_model(model, parallel, precision, seq_length=32, initialize_weights=False)
        os.environ[BUDGET_ENV] = str(counted)
        built = sum(p.numel() for p in build_gpt_model(model, parallel, precision, seq_length=32).parameters())
    return counted, built, refusal


LAYOUTS = [("tiny-llama", 1, 1, 1, 1), ("tiny-llama", 2, 1, 1, 2), ("tiny-llama", 1, 2, 1, 2),
           ("tiny-llama-tied", 1, 2, 1, 2), ("tiny-mixtral", 1, 1, 2, 2)]


@pytest.mark.slow
@pytest.mark.parametrize(("name", "tensor", "pipeline", "expert", "world"), LAYOUTS,
                         ids=[f"{n}-TP{t}PP{p}EP{e}" for n, t, p, e, _ in LAYOUTS])
def test_build_refuses_one_parameter_over_the_budget_before_allocating(name, tensor, pipeline, expert, world):
    from megatron_sami.testing.multiprocess import run_distributed

    for rank, (counted, built, refusal) in enumerate(
            run_distributed(build_under_budget, world, name, tensor, pipeline, expert, backend="gloo")):
        assert counted == built, (rank, counted, built)
        assert f"{counted:,} parameters in one process, more than the device budget of {counted - 1:,}" in refusal
        assert f"at TP={tensor}, PP={pipeline}, EP={expert}" in refusal and f"parallel.tensor={2 * tensor}" in refusal


# -- where each launched command of sami-iterate ran (summary.json's "layouts") ----------------------
@pytest.mark.parametrize(("launcher", "processes"), [
    (["launcher.prefix=['srun','--nodes=2','--ntasks-per-node=4']"], 8), (["launcher.nproc_per_node=3"], 3),
    (["launcher.prefix=['mpirun','-n','4']"], None)], ids=["srun", "torchrun", "other"])
def test_the_driver_records_the_layout_and_processes_of_each_launched_command(tmp_path, launcher, processes):
    from test_driver_rules import hf_dir, open_run

    run = open_run(tmp_path / "run", hf_dir(tmp_path / "hf"), "train.parallel.pipeline=2", *launcher)
    megatron = {"processes": processes, "layout": {"tensor": 1, "pipeline": 2, "expert": 1, "context": 1}}
    assert run.placement(distributed=True, per_node=False) == megatron
    assert run.placement(distributed=False, per_node=False) == {"processes": 1, "layout": None}
    run.dir.mkdir()
    run.launch("prepare", "this", [], distributed=False)  # python -m this: a quick launched command
    run.record("prepare", {"seconds": 1.0} | run.measures("prepare"))
    assert json.loads((run.dir / "summary.json").read_text())["layouts"] == {
        "prepare": {"this": {"processes": 1, "layout": None}}}
