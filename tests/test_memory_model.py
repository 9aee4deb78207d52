"""The memory model (megatron_sami/models/memory.py) against published figures and against values
computed by hand for the three GPU templates (their recipes and layouts)."""

import re

import pytest

from megatron_sami.models import memory
from megatron_sami.models.catalogue import model_config_from_dict
from megatron_sami.resources import config_dir


def catalogue(name: str):
    import yaml

    return model_config_from_dict(yaml.safe_load((config_dir() / "model" / f"{name}.yaml").read_text()))


@pytest.mark.parametrize(("dtype", "optimizer", "distributed", "dp", "grad_bytes", "total"), [
    # Megatron-LM's distributed-optimizer notes: bf16 params + fp32 grads: 18 bytes/param, 6 + 12/d
    # distributed; fp32 params + fp32 grads: 16, 8 + 8/d.
    ("bf16", "adam", False, 1, 4, 18), ("bf16", "adam", True, 8, 4, 6 + 12 / 8),
    ("fp32", "adam", False, 1, 4, 16), ("fp32", "adam", True, 4, 4, 8 + 8 / 4),
    # ZeRO (Rajbhandari et al. 2020): mixed-precision Adam is 2 + 2 + K, K = 12: 16 bytes/param.
    ("fp16", "adam", False, 1, 2, 16), ("bf16", "adam", True, 64, 2, 4 + 12 / 64),
    # RMSprop: fp32 master copy + square average (the Llama recipes); SGD: the master copy.
    ("bf16", "rmsprop", False, 1, 4, 2 + 4 + 8), ("bf16", "sgd", False, 1, 4, 2 + 4 + 4),
])
def test_bytes_per_parameter_match_the_published_counts(dtype, optimizer, distributed, dp, grad_bytes, total):
    assert sum(memory.bytes_per_parameter(dtype, optimizer, distributed, dp, grad_bytes=grad_bytes)) == total


GPT3 = dict(s=2048, b=1, h=12288, a=96)  # GPT-3 175B (Korthikanti et al. 2022, Table 3)


def test_korthikanti_activation_formulas_for_gpt3():
    sbh = 2048 * 12288
    # "for GPT-3, 5as/h = 80": the attention scores dominate the 34 of the rest.
    assert 5 * GPT3["a"] * GPT3["s"] / GPT3["h"] == 80
    assert memory.korthikanti_layer_bytes(**GPT3) == sbh * (34 + 80)
    assert memory.korthikanti_layer_bytes(**GPT3, tensor=8) == sbh * (10 + 24 / 8 + 80 / 8)
    assert memory.korthikanti_layer_bytes(**GPT3, tensor=8, sequence_parallel=True) == sbh * (34 + 80) / 8
    assert memory.korthikanti_layer_bytes(**GPT3, tensor=8, recompute="full") == 2 * sbh
    assert memory.korthikanti_layer_bytes(**GPT3, tensor=8, sequence_parallel=True, recompute="full") == 2 * sbh / 8


@pytest.mark.parametrize(("tensor", "sp"), [(1, False), (8, False), (8, True)])
def test_the_adapted_formula_is_the_papers_without_dropout_for_a_gpt_sized_swiglu(tensor, sp):
    """Multi-head attention (g = a) and a SwiGLU of f = 8h/3 (the width that keeps 6f/h = 16, the
    GeLU MLP's 16 sbh): the adapted layer is the paper's minus its dropout (two sbh masks and the
    3as^2b of attention dropout), with the s x s softmax kept (attention_scores=True)."""
    from types import SimpleNamespace

    s, h, a = GPT3["s"], GPT3["h"], GPT3["a"]
    model = SimpleNamespace(hidden_size=h, num_attention_heads=a, num_query_groups=a, ffn_hidden_size=8 * h // 3,
                            is_moe=False, moe_router_topk=1)
    setup = memory.TrainingSetup(seq_length=s, microbatch_sequences=1, attention_scores=True)
    layout = memory.Layout(tensor=tensor, sequence_parallel=sp)
    sbh = s * h
    dropout = sbh * (2 + 3 * a * s / h) / (tensor if sp else 1)
    if tensor > 1 and not sp:  # the paper splits the attention dropout over TP, not the two masks
        dropout = sbh * (2 + 3 * a * s / (h * tensor))
    paper = memory.korthikanti_layer_bytes(s, 1, h, a, tensor, sp)
    assert memory.layer_activation_bytes(model, layout, setup) == pytest.approx(paper - dropout)


def test_llama3_70b_template_by_hand():
    """slurm/sami_70b.sh: TP 8 x PP 4 on 32 GPUs; recipe llama3-70b: RMSprop, no distributed
    optimizer, recomputation, bf16; iterate.yaml: 1024 tokens; C = 2, one query: 4 sequences."""
    model = catalogue("llama3-70b")
    layout = memory.Layout(tensor=8, pipeline=4, data=1)
    setup = memory.TrainingSetup(optimizer="rmsprop", distributed_optimizer=False, recompute="full", seq_length=1024,
                                 microbatch_sequences=4, num_microbatches=128)
    layer = (8192 * 128 * (2 * 64 + 2 * 8) + 3 * 8192 * 28672) // 8 + 2 * 8192  # attention + MLP over TP, norms
    params = 20 * layer + 128256 * 8192 // 8 + 8192  # 20 layers; last stage: output layer + final norm
    assert params == 2_270_765_056
    sbh = 1024 * 4 * 8192
    full_layer = sbh * (8 + (4 + 4 * 8 / 64 + 6 * 28672 / 8192) / 8)  # recomputed one at a time
    activations = 20 * 4 * 2 * sbh + full_layer  # PP 4 microbatches in flight on the first stage
    train = memory.training_memory(model, layout, setup, 80)
    assert (train.weights, train.gradients, train.optimizer) == (2 * params, 4 * params, 8 * params)
    assert train.activations == pytest.approx(activations)
    assert train.total / memory.GIB == pytest.approx(34.957, abs=1e-3) and train.fits
    engine = memory.generation_memory(model, memory.GenerationSetup(8, 0.9, 1024), 80)
    assert engine.weights == 2 * 70_553_706_496 / 8
    assert engine.activations == 2 * 80 * 1 * 128 * 2 * 1024  # K and V, one KV head per GPU, bf16, 1024 tokens
    assert not memory.training_memory(model, memory.Layout(tensor=8, data=4), setup, 80).fits  # PP 1


def test_mixtral_8x7b_template_by_hand():
    """slurm/sami_mixtral.sh: PP 4 x EP 8 on 32 GPUs (DP 8, expert DP 1); recipe: RMSprop, recomputation."""
    model = catalogue("mixtral-8x7b")
    layout = memory.Layout(pipeline=4, expert=8, data=8)
    setup = memory.TrainingSetup(optimizer="rmsprop", distributed_optimizer=False, recompute="full", seq_length=1024,
                                 microbatch_sequences=4, num_microbatches=16)
    dense = 8 * (4096 * 128 * (64 + 16) + 2 * 4096 + 4096 * 8) + 32000 * 4096 + 4096  # + router; last stage
    experts = 8 * (8 * 3 * 4096 * 14336 // 8)  # one of 8 experts per GPU in each of 8 layers
    train = memory.training_memory(model, layout, setup, 80)
    assert train.weights == 2 * (dense + experts) and train.optimizer == 8 * (dense + experts)
    sbh = 1024 * 4 * 4096
    full_layer = sbh * (4 + 2 + 2 * 2 + 4 + 4 * 8 / 32 + 2 * 6 * 14336 / 4096)  # top-2: MLP and input twice
    assert train.activations == pytest.approx(8 * 4 * 2 * sbh + full_layer)
    assert train.total / memory.GIB == pytest.approx(26.354, abs=1e-3) and train.fits


def test_mistral_7b_template_by_hand():
    """slurm/sami_mistral7b.sh: TP 4 x DP 2 on 8 GPUs; recipe: AdamW + distributed optimizer, no recomputation."""
    model = catalogue("mistral-7b")
    layout = memory.Layout(tensor=4, data=2)
    setup = memory.TrainingSetup(optimizer="adam", distributed_optimizer=True, seq_length=1024,
                                 microbatch_sequences=4, num_microbatches=64)
    params = 32 * ((4096 * 128 * 80 + 3 * 4096 * 14336) // 4 + 2 * 4096) + 2 * 32000 * 4096 // 4 + 4096
    train = memory.training_memory(model, layout, setup, 80)
    assert (train.weights, train.gradients, train.optimizer) == (2 * params, 4 * params, 12 / 2 * params)
    sbh = 1024 * 4 * 4096
    logits = 6 * 1024 * 4 * 32000 / 4
    assert train.activations == pytest.approx(32 * sbh * (8 + (4 + 1 + 21) / 4) + logits)
    assert train.total / memory.GIB == pytest.approx(27.668, abs=1e-3) and train.fits
    # at 4096 tokens without TP, training does not fit 80 GB; recomputation or TP 4 would
    long = memory.TrainingSetup(optimizer="adam", seq_length=4096, microbatch_sequences=4)
    assert not memory.training_memory(model, memory.Layout(data=8), long, 80).fits
    assert memory.training_fixes(model, memory.Layout(data=8), long, 80)[0] == "train.recompute_activations=full"


def test_a_vllm_engine_too_large_for_its_gpu_share_does_not_fit():
    model = catalogue("llama3-70b")
    assert not memory.generation_memory(model, memory.GenerationSetup(1, 0.9, 1024), 80).fits
    assert memory.generation_memory(model, memory.GenerationSetup(4, 0.9, 1024), 80).fits


# --- sami-check-config: the estimate is of the run's settings, refusals name exact overrides -------

def check(*overrides: str):
    """Compose ``sami-check-config`` with ``overrides`` (in process) and return its config; the
    memory model's inputs are ``check_config.setups`` of it (Hydra stays initialised inside)."""
    from hydra import compose

    from megatron_sami.cli import check_config
    from megatron_sami.cli.schemas import defaults_tree, register_iterate_schema, register_schema

    register_schema("check_config_schema", defaults_tree(check_config.CheckConfig))
    register_iterate_schema()
    return compose(config_name="check_config", overrides=list(overrides))


@pytest.fixture
def hydra_configs():
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        yield


def run_inputs(*overrides: str):
    """(layout, training setup, generation, scoring) that sami-check-config estimates for ``overrides``."""
    from megatron_sami.cli import check_config
    from megatron_sami.runtime.layout import ParallelConfig
    from megatron_sami.typed_config import to_typed

    cfg = check(*overrides)
    model = model_config_from_dict(cfg.model)
    parallel = to_typed(ParallelConfig, cfg.parallel, "parallel")
    return check_config.setups(cfg, model, parallel, parallel.data_parallel_size(int(cfg.world_size)))


@pytest.mark.parametrize(("overrides", "dtype", "seq_length"), [
    (["iterate.recipe=tiny-llama"], "fp32", 256),  # the recipe's own settings
    (["precision.params_dtype=fp32"], "fp32", 1024),  # top-level precision: was ignored (bf16)
    (["seq_length=2048"], "bf16", 2048),  # top-level length: was ignored (iterate.yaml's 1024)
    (["iterate.recipe=tiny-llama", "precision.params_dtype=bf16", "seq_length=128"], "bf16", 128),
    (["precision.params_dtype=fp32", "iterate.overrides=['train.precision.params_dtype=fp32']"], "fp32", 1024),
], ids=["recipe", "precision", "seq_length", "both-over-recipe", "same-in-overrides"])
def test_the_estimate_uses_the_precision_and_length_the_run_will_use(hydra_configs, overrides, dtype, seq_length):
    _, setup, _, _ = run_inputs("model=llama3-8b", "world_size=1", *overrides)
    assert (setup.params_dtype, setup.seq_length) == (dtype, seq_length)


@pytest.mark.parametrize(("overrides", "error"), [
    (["precision.params_dtype=fp32", "iterate.overrides=['train.precision.params_dtype=bf16']"],
     "params_dtype=fp32 but iterate.overrides sets train.precision.params_dtype=bf16; give the setting once"),
    # the layout is checked at the run's length (1020 tokens), not at a default of its own
    (["parallel.tensor=8", "parallel.sequence_parallel=true", "iterate.overrides=['train.data.seq_length=1020']"],
     "sequence length 1020 must be divisible by TP=8"),
])
def test_check_config_refuses_settings_that_contradict_the_run(hydra_configs, capsys, overrides, error):
    from megatron_sami.cli import check_config
    from megatron_sami.errors import SamiError

    with pytest.raises(SamiError, match=re.escape(error)):
        check_config.describe(check("model=llama3-8b", *overrides))


LLAMA_70B_TEMPLATE = ["model=llama3-70b", "world_size=32", "parallel.tensor=8", "parallel.pipeline=4",
                      "iterate.recipe=llama3-70b"]


@pytest.mark.parametrize(("overrides", "fix"), [
    # the recipe (no recompute) on 40 GiB: full recomputation, as the sami-iterate override
    ([*LLAMA_70B_TEMPLATE, "gpu_memory_gb=40"], "it fits with train.recompute_activations=full."),
    # DP = 1 (TP 8 x PP 4 on 32 GPUs) already recomputing: only more GPUs help, named exactly
    ([*LLAMA_70B_TEMPLATE, "gpu_memory_gb=30", "iterate.overrides=['train.recompute_activations=full']"],
     "it fits with train.parallel.pipeline=8 on 64 GPUs or with train.parallel.tensor=16 on 64 GPUs."),
    # DP = 8: a larger TP taken from DP, as the sami-iterate override (not "TP 8")
    (["model=mistral-7b", "world_size=8", "iterate.recipe=mistral-7b", "gpu_memory_gb=40",
      "iterate.overrides=['train.data.seq_length=4096','train.queries_per_step=8']"],
     "it fits with train.parallel.tensor=8."),
], ids=["recompute", "dp1-more-gpus", "dp8-tensor"])
def test_a_refusal_names_the_exact_overrides_that_fit(hydra_configs, capsys, overrides, fix):
    from megatron_sami.cli import check_config
    from megatron_sami.errors import ConfigError

    with pytest.raises(ConfigError) as refused:
        check_config.describe(check(*overrides))
    assert str(refused.value).startswith("train needs ") and str(refused.value).endswith(fix)


@pytest.mark.parametrize(("overrides", "sequences"), [
    ([], 16),  # evaluation.principles_per_query 2: C = 4, 4 x 4 sequences per query (training: C = 2, 4)
    (["iterate.overrides=['evaluation.principles_per_query=3']"], 64),
    (["iterate.overrides=['evaluation.principles_per_query=3','train.queries_per_microbatch=2']"], 128),
    (["iterate.overrides=['evaluation.enabled=false']"], None),
])
def test_the_scoring_row_has_the_evaluations_shape(hydra_configs, overrides, sequences):
    _, setup, _, scoring = run_inputs(*LLAMA_70B_TEMPLATE, *overrides)
    assert setup.microbatch_sequences == 4 * (2 if "train.queries_per_microbatch=2" in str(overrides) else 1)
    assert (scoring and scoring.microbatch_sequences) == sequences


def test_scoring_with_hf_puts_the_whole_fp32_model_on_one_gpu_and_is_refused_with_the_fix(hydra_configs, capsys):
    from megatron_sami.cli import check_config
    from megatron_sami.errors import ConfigError

    with pytest.raises(ConfigError, match="score needs 26.*set evaluation.scorer=megatron"):
        check_config.describe(check(*LLAMA_70B_TEMPLATE, "gpu_memory_gb=141",
                                    "iterate.overrides=['evaluation.scorer=hf']"))


def test_at_dp1_the_distributed_optimizer_shards_nothing():
    model = catalogue("llama3-8b")
    plain = memory.TrainingSetup(optimizer="adam", distributed_optimizer=False)
    sharded = memory.TrainingSetup(optimizer="adam", distributed_optimizer=True)
    one = memory.training_memory(model, memory.Layout(tensor=8), sharded, 80)
    assert one.optimizer == memory.training_memory(model, memory.Layout(tensor=8), plain, 80).optimizer
    assert "distributed" not in one.note
    assert "distributed adam" in memory.training_memory(model, memory.Layout(tensor=4, data=2), sharded, 80).note


# --- the GPU recipes recompute no more than their documented hardware needs -----------------------

ROOT = config_dir().parent


def template_layout(template: str) -> tuple[str, list[str]]:
    """(recipe, sami-check-config overrides) of a Slurm template at its default allocation; the
    launcher's default GPU memory (80 GiB: H100) is the documented hardware."""
    text = (ROOT / "slurm" / template).read_text()
    value = dict(re.findall(r'"\$\{(SAMI_\w+):?=([\w.-]+)\}"', text))
    world = int(re.search(r"#SBATCH --nodes=(\d+)", text)[1]) * int(re.search(r"#SBATCH --ntasks-per-node=(\d+)", text)[1])
    return value["SAMI_RECIPE"], [f"model={value['SAMI_MODEL']}", f"world_size={world}",
                                  f"parallel.tensor={value['SAMI_TP']}", f"parallel.pipeline={value['SAMI_PP']}",
                                  f"parallel.expert={value['SAMI_EP']}", f"iterate.recipe={value['SAMI_RECIPE']}",
                                  "gpu_memory_gb=80"]


@pytest.mark.parametrize("template", ["sami_70b.sh", "sami_mixtral.sh", "sami_mistral7b.sh"])
def test_each_gpu_recipe_recomputes_only_as_much_as_its_hardware_needs(hydra_configs, template):
    """The recipe's recompute_activations fits its template's layout on 80 GiB, and no cheaper
    mode does (none < selective < full in compute)."""
    _, overrides = template_layout(template)
    cfg = check(*overrides)
    model = model_config_from_dict(cfg.model)
    layout, setup, _, _ = run_inputs(*overrides)
    assert memory.training_memory(model, layout, setup, 80).fits
    assert setup.recompute == memory.cheapest_recompute(model, layout, setup, 80)
