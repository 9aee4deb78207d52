"""Model catalogue values and layout validation (pure Python, milliseconds)."""

import pytest

from megatron_sami.errors import ConfigError, LayoutError
from megatron_sami.models.catalogue import load_model_config, model_names
from megatron_sami.models.config import PrecisionConfig, RopeScalingConfig
from megatron_sami.runtime.layout import ParallelConfig

# Parameter counts published with each checkpoint (HF model cards / safetensors metadata).
PUBLISHED_PARAMETERS = {
    "llama2-7b": 6_738_415_616,
    "llama3-8b": 8_030_261_248,
    "llama3-70b": 70_553_706_496,
    "llama3.1-8b": 8_030_261_248,
    "llama3.1-70b": 70_553_706_496,
    "mistral-7b": 7_241_732_096,
    "mixtral-8x7b": 46_702_792_704,
    "smollm2-135m": 134_515_008,
}


def test_catalogue_holds_every_model_the_users_named():
    assert set(PUBLISHED_PARAMETERS) | {"tiny-llama", "tiny-llama-tied", "tiny-mixtral"} <= set(model_names())


@pytest.mark.parametrize("name", sorted(PUBLISHED_PARAMETERS))
def test_catalogue_shapes_reproduce_published_parameter_counts(name):
    assert load_model_config(name).num_parameters() == PUBLISHED_PARAMETERS[name]


def test_llama31_carries_llama3_rope_scaling_and_llama3_does_not():
    assert load_model_config("llama3.1-70b").rope_scaling.type == "llama3"
    assert load_model_config("llama3.1-70b").rope_scaling.factor == 8.0
    assert load_model_config("llama3-70b").rope_scaling.type == "none"


def test_unrepresentable_llama3_rope_scaling_is_refused():
    with pytest.raises(ConfigError, match="low_freq_factor=1"):
        RopeScalingConfig(type="llama3", factor=8.0, low_freq_factor=2.0)


def test_unknown_model_and_unknown_key_name_the_fix():
    with pytest.raises(ConfigError, match="choose one of: .*llama3-8b"):
        load_model_config("llama-9000")
    with pytest.raises(ConfigError, match="model.num_layerz"):
        load_model_config("tiny-llama", num_layerz=2)


def test_padded_vocab_is_the_same_at_every_tp_size():
    assert load_model_config("tiny-llama").padded_vocab_size() == 256  # 250 up to a multiple of 16
    assert load_model_config("llama3-8b").padded_vocab_size() == 128256  # already 1002 x 128
    assert load_model_config("smollm2-135m").padded_vocab_size() == 49152  # 384 x 128, TP=3 divides it
    with pytest.raises(LayoutError, match="padded vocabulary"):
        ParallelConfig(tensor=3).validate(load_model_config("tiny-llama", num_attention_heads=6,
                                                             num_query_groups=3, hidden_size=96), 3)


@pytest.mark.parametrize(
    ("model", "layout", "world", "message"),
    [
        ("llama3-8b", dict(tensor=3), 3, "32 attention heads; use one of 1, 2, 4, 8, 16, 32"),
        ("smollm2-135m", dict(tensor=2), 2, "9 attention heads"),
        ("llama3-8b", dict(pipeline=3), 3, "32 layers"),
        ("mixtral-8x7b", dict(expert=3), 3, "8 experts"),
        ("llama3-8b", dict(expert=2), 2, "dense"),
        ("llama3-8b", dict(tensor=8), 12, "not divisible by TP x PP x CP"),
        ("mixtral-8x7b", dict(tensor=2, expert=4, sequence_parallel=True), 4, "EP x TP x PP"),
        ("mixtral-8x7b", dict(tensor=2, sequence_parallel=False), 2, "set parallel.sequence_parallel=true"),
    ],
)
def test_bad_layouts_fail_with_a_sentence_naming_the_fix(model, layout, world, message):
    with pytest.raises(LayoutError, match=message):
        ParallelConfig(**layout).validate(load_model_config(model), world)


def test_kv_heads_must_divide_or_be_divided_by_tp():
    # Megatron replicates KV heads when TP is a multiple of the KV groups (GQA with KV < TP).
    assert ParallelConfig(tensor=16).validate(load_model_config("llama3-8b"), 16) == 1
    odd = load_model_config("tiny-llama", num_attention_heads=12, num_query_groups=6, hidden_size=96)
    with pytest.raises(LayoutError, match="neither divides nor is a multiple of tiny-llama's 6 KV heads"):
        ParallelConfig(tensor=4).validate(odd, 4)


def test_good_layouts_give_the_data_parallel_size():
    assert ParallelConfig(tensor=8, pipeline=4).validate(load_model_config("llama3-70b"), 64) == 2
    assert ParallelConfig(pipeline=4, expert=8).validate(load_model_config("mixtral-8x7b"), 64) == 16
    assert ParallelConfig(tensor=3).validate(load_model_config("smollm2-135m"), 6) == 2


def test_sequence_constraints_of_sequence_and_context_parallelism():
    model = load_model_config("llama3-8b")
    with pytest.raises(LayoutError, match="divisible by TP=4"):
        ParallelConfig(tensor=4, sequence_parallel=True).validate(model, 4, seq_length=1022)
    with pytest.raises(LayoutError, match="2 x CP"):
        ParallelConfig(context=2).validate(model, 2, seq_length=1022)
    with pytest.raises(LayoutError, match="needs parallel.tensor > 1"):
        ParallelConfig(sequence_parallel=True)


def test_sequence_parallelism_is_on_by_default_wherever_tp_is_above_one():
    """Issue 15 item 10 (off everywhere before): the SAMI step keeps its response-only output layer
    under SP, so nothing is lost by turning it on; an explicit false still wins."""
    assert ParallelConfig().sequence_parallel is False
    assert ParallelConfig(pipeline=4, expert=8).sequence_parallel is False
    assert ParallelConfig(tensor=8, pipeline=4).sequence_parallel is True
    assert ParallelConfig(tensor=2, sequence_parallel=False).sequence_parallel is False
    assert ParallelConfig(tensor=2).validate(load_model_config("tiny-mixtral"), 2) == 1  # MoE under TP needs SP


def test_precision_values_are_checked():
    with pytest.raises(ConfigError, match="use bf16"):
        PrecisionConfig(params_dtype="fp16")
    with pytest.raises(ConfigError, match="e4m3"):
        PrecisionConfig(fp8="e5m2")


def test_fp8_without_a_hopper_gpu_is_a_config_time_error():
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU; the CPU refusal is what is tested here")
    with pytest.raises(ConfigError, match="fp8"):
        PrecisionConfig(fp8="e4m3").check_hardware()
