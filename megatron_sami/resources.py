"""Where the package's data files are: ``configs/`` and the conversion key maps, in a checkout
or inside an installed wheel.

The files stay at the repository's top level (``configs/``, ``conversion/``), where users look
for them. ``pyproject.toml`` maps those folders into the wheel as
``megatron_sami/_resources/configs`` and ``megatron_sami/_resources/conversion`` (a setuptools
``package-dir`` mapping with package-data globs), so ``pip install .`` ships them. At run time a
folder is found, in this order:

1. inside the installed package, ``megatron_sami/_resources/<name>`` (a wheel install; found
   through :mod:`importlib.resources`, and unpacked to a temporary directory only if the
   package is imported from a zip file);
2. beside the package, ``<checkout>/<name>`` (the source checkout run as it is, or an editable
   install, whose package directory is the checkout's).

``SAMI_CONFIG_DIR`` replaces the ``configs/`` folder in both cases.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import os
from importlib import resources
from pathlib import Path

from megatron_sami.errors import EnvironmentSetupError

PACKAGE = "megatron_sami"
INSTALLED_UNDER = "_resources"  # the wheel's folder for the data (see pyproject.toml)
CONFIG_DIR_ENV = "SAMI_CONFIG_DIR"
DEFAULT_KEY_MAP = "llama_family"

# Folders unpacked from a zip import live until the interpreter exits (Hydra reads them late).
_unpacked = contextlib.ExitStack()
atexit.register(_unpacked.close)


@functools.cache
def data_dir(name: str) -> Path:
    """The real directory holding the data folder ``name`` (``"configs"`` or ``"conversion"``).

    Raises:
        EnvironmentSetupError: if the folder is neither inside the installed package nor beside
            it (an install made without the package data).
    """
    package = resources.files(PACKAGE)
    installed = package.joinpath(INSTALLED_UNDER, name)
    if installed.is_dir():
        # A plain directory for an unpacked wheel (returned as it is); a temporary copy for a zip.
        return _unpacked.enter_context(resources.as_file(installed))
    checkout = Path(str(package)).parent / name
    if checkout.is_dir():
        return checkout
    raise EnvironmentSetupError(
        f"the package's data folder '{name}' is missing (looked in {installed} and {checkout}); reinstall "
        f"megatron-sami from its source tree (pip install .), which ships configs/ and conversion/ inside it.")


def config_dir() -> Path:
    """The ``configs/`` directory: model catalogue, train/iterate configs, recipes, templates,
    constitutions and built-in queries. ``$SAMI_CONFIG_DIR`` overrides it.

    Raises:
        EnvironmentSetupError: if the install lacks the folder (see :func:`data_dir`).
    """
    override = os.environ.get(CONFIG_DIR_ENV)
    return Path(override) if override else data_dir("configs")


def key_map_path(family: str = DEFAULT_KEY_MAP) -> Path:
    """The declarative HF <-> Megatron key map ``conversion/<family>.yaml``.

    Raises:
        EnvironmentSetupError: if the install lacks the folder (see :func:`data_dir`).
    """
    return data_dir("conversion") / f"{family}.yaml"
