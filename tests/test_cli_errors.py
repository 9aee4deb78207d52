"""Configuration errors end the command with one sentence naming the fix, not a traceback."""

import subprocess
import sys

import pytest

CHECK = [sys.executable, "-m", "megatron_sami.cli.check_config"]


def run_check(*overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run([*CHECK, *overrides], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize(
    ("overrides", "fix"),
    [
        (["model=llama3-8b", "parallel.tensor=3", "world_size=3"], "use one of 1, 2, 4, 8, 16, 32"),
        (["model=llama3-8b", "parallel.pipeline=3", "world_size=3"], "use a divisor of 32"),
        (["model=llama3-8b", "gpu_memory_gb=0"], "gpu_memory_gb must be > 0"),
        (["model=llama-9000"], "choose one of:"),
        (["model=mixtral-8x7b", "parallel.expert=3", "world_size=3"], "use a divisor of 8"),
    ],
)
def test_config_errors_are_one_sentence_with_the_fix(overrides, fix):
    result = run_check(*overrides)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ") and fix in lines[0]
    assert "Traceback" not in result.stderr


def test_an_fp8_layout_is_checked_on_a_login_node_without_a_gpu_or_transformer_engine():
    """sami-check-config runs before GPU time; sami-train checks TE and the GPU when it starts."""
    result = run_check("model=llama3-8b", "precision.fp8=e4m3")
    assert result.returncode == 0, result.stderr
    assert "fp8 e4m3" in result.stdout


def test_a_valid_layout_prints_the_plan():
    result = run_check("model=llama3-70b", "world_size=64", "parallel.tensor=8", "parallel.pipeline=4")
    assert result.returncode == 0, result.stderr
    assert "TP 8 x PP 4 x CP 1 x DP 2" in result.stdout
    assert "70.55 B parameters" in result.stdout


@pytest.mark.parametrize("launch", ["single", "torchrun-2"])
def test_convert_refuses_a_bad_source_before_starting_the_runtime_once(tmp_path, launch):
    """A bad HF source is refused from its headers before any process group starts (no runtime
    log line) and, under a 2-process torchrun, the sentence is printed once, not per rank."""
    source = tmp_path / "hf"
    source.mkdir()
    (source / "config.json").write_text('{"architectures": ["GPT2LMHeadModel"]}')
    command = ["-m", "megatron_sami.cli.convert", "hf-to-megatron", str(source), str(tmp_path / "out")]
    if launch == "torchrun-2":
        command = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *command]
    result = subprocess.run([sys.executable, *command], capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert errors == ["error: architecture 'GPT2LMHeadModel' is not supported; supported: LlamaForCausalLM, "
                      "MistralForCausalLM, MixtralForCausalLM."], result.stderr
    assert "runtime:" not in result.stderr + result.stdout
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.incomplete").exists()


@pytest.mark.parametrize(
    ("command", "args", "fix"),
    [
        ("check_config", ["parallel.tensr=2"], "unknown setting 'parallel.tensr'; did you mean parallel.tensor?"),
        ("train", ["checkpoint=c", "optimizer.lrr=1"], "unknown setting 'optimizer.lrr'; did you mean optimizer.lr?"),
        ("train", ["checkpoint=c", "lr_schedule.lr=1e-6"], "optimizer.lr is the peak learning rate"),
        ("iterate", ["run_dir=r", "train.optimzer.lr=1"], "did you mean train.optimizer.lr?"),
        ("iterate", ["run_dir=r", "train.lr_schedule.lr=1"], "'train.lr_schedule.lr' no longer exists"),
        ("iterate", ["--config-name", "recipe/nope", "run_dir=r"], "choose one of: recipe/llama3-70b"),
        ("iterate", ["run_dir=r", "template=nope"], "choose one of: chatml_dialogue, dialogue, summarization."),
        ("iterate", ["run_dir=a b,c"], "quote a value that holds spaces, commas"),
        ("iterate", ["train.steps=[1"], "quote a value that holds spaces, commas"),
    ],
)
def test_a_config_that_does_not_compose_is_one_sentence_naming_the_fix(command, args, fix):
    """Hydra's own report of these is a page of text and exit code 1."""
    result = subprocess.run([sys.executable, "-m", f"megatron_sami.cli.{command}", *args], capture_output=True,
                            text=True, timeout=120)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ") and fix in lines[0], lines[0]


@pytest.mark.parametrize(("module", "app"), [("train", "sami-train"), ("iterate", "sami-iterate"),
                                             ("score", "sami-score"), ("check_config", "sami-check-config")])
def test_help_names_the_command_and_how_to_run_it(module, app):
    """``--help`` of a Hydra app used to begin "<module> is powered by Hydra" (the module's name, not the command's)."""
    result = subprocess.run([sys.executable, "-m", f"megatron_sami.cli.{module}", "--help"], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith(f"{app}: ") and "powered by Hydra" not in result.stdout, result.stdout[:500]
    assert f"{app} --cfg job" in result.stdout and "== Config ==" in result.stdout


def test_the_memory_check_uses_the_layout_the_run_will_use():
    """The top-level layout refined by ``iterate.overrides`` (where the launcher's SAMI_ITERATE_ARGS
    go): train.parallel.pipeline=4 there used to be ignored, and sequence parallelism assumed off."""
    result = run_check("model=llama3-70b", "world_size=32", "parallel.tensor=8", "iterate.recipe=llama3-70b",
                       "iterate.overrides=['train.parallel.pipeline=4']")
    assert result.returncode == 0, result.stderr
    assert "TP 8 x PP 4 x CP 1 x DP 1" in result.stdout
    train = next(line for line in result.stdout.splitlines() if line.strip().startswith("train "))
    assert train.split()[4:6] == ["10.5", "40.1"], train  # activations with sequence parallelism (28.0 without)
