"""The package installs as a wheel that carries its data: ``pip install .`` (what HPC teams do
inside a container image) gives commands that find the model catalogue, the Hydra configs and the
conversion key map, with no checkout in sight.

The slow test builds the wheel from a copy of the source tree, installs it with ``--no-deps`` into
a scratch virtual environment outside the checkout (which sees this environment's dependencies
through a ``.pth`` file, but not its editable install of this project), and from a directory
outside the checkout runs ``sami-check-config model=llama3-8b`` and a tiny
``sami-convert hf-to-megatron``. The fast tests keep ``pyproject.toml`` in step with the tree.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import tomllib
from pathlib import Path

import pytest

from megatron_sami import resources

ROOT = Path(__file__).resolve().parents[1]
SETUPTOOLS = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
DATA_PACKAGES = {"megatron_sami._resources.configs": "configs", "megatron_sami._resources.conversion": "conversion"}
# What a build needs from the tree (the rest, e.g. .venv and .git, stays behind).
NOT_COPIED = shutil.ignore_patterns(".venv", ".git", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache",
                                    ".ruff_cache", "runs", "outputs")


def test_every_subpackage_and_data_folder_is_declared():
    on_disk = {".".join(path.parent.relative_to(ROOT).parts)
               for path in (ROOT / "megatron_sami").rglob("__init__.py")}
    declared = set(SETUPTOOLS["packages"])
    assert declared - set(DATA_PACKAGES) == on_disk, (
        "pyproject.toml's [tool.setuptools] packages must list every package on disk; "
        f"add {sorted(on_disk - declared)}, remove {sorted(declared - on_disk - set(DATA_PACKAGES))}")
    assert SETUPTOOLS["package-dir"] == DATA_PACKAGES


@pytest.mark.parametrize(("package", "folder"), sorted(DATA_PACKAGES.items()))
def test_package_data_globs_cover_every_data_file(package, folder):
    suffixes = {pattern.rsplit("*", 1)[1] for pattern in SETUPTOOLS["package-data"][package]}
    files = [path for path in (ROOT / folder).rglob("*") if path.is_file() and path.name != "README.md"]
    left_out = [str(path.relative_to(ROOT)) for path in files if path.suffix not in suffixes]
    assert files and not left_out, f"these files would not ship in the wheel; extend package-data: {left_out}"


def test_a_checkout_finds_its_top_level_folders():
    assert resources.config_dir() == ROOT / "configs"
    assert resources.key_map_path() == ROOT / "conversion" / "llama_family.yaml"
    assert resources.key_map_path().is_file() and (resources.config_dir() / "model" / "llama3-8b.yaml").is_file()


def _scratch_env(scratch: Path) -> dict[str, str]:
    """The environment of a shell in which only the scratch venv is active."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env.update(PATH=f"{scratch / 'bin'}{os.pathsep}{env.get('PATH', '')}", HF_HUB_OFFLINE="1")
    return env


def _run(command: list[str], cwd: Path, env: dict[str, str], timeout: int = 300) -> str:
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{' '.join(command)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result.stdout


def _make_scratch_venv(scratch: Path) -> Path:
    """A venv without pip that imports this environment's dependencies (not its editable install)."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(scratch)], check=True, timeout=120)
    python = scratch / "bin" / "python"
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                               capture_output=True, text=True, check=True).stdout.strip())
    # A path line in a .pth file adds the directory only; the .pth files inside it (this project's
    # editable finder) are not run, so megatron_sami can come from the wheel alone.
    dependencies = dict.fromkeys([sysconfig.get_path("purelib"), sysconfig.get_path("platlib")])
    (site / "project-dependencies.pth").write_text("".join(f"{path}\n" for path in dependencies))
    return python


@pytest.mark.slow
def test_the_wheel_ships_configs_and_key_maps(tmp_path):
    source, dist, outside = tmp_path / "source", tmp_path / "dist", tmp_path / "elsewhere"
    shutil.copytree(ROOT, source, ignore=NOT_COPIED)  # the build writes build/ and *.egg-info into it
    outside.mkdir()
    python = _make_scratch_venv(tmp_path / "scratch")
    env = _scratch_env(tmp_path / "scratch")

    # The source tree run as it is (no install at all) finds its top-level folders.
    where = _run([str(python), "-c", "from megatron_sami import resources; print(resources.config_dir())"],
                 cwd=source, env=env)
    assert where.strip() == str(source / "configs")

    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
          "-w", str(dist), str(source)], cwd=tmp_path, env=dict(os.environ))
    (wheel,) = dist.glob("megatron_sami-*.whl")
    _run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index", "-q",
          str(wheel)], cwd=tmp_path, env=dict(os.environ))
    shutil.rmtree(source)  # nothing may be read from the tree the wheel was built from

    probe = ("import megatron_sami; from megatron_sami import resources; "
             "print(megatron_sami.__file__); print(resources.config_dir()); print(resources.key_map_path())")
    package, configs, key_map = _run([str(python), "-c", probe], cwd=outside, env=env).split()
    for path in (package, configs, key_map):
        assert Path(path).is_relative_to(tmp_path / "scratch"), f"{path} is not from the installed wheel"
    assert Path(key_map).is_file() and (Path(configs) / "recipe").is_dir()

    plan = _run(["sami-check-config", "model=llama3-8b"], cwd=outside, env=env)
    assert "model llama3-8b: 8.03 B parameters" in plan

    from megatron_sami.testing.tiny import make_tiny_hf_model

    hf_dir = make_tiny_hf_model("llama", outside / "hf")
    _run(["sami-convert", "hf-to-megatron", str(hf_dir), str(outside / "megatron")], cwd=outside, env=env)
    assert (outside / "megatron" / "model.yaml").is_file() and (outside / "megatron" / "weights").is_dir()
