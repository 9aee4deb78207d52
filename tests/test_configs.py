"""One source of truth for defaults: the dataclasses hold them, the YAML files state only what differs,
sami-iterate passes to sami-train only what was set, and every recipe resolves and says how to launch it."""

import re
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from megatron_sami.alignment.schedule import LRSchedule
from megatron_sami.alignment.trainer import TrainConfig
from megatron_sami.cli.check_config import CheckConfig
from megatron_sami.cli.iterate import iterate_config
from megatron_sami.cli.schemas import defaults_tree, register_iterate_schema, register_train_schema
from megatron_sami.errors import ConfigError
from megatron_sami.iteration import driver
from megatron_sami.iteration.driver import IterateConfig, Run, flatten, train_settings
from megatron_sami.resources import config_dir
from megatron_sami.training.engine import OptimizerSettings
from megatron_sami.typed_config import to_typed

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted(path.stem for path in (config_dir() / "recipe").glob("*.yaml"))


def stated(name: str) -> dict:
    """The values a YAML file in configs/ states itself (its defaults list and Hydra settings aside)."""
    values = OmegaConf.to_container(OmegaConf.load(config_dir() / name))
    return {key: value for key, value in values.items() if key not in ("defaults", "hydra")}


def restated(values: dict, defaults: dict) -> list[str]:
    """The keys of ``values`` that ``defaults`` (flat) lacks or that restate their default."""
    return [f"{key}: {value!r} (unknown key)" if key not in defaults else f"{key}: {value!r} (the default)"
            for key, value in flatten(values).items() if key not in defaults or defaults[key] == value]


def restated_defaults(values: dict, schema: type) -> list[str]:
    return restated(values, flatten(defaults_tree(schema)))


@pytest.mark.parametrize("name, schema", [("train.yaml", TrainConfig), ("check_config.yaml", CheckConfig)])
def test_yaml_states_only_what_differs_from_the_dataclass(name, schema):
    assert restated_defaults(stated(name), schema) == []


def test_iterate_yaml_states_only_what_differs_and_its_train_section_only_changes():
    values = stated("iterate.yaml")
    train = values.pop("train")
    assert restated_defaults(values, IterateConfig) == []
    assert restated_defaults(train, TrainConfig) == []
    assert len(flatten(train)) <= 5  # the few sami-train settings that differ for expert iteration


def test_the_demo_states_only_what_differs_from_iterate_yaml():
    base, demo = stated("iterate.yaml"), stated("iterate_demo.yaml")
    train_base = flatten(defaults_tree(TrainConfig)) | flatten(base.pop("train"))
    assert restated(demo.pop("train"), train_base) == []
    assert restated(demo, flatten(defaults_tree(IterateConfig)) | flatten(base)) == []


def compose_config(name: str, overrides: list[str]):
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return compose(config_name=name, overrides=overrides)


@pytest.fixture
def base_hf(tmp_path) -> Path:
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text("{}")
    return tmp_path / "hf"


def open_run(tmp_path: Path, base_hf: Path, *overrides: str, config_name: str = "iterate") -> Run:
    register_iterate_schema()
    cfg = compose_config(config_name, [f"run_dir={tmp_path / 'run'}", f"base.hf={base_hf}", *overrides])
    return Run(iterate_config(cfg), None)


def sami_train_config(args: list[str]) -> TrainConfig:
    """What sami-train builds from the command line sami-iterate gives it (composed here, not launched)."""
    register_train_schema()
    return to_typed(TrainConfig, compose_config("train", args), "train")


def test_sami_iterate_passes_only_what_was_set_so_a_changed_train_default_reaches_each_iteration(
        tmp_path, base_hf, monkeypatch):
    run = open_run(tmp_path, base_hf, "train.optimizer.lr=2e-6")
    args = run.train_args(1)
    records = tmp_path / "run" / "iter1" / "records.jsonl"
    assert args == [f"checkpoint='{run.base_checkpoint()}'", f"data.records='{records}'", f"run_dir='{run.train_dir(1)}'",
                    "template=dialogue", "queries_per_step=32", "data.seq_length=1024", "data.on_overlength='drop'",
                    "optimizer.lr=2e-06"]
    # Change two of sami-train's defaults (a top-level one and a nested one), as a new release would.
    fields = TrainConfig.__dataclass_fields__
    monkeypatch.setattr(fields["steps"], "default", 7)
    monkeypatch.setattr(fields["optimizer"], "default_factory", lambda: OptimizerSettings(weight_decay=0.25))
    trained = sami_train_config(args)
    assert (trained.steps, trained.optimizer.weight_decay) == (7, 0.25)
    assert (trained.optimizer.lr, trained.queries_per_step, trained.data.on_overlength) == (2e-6, 32, "drop")
    assert run.train_settings.queries_per_step == 32


def test_a_bad_train_key_fails_when_the_run_opens_and_names_the_key(tmp_path, base_hf):
    with pytest.raises(ConfigError, match=r"train\.steps"):
        open_run(tmp_path, base_hf, "train.steps=many")
    with pytest.raises(ConfigError, match=r"min_lr=0.001 exceeds the peak optimizer\.lr"):
        open_run(tmp_path, base_hf, "train.lr_schedule.min_lr=1e-3")
    # values only the training step would otherwise reach (after generation has run)
    with pytest.raises(ConfigError, match=r"data\.on_overlength 'skip' is unknown; use error or drop"):
        open_run(tmp_path, base_hf, "train.data.on_overlength=skip")
    with pytest.raises(ConfigError, match=r"data\.seq_length must be >= 1"):
        open_run(tmp_path, base_hf, "train.data.seq_length=0")
    cfg = IterateConfig(run_dir="r", base=driver.BaseModelConfig(hf="h"), train={"data": {"records": "x.jsonl"}})
    with pytest.raises(ConfigError, match=r"train\.data\.records is set by sami-iterate"):
        train_settings(cfg)


def test_a_changed_template_field_is_refused_since_sami_train_reads_templates_by_name(tmp_path, base_hf):
    open_run(tmp_path, base_hf, "template=summarization")  # a template file: sami-train gets the same one
    with pytest.raises(ConfigError, match=r"template 'dialogue' differs from configs/template/dialogue\.yaml"):
        open_run(tmp_path, base_hf, "template.response_prefix=X")


def header(name: str) -> str:
    lines = (config_dir() / "recipe" / f"{name}.yaml").read_text().splitlines()
    return "\n".join(line for line in lines[:next(i for i, line in enumerate(lines) if not line.startswith("#"))])


# What the Slurm templates passed as SAMI_ITERATE_ARGS before the recipes moved into YAML, except
# recompute_activations: none where the memory model says the template's layout fits without it
# (tests/test_memory_model.py, issue 15 item 10).
RECIPE_VALUES = {
    "llama3-70b": {"iterations": 3, "queries_per_iteration": 1024, "queries.source": "hh-rlhf",
                   "queries.subset": "helpful-base", "generation.backend": "vllm", "generation.tensor_parallel": 8,
                   "generation.shard_size": 256, "train.steps": 4, "train.queries_per_step": 128, "train.optimizer.name": "rmsprop",
                   "train.optimizer.use_distributed_optimizer": False, "train.optimizer.lr": 1e-6,
                   "train.recompute_activations": "none", "train.precision.params_dtype": "bf16"},
    "mixtral-8x7b": {"iterations": 3, "constitution_set": "summarization", "queries.source": "tldr",
                     "queries_per_iteration": 1024, "template.name": "summarization", "generation.backend": "vllm",
                     "generation.tensor_parallel": 8, "generation.shard_size": 256, "train.steps": 6, "train.queries_per_step": 128,
                     "train.optimizer.name": "rmsprop", "train.optimizer.use_distributed_optimizer": False,
                     "train.optimizer.lr": 5e-7, "train.recompute_activations": "none",
                     "train.precision.params_dtype": "bf16"},
    "mistral-7b": {"iterations": 3, "queries.source": "hh-rlhf", "queries.subset": "helpful-base",
                   "queries_per_iteration": 1024, "generation.backend": "vllm", "generation.tensor_parallel": 4,
                   "generation.shard_size": 256, "train.steps": 6, "train.queries_per_step": 128, "train.optimizer.name": "adam",
                   "train.optimizer.lr": 5e-7, "train.precision.params_dtype": "bf16"},
    "tiny-llama": {"iterations": 2, "queries_per_iteration": 4, "evaluation.num_queries": 3,
                   "generation.max_new_tokens": 12, "generation.shard_size": 1, "filters.debris": [],
                   "filters.require_sentence_end": False, "filters.drop_truncated": False,
                   "filters.drop_identical": False, "train.steps": 2, "train.queries_per_step": 2,
                   "train.save_interval": 1, "train.data.seq_length": 256, "train.precision.params_dtype": "fp32",
                   "train.optimizer.lr": 1e-3, "train.optimizer.use_distributed_optimizer": False},
}


def test_the_four_recipes_exist():
    assert RECIPES == sorted(RECIPE_VALUES)


@pytest.mark.parametrize("name", RECIPES)
def test_each_recipe_resolves_to_valid_typed_configs_and_its_header_says_how_to_launch_it(name, base_hf):
    register_iterate_schema()
    cfg = iterate_config(compose_config(f"recipe/{name}", ["run_dir=runs/x", f"base.hf={base_hf}"]))
    trained = train_settings(cfg)
    resolved = flatten(OmegaConf.to_container(OmegaConf.structured(cfg))) | {
        f"train.{key}": value for key, value in flatten(OmegaConf.to_container(OmegaConf.structured(trained))).items()}
    assert {key: resolved[key] for key in RECIPE_VALUES[name]} == RECIPE_VALUES[name]

    text = header(name)
    assert f"sami-iterate --config-name recipe/{name} " in text
    templates = re.findall(r"sbatch (?:--\S+ )*(slurm/sami_\w+\.sh)", text)
    assert templates, f"the header of recipe/{name}.yaml names no sbatch line"
    for template in templates:
        assert f'"${{SAMI_RECIPE={name}}}"' in (ROOT / template).read_text()


@pytest.mark.parametrize("template", sorted(p.name for p in (ROOT / "slurm").glob("sami_*.sh") if p.name != "sami_bench.sh"))
def test_each_iteration_template_names_a_recipe_and_no_training_settings(template):
    text = (ROOT / "slurm" / template).read_text()
    (recipe,) = re.findall(r'"\$\{SAMI_RECIPE=([\w.-]+)\}"', text)
    assert recipe in RECIPES
    assert "SAMI_ITERATE_ARGS:=" not in text and "train.optimizer" not in text


def test_lr_warmup_step_s_of_w_uses_peak_times_s_over_w():
    schedule = LRSchedule(warmup_steps=4, decay="constant")
    assert [schedule.at(step, 10, 2e-6) for step in range(1, 7)] == pytest.approx(
        [0.5e-6, 1e-6, 1.5e-6, 2e-6, 2e-6, 2e-6], rel=1e-12)


@pytest.mark.parametrize("decay", ["cosine", "linear"])
def test_lr_decay_starts_at_the_peak_after_warmup_and_ends_at_min_lr(decay):
    schedule = LRSchedule(warmup_steps=2, decay=decay, min_lr=1e-7)
    lrs = [schedule.at(step, 12, 1e-6) for step in range(1, 13)]
    assert lrs[1] == pytest.approx(1e-6) and lrs[-1] == pytest.approx(1e-7, rel=1e-9)
    assert all(a >= b for a, b in zip(lrs[1:-1], lrs[2:], strict=True))
    # halfway through the decay (step 7 of 3..12) both shapes are halfway between the peak and min_lr
    assert lrs[6] == pytest.approx((1e-6 + 1e-7) / 2)


def test_min_lr_above_the_peak_is_refused_naming_optimizer_lr():
    with pytest.raises(ConfigError, match=r"optimizer\.lr"):
        to_typed(TrainConfig, {"checkpoint": "c", "run_dir": "r", "data": {"records": "x"},
                               "optimizer": {"lr": 1e-6}, "lr_schedule": {"min_lr": 1e-5}}, "train")
    with pytest.raises(ConfigError, match="lr_schedule.decay 'step' is unknown"):
        LRSchedule(decay="step")


def test_sequence_parallelism_follows_the_composed_tp_in_every_command(base_hf, tmp_path):
    """The schemas keep ``parallel.sequence_parallel`` unset (null) instead of the value derived at
    the defaults' TP = 1, so each command derives it from the TP it is given (it was false in every
    composed config: 70B trained without it, and the memory check assumed so)."""
    from megatron_sami.cli.schemas import register_schema

    register_train_schema()
    for tensor, expected in ((1, False), (2, True)):
        train = to_typed(TrainConfig, compose_config("train", ["checkpoint=c", "data.records=r", "run_dir=d",
                                                               f"parallel.tensor={tensor}"]), "train")
        assert train.parallel.sequence_parallel is expected
    off = to_typed(TrainConfig, compose_config("train", ["checkpoint=c", "data.records=r", "run_dir=d",
                                                         "parallel.tensor=2", "parallel.sequence_parallel=false"]),
                   "train")
    assert off.parallel.sequence_parallel is False
    register_iterate_schema()
    cfg = iterate_config(compose_config("recipe/llama3-70b", ["run_dir=runs/x", f"base.hf={base_hf}",
                                                              "train.parallel.tensor=8"]))
    assert train_settings(cfg).parallel.sequence_parallel is True
    register_schema("check_config_schema", defaults_tree(CheckConfig))
    check = to_typed(CheckConfig, compose_config("check_config", ["model=llama3-70b", "parallel.tensor=8",
                                                                  "world_size=8"]), "")
    assert check.parallel.sequence_parallel is True
