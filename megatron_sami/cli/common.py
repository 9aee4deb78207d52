"""What every command-line entry point shares: Hydra setup and user-facing errors.

A :class:`~megatron_sami.errors.SamiError` ends the program with its one-sentence message
and exit code 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

from megatron_sami.errors import EXIT_PREEMPTED, Preempted, SamiError
from megatron_sami.models.catalogue import config_dir, model_names

EXIT_USER_ERROR = 2


def fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(EXIT_USER_ERROR)


def _check_model_choice(argv: list[str]) -> None:
    """Hydra's own message for an unknown group option is a page long; give one sentence."""
    for arg in argv:
        if arg.startswith("model="):
            name = arg.split("=", 1)[1]
            if name not in model_names():
                fail(f"unknown model '{name}'; choose one of: {', '.join(model_names())}.")


def run_hydra_app(task: Callable, config_name: str) -> None:
    """Run ``task(cfg)`` as a Hydra app over the project's ``configs/`` directory."""
    import hydra

    _check_model_choice(sys.argv[1:])

    @hydra.main(config_path=str(config_dir()), config_name=config_name, version_base="1.3")
    def _app(cfg) -> None:
        try:
            task(cfg)
        except SamiError as err:
            fail(str(err))
        except Preempted as stop:
            print(f"preempted: {stop}; rerun the same command to resume.", file=sys.stderr)
            raise SystemExit(EXIT_PREEMPTED) from None

    _app()
