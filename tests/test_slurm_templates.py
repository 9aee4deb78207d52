"""The Slurm templates without a cluster: dry runs resolve layouts and commands; bad submissions fail early."""

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def fake_hf(tmp_path_factory):
    directory = tmp_path_factory.mktemp("hf")
    (directory / "config.json").write_text("{}")
    return directory


def dry_run(template: str, nodes: int, **env) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SAMI_"))}
    return subprocess.run(["bash", str(ROOT / "slurm" / template)], capture_output=True, text=True, timeout=120,
                          cwd=ROOT, env=clean | {"SAMI_DRY_RUN": "1", "SAMI_NODES": str(nodes), **env})


def driver_argv(stdout: str) -> list[str]:
    """The driver's command of a dry run (printed shell-quoted) as argv."""
    line = next(line for line in stdout.splitlines() if line.startswith("driver:"))
    return shlex.split(line.removeprefix("driver:"))


@pytest.mark.parametrize("template, nodes, layout, recipe", [
    ("sami_70b.sh", 4, "TP 8 x PP 4 x CP 1 x DP 1", "llama3-70b"),
    ("sami_70b.sh", 8, "TP 8 x PP 4 x CP 1 x DP 2", "llama3-70b"),
    ("sami_mixtral.sh", 4, "TP 1 x PP 4 x CP 1 x DP 8; EP 8", "mixtral-8x7b"),
    ("sami_mixtral.sh", 8, "TP 1 x PP 4 x CP 1 x DP 16; EP 8", "mixtral-8x7b"),
    ("sami_mistral7b.sh", 1, "TP 4 x PP 1 x CP 1 x DP 2", "mistral-7b"),
    ("sami_mistral7b.sh", 2, "TP 4 x PP 1 x CP 1 x DP 4", "mistral-7b"),
])
def test_dry_run_prints_the_layout_and_the_srun_commands(template, nodes, layout, recipe, fake_hf):
    result = dry_run(template, nodes, SAMI_BASE_HF=str(fake_hf))
    assert result.returncode == 0, result.stderr
    assert f"layout: world {nodes * 8} = {layout}" in result.stdout
    assert f"srun --nodes={nodes} --ntasks-per-node=8 --kill-on-bad-exit=1" in result.stdout
    assert "megatron_sami.cli.iterate" in result.stdout and f"base.hf='{fake_hf}'" in driver_argv(result.stdout)
    # the template names its recipe; the training settings come from the recipe, not from the template
    assert f"recipe: {recipe} (" in result.stdout
    assert f"megatron_sami.cli.iterate --config-name recipe/{recipe} run_dir=" in result.stdout
    assert "train.optimizer" not in result.stdout and "train.precision" not in result.stdout


def test_the_tiny_template_runs_its_cpu_recipe_in_the_dtype_it_checked(fake_hf):
    result = dry_run("sami_tiny.sh", 2, SAMI_BASE_HF=str(fake_hf), SAMI_ITERATE_ARGS="iterations=1 queries.limit=9")
    assert result.returncode == 0, result.stderr
    assert "layout: world 2 = TP 1 x PP 1 x CP 1 x DP 2" in result.stdout and "precision: fp32" in result.stdout
    assert "--config-name recipe/tiny-llama " in result.stdout
    assert result.stdout.rstrip().endswith("train.precision.params_dtype=fp32 iterations=1 queries.limit=9")


def test_an_unknown_recipe_is_one_sentence_naming_the_recipes(fake_hf):
    result = dry_run("sami_70b.sh", 4, SAMI_BASE_HF=str(fake_hf), SAMI_RECIPE="llama3-700b")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "no recipe" in result.stderr and "llama3-70b mistral-7b mixtral-8x7b tiny-llama" in result.stderr


@pytest.mark.parametrize("template, nodes, message", [
    ("sami_70b.sh", 3, "not divisible by TP x PP x CP = 8 x 4 x 1 = 32"),
    ("sami_mixtral.sh", 2, "EP"),
])
def test_a_node_count_the_layout_cannot_use_fails_before_submission_work(template, nodes, message, fake_hf):
    result = dry_run(template, nodes, SAMI_BASE_HF=str(fake_hf))
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr


def test_missing_model_and_container_image_are_one_sentence(fake_hf, tmp_path):
    result = dry_run("sami_mistral7b.sh", 1, SAMI_BASE_HF=str(tmp_path / "absent"))
    assert result.returncode == 2 and "is not an HF model directory" in result.stderr
    result = dry_run("sami_mistral7b.sh", 1, SAMI_BASE_HF=str(fake_hf), SAMI_CONTAINER_IMAGE=str(tmp_path / "x.sqsh"))
    assert result.returncode == 2 and "container image" in result.stderr and "does not exist" in result.stderr
    result = dry_run("sami_mistral7b.sh", 1, SAMI_BASE_CKPT=str(tmp_path))
    assert result.returncode == 2 and "not a converted checkpoint" in result.stderr


@pytest.mark.skipif(shutil.which("shellcheck") is None and not os.environ.get("CI"),
                    reason="shellcheck is not installed (CI installs it)")
def test_shell_scripts_are_shellcheck_clean():
    scripts = [*map(str, (ROOT / "slurm").glob("*.sh")), *map(str, (ROOT / "scripts").glob("*.sh")), ".ci/run"]
    result = subprocess.run(["shellcheck", "-x", *scripts], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stdout


AWKWARD_RUN = "run dir, it's café 日本"


def compose_driver(argv: list[str]):
    """The IterateConfig that sami-iterate builds from the dry run's driver command."""
    from hydra import compose, initialize_config_dir

    from megatron_sami.cli.iterate import iterate_config
    from megatron_sami.cli.schemas import register_iterate_schema
    from megatron_sami.resources import config_dir

    args = argv[argv.index("megatron_sami.cli.iterate") + 1:]
    name = "iterate"
    if args[0] == "--config-name":
        name, args = args[1], args[2:]
    register_iterate_schema()
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return iterate_config(compose(config_name=name, overrides=args))


def test_awkward_paths_reach_the_driver_and_srun_intact(fake_hf, tmp_path, monkeypatch):
    """A run directory with a space, a comma, a quote and non-ASCII characters: the driver's config
    holds it unchanged, srun gets it as single arguments, and each phase and attempt logs apart."""
    run_dir = tmp_path / AWKWARD_RUN
    result = dry_run("sami_tiny.sh", 2, SAMI_BASE_HF=str(fake_hf), SAMI_RUN_DIR=str(run_dir),
                     SLURM_CPUS_PER_TASK="3", SLURM_MEM_PER_CPU="4000")
    assert result.returncode == 0, result.stderr
    cfg = compose_driver(driver_argv(result.stdout))
    assert cfg.run_dir == str(run_dir) and cfg.base.hf == str(fake_hf)
    monkeypatch.setenv("SLURM_RESTART_COUNT", "2")
    assert cfg.launcher.command("megatron_sami.cli.train", ["x=1"], "iter1/train") == [
        "srun", "--nodes=2", "--ntasks-per-node=1", "--kill-on-bad-exit=1", "--cpus-per-task=3", "--mem-per-cpu=4000",
        f"--output={run_dir}/logs/iter1-train-%j.2-rank%t.log", "--open-mode=append",
        sys.executable, "-m", "megatron_sami.cli.train", "x=1"]  # no container: the driver's Python


def test_a_container_run_mounts_its_paths_uses_the_container_python_and_imports_once(fake_hf, tmp_path):
    image = tmp_path / "sami.sqsh"
    image.write_text("")
    run_dir = tmp_path / "run é"
    result = dry_run("sami_mistral7b.sh", 1, SAMI_BASE_HF=str(fake_hf), SAMI_RUN_DIR=str(run_dir),
                     SAMI_CONTAINER_IMAGE=str(image), SAMI_CONTAINER_MOUNTS="/data:/data")
    assert result.returncode == 0, result.stderr
    launcher = compose_driver(driver_argv(result.stdout)).launcher
    assert launcher.python == "python3"
    options = dict(option.split("=", 1) for option in launcher.prefix if option.startswith("--container"))
    assert options["--container-image"] == str(image)
    assert options["--container-name"] == "sami-mistral-7b"  # one import per job, reused by every step
    assert options["--container-mounts"].split(",") == [f"{ROOT}:{ROOT}", f"{run_dir}:{run_dir}",
                                                        f"{fake_hf}:{fake_hf}", "/data:/data"]
    result = dry_run("sami_mistral7b.sh", 1, SAMI_BASE_HF=str(fake_hf), SAMI_RUN_DIR=str(tmp_path / "a,b"),
                     SAMI_CONTAINER_IMAGE=str(image))
    assert result.returncode == 2 and "--container-mounts cannot take" in result.stderr


def test_a_layout_whose_training_does_not_fit_the_gpu_is_refused_with_the_fix(fake_hf):
    result = dry_run("sami_70b.sh", 4, SAMI_BASE_HF=str(fake_hf), SAMI_GPU_MEMORY_GB="24")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    # Sequence parallelism (on at TP 8) holds a TP-th of the norms' and residuals' activations.
    assert result.stderr.startswith("error: train needs 40.1 GiB per GPU but has 24.0 at gpu_memory_gb=24")
    assert "it fits with train.parallel.tensor=16 on 64 GPUs" in result.stderr
    fits = dry_run("sami_70b.sh", 4, SAMI_BASE_HF=str(fake_hf), SAMI_GPU_MEMORY_GB="141")
    assert fits.returncode == 0 and "train " in fits.stdout and "generate " in fits.stdout
