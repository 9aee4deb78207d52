"""The Slurm templates without a cluster: dry runs resolve layouts and commands; bad submissions fail early."""

import os
import shutil
import subprocess
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


@pytest.mark.parametrize("template, nodes, layout", [
    ("sami_70b.sh", 4, "TP 8 x PP 4 x CP 1 x DP 1"),
    ("sami_70b.sh", 8, "TP 8 x PP 4 x CP 1 x DP 2"),
    ("sami_mixtral.sh", 4, "TP 1 x PP 4 x CP 1 x DP 8; EP 8"),
    ("sami_mixtral.sh", 8, "TP 1 x PP 4 x CP 1 x DP 16; EP 8"),
    ("sami_mistral7b.sh", 1, "TP 4 x PP 1 x CP 1 x DP 2"),
    ("sami_mistral7b.sh", 2, "TP 4 x PP 1 x CP 1 x DP 4"),
])
def test_dry_run_prints_the_layout_and_the_srun_commands(template, nodes, layout, fake_hf):
    result = dry_run(template, nodes, SAMI_BASE_HF=str(fake_hf))
    assert result.returncode == 0, result.stderr
    assert f"layout: world {nodes * 8} = {layout}" in result.stdout
    assert f"srun --nodes={nodes} --ntasks-per-node=8 --kill-on-bad-exit=1" in result.stdout
    assert "megatron_sami.cli.iterate" in result.stdout and f"base.hf={fake_hf}" in result.stdout


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
