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


def run_hydra_app(task: Callable, config_name: str) -> None:
    """Run ``task(cfg)`` as a Hydra app over the project's ``configs/`` directory (from the
    checkout or, in a wheel install, from inside the package: see :mod:`megatron_sami.resources`)."""
    import hydra

    _check_model_choice(sys.argv[1:])

    @hydra.main(config_path=str(config_dir()), config_name=config_name, version_base="1.3")
    def _app(cfg) -> None:
        try:
            task(cfg)
        except SamiError as err:
            fail(str(err))
        except Preempted as stop:
            _exit_preempted(stop)

    _app()
