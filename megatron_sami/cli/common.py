"""What every command-line entry point shares: Hydra setup and user-facing errors.

A :class:`~megatron_sami.errors.SamiError` ends the program with its one-sentence message
and exit code 2; :class:`~megatron_sami.errors.Preempted` ends it with exit code 75 so a batch
script can requeue itself; anything else is a bug and keeps its traceback. The Hydra commands
get this from :func:`run_hydra_app`, the argparse commands from :func:`run_main`.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import NoReturn

from megatron_sami.errors import EXIT_PREEMPTED, Preempted, SamiError
from megatron_sami.models.catalogue import model_names
from megatron_sami.resources import config_dir

EXIT_USER_ERROR = 2


def fail(message: str) -> NoReturn:
    """Print ``error: <message>`` on stderr and exit with code 2."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(EXIT_USER_ERROR)


def _exit_preempted(stop: Preempted) -> NoReturn:
    print(f"preempted: {stop}; rerun the same command to resume.", file=sys.stderr)
    raise SystemExit(EXIT_PREEMPTED) from None


def run_main(main: Callable[[list[str] | None], int | None]) -> Callable[[list[str] | None], int]:
    """Wrap an argparse entry point ``main(argv) -> exit code``: a :class:`SamiError` becomes one
    line on stderr and exit code 2, :class:`Preempted` exit code 75; use as a decorator."""

    @functools.wraps(main)
    def entry(argv: list[str] | None = None) -> int:
        try:
            code = main(argv)
        except SamiError as err:
            fail(str(err))
        except Preempted as stop:
            _exit_preempted(stop)
        return 0 if code is None else code

    return entry


def _check_model_choice(argv: list[str]) -> None:
    """Hydra's own message for an unknown group option is a page long; give one sentence."""
    for arg in argv:
        if arg.startswith("model="):
            name = arg.split("=", 1)[1]
            if name not in model_names():
                fail(f"unknown model '{name}'; choose one of: {', '.join(model_names())}.")


# Settings that were removed, and what replaced them (their old keys get this instead of a guess).
REMOVED_SETTINGS = {"lr_schedule.lr": "optimizer.lr is the peak learning rate; lr_schedule only shapes it"}
# Hydra options whose value is the next argument; options not listed here and not handled below
# (--help, --multirun, --config-path, ...) are left to Hydra itself.
_VALUE_OPTIONS = {"--cfg", "-c", "--package", "-p"}
_FLAG_OPTIONS = {"--resolve"}


def _overrides_of(argv: list[str], config_name: str) -> tuple[str, list[str]] | None:
    """(config name, overrides) of a Hydra command line, or None where Hydra should handle it alone."""
    name, overrides, args = config_name, [], iter(argv)
    for arg in args:
        if arg in ("--config-name", "-cn"):
            name = next(args, name)
        elif arg.startswith("--config-name="):
            name = arg.split("=", 1)[1]
        elif arg in _VALUE_OPTIONS:
            next(args, None)
        elif arg in _FLAG_OPTIONS:
            continue
        elif arg.startswith("-"):
            return None
        else:
            overrides.append(arg)
    return name, overrides


def _flat_keys(node, prefix: str = "") -> list[str]:
    keys = []
    for key, value in node.items():
        keys += _flat_keys(value, f"{prefix}{key}.") if isinstance(value, dict) else [f"{prefix}{key}"]
    return keys


def _composition_error(err: Exception, name: str) -> str:
    """One sentence for a Hydra composition error: the unknown key (with the closest known one),
    or the missing config (with the available ones)."""
    import difflib
    import re

    from hydra import compose
    from omegaconf import OmegaConf

    message = str(err)
    unknown = re.search(r"Could not override '([^']+)'", message) or re.search(r"Key '([^']+)' is not in struct", message)
    if unknown:
        key = unknown.group(1)
        removed = next((why for old, why in REMOVED_SETTINGS.items() if key == old or key.endswith("." + old)), None)
        if removed:
            return f"'{key}' no longer exists: {removed}."
        known = _flat_keys(OmegaConf.to_container(compose(config_name=name)))
        close = difflib.get_close_matches(key, known, n=1)
        hint = f"did you mean {close[0]}?" if close else "`--cfg job` lists every setting."
        return f"unknown setting '{key}'; {hint}"
    lines = message.strip().splitlines()
    if "Available options" in message:  # an unknown option of a config group (template=..., model=...)
        start = next(i for i, line in enumerate(lines) if "Available options" in line) + 1
        options = [line.strip() for line in lines[start:] if line.strip()][:50]
        options = options[:next((i for i, o in enumerate(options) if "=" in o or ":" in o), len(options))]
        return f"{lines[0].rstrip('.')}; choose one of: {', '.join(options)}."
    if "Cannot find primary config" in message:  # --config-name
        folder = (config_dir() / name).parent
        choices = sorted(path.relative_to(config_dir()).with_suffix("").as_posix() for path in folder.glob("*.yaml"))
        return f"no config '{name}' in {config_dir()}; choose one of: {', '.join(choices)}."
    from hydra.errors import OverrideParseException

    if isinstance(err, OverrideParseException) or lines[0].startswith("Ambiguous value"):
        return (f"cannot read an override ({lines[0].rstrip('.')}); quote a value that holds spaces, commas, "
                "brackets or '=': key='a,b'.")
    return f"{lines[0].rstrip('.')} (configs in {config_dir()})."


def _check_composes(argv: list[str], config_name: str) -> None:
    """Compose the command line's config once before Hydra does: a misspelt key or an unknown
    config gives one sentence and exit code 2 instead of Hydra's page of text and exit code 1."""
    split = _overrides_of(argv, config_name)
    if split is None:
        return
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    name, overrides = split
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        try:
            compose(config_name=name, overrides=overrides)
        except (HydraException, OmegaConfBaseException) as err:
            fail(_composition_error(err, name))


def run_hydra_app(task: Callable, config_name: str) -> None:
    """Run ``task(cfg)`` as a Hydra app over the project's ``configs/`` directory (from the
    checkout or, in a wheel install, from inside the package: see :mod:`megatron_sami.resources`)."""
    import hydra

    _check_model_choice(sys.argv[1:])
    _check_composes(sys.argv[1:], config_name)

    @hydra.main(config_path=str(config_dir()), config_name=config_name, version_base="1.3")
    def _app(cfg) -> None:
        try:
            task(cfg)
        except SamiError as err:
            fail(str(err))
        except Preempted as stop:
            _exit_preempted(stop)

    _app()
