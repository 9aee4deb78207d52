"""What every command-line entry point shares: Hydra setup and one error boundary.

The boundary (:func:`run_main` for the argparse commands, :func:`run_hydra_app` for the Hydra
ones) maps every error a user can fix to one line, ``error: <sentence>``, and exit code 2,
printed once per launch, not once per process (:func:`fail_once`):

- a :class:`~megatron_sami.errors.SamiError`: its own sentence;
- a file-system refusal (``OSError`` with ENOSPC, EDQUOT, EFBIG, EROFS, EACCES, EPERM), also when
  it is the cause of another error (``torch.save`` reports a full disk as "unexpected pos"):
  the path, the system's text and the fix (:func:`megatron_sami.io.storage_error`);
- ``torch.save``'s "unexpected pos" (a write the file system cut short; its C++ writer drops the
  ``OSError``): the output path and the cause as far as it can be seen;
- torch DCP's ``CheckpointException``, which wraps each rank's failure during a distributed
  checkpoint save or load: the first rank's failure, mapped as above.

:class:`~megatron_sami.errors.Preempted` ends the program with exit code 75 so a batch script
can requeue itself; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import functools
import os
import re
import signal
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import NoReturn

from megatron_sami.errors import EXIT_PREEMPTED, Preempted, SamiError
from megatron_sami.io import short_write_error, storage_error
from megatron_sami.models.catalogue import model_names
from megatron_sami.resources import config_dir

EXIT_USER_ERROR = 2
FOLLOWER_WAIT_S = 60.0  # seconds a non-first process waits to be ended by its launcher


def fail(message: str) -> NoReturn:
    """Print ``error: <message>`` on stderr and exit with code 2."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(EXIT_USER_ERROR)


def is_first_process() -> bool:
    """Whether this is the first process of its launch (torchrun's RANK, srun's SLURM_PROCID),
    or the only one."""
    return os.environ.get("RANK", "0") == "0" and os.environ.get("SLURM_PROCID", "0") == "0"


def fail_once(message: str) -> NoReturn:
    """:func:`fail`, printed by the first process of a multi-process launch only.

    Every process of a launch usually meets the same error. Exiting first from another process
    would make the launcher (torchrun, srun --kill-on-bad-exit) end the first one before it has
    printed, so the others wait for the launcher to end them once the first has exited; one that
    is still alive after a generous minute (its error was its own) prints and exits.
    """
    if not is_first_process():
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a training run's handler would outlive the wait
        time.sleep(FOLLOWER_WAIT_S)
    fail(message)


def _causes(err: BaseException) -> list[BaseException]:
    """``err`` and the errors it was raised from or while handling, nearest first."""
    chain: list[BaseException] = []
    while err is not None and err not in chain and len(chain) < 16:
        chain.append(err)
        err = err.__cause__ or err.__context__
    return chain


def user_error(err: BaseException, path: Path | str | None = None) -> SamiError | None:
    """The :class:`SamiError` that describes ``err`` when a user can fix it, else None (a bug).

    Args:
        path: the output path to name when a file-system refusal does not carry its file name.
    """
    if isinstance(err, SamiError):
        return err
    failures = getattr(err, "failures", None)
    if type(err).__name__ == "CheckpointException" and isinstance(failures, dict):
        for rank in sorted(failures):  # torch DCP: {rank: (exception, traceback summary)}
            found = user_error(failures[rank][0], path)
            if found is not None:
                return found
        return None
    for cause in _causes(err):
        if isinstance(cause, OSError):
            refusal = storage_error(cause, path)
            if refusal is not None:
                return refusal
        if isinstance(cause, RuntimeError) and "unexpected pos" in str(cause):  # torch.save's short write
            return short_write_error(path)
    return None


def with_flag_names(message: str, flags: Mapping[str, str]) -> str:
    """``message`` with each Hydra key of ``flags`` (``parallel.expert``) written as the argparse
    option that sets it (``--expert``): ``parallel.expert=3`` becomes ``--expert 3``."""
    for key, flag in flags.items():
        message = re.sub(rf"\b{re.escape(key)}=([\w+-]+(?:\.\d+)?)", rf"{flag} \1", message)
        message = re.sub(rf"\b{re.escape(key)}\b", flag, message)
    return message


def _exit_preempted(stop: Preempted) -> NoReturn:
    print(f"preempted: {stop}; rerun the same command to resume.", file=sys.stderr)
    raise SystemExit(EXIT_PREEMPTED) from None


def run_main(main: Callable[[list[str] | None], int | None] | None = None, *,
             flags: Mapping[str, str] | None = None):
    """Wrap an argparse entry point ``main(argv) -> exit code`` in the error boundary (module
    docstring): a user's error becomes one line on stderr and exit code 2, :class:`Preempted`
    exit code 75. Use as ``@run_main``, or ``@run_main(flags={"parallel.expert": "--expert"})``
    so that messages name the command's own options instead of the Hydra keys."""
    if main is None:
        return functools.partial(run_main, flags=flags)

    @functools.wraps(main)
    def entry(argv: list[str] | None = None) -> int:
        try:
            code = main(argv)
        except Preempted as stop:
            _exit_preempted(stop)
        except BaseException as err:
            found = None if isinstance(err, (SystemExit, KeyboardInterrupt)) else user_error(err)
            if found is None:
                raise
            fail_once(with_flag_names(str(found), flags or {}))
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


def _check_not_taken(argv: list[str], not_taken: Mapping[str, str]) -> None:
    """A key the command does not take (``model=`` on ``sami-train``, also as ``+model=``) gets
    the command's own reason instead of Hydra's "use +model=..." or a guess at a close key."""
    for arg in argv:
        key = arg.split("=", 1)[0].lstrip("+~")
        for refused, why in not_taken.items():
            if "=" in arg and (key == refused or key.startswith(refused + ".")):
                fail(f"'{arg}': {why}")


def run_hydra_app(task: Callable, config_name: str, not_taken: Mapping[str, str] | None = None) -> None:
    """Run ``task(cfg)`` as a Hydra app over the project's ``configs/`` directory (from the
    checkout or, in a wheel install, from inside the package: see :mod:`megatron_sami.resources`),
    inside the error boundary (module docstring).

    Args:
        not_taken: top-level keys this command does not take -> why, and what to do instead.
    """
    import hydra

    _check_not_taken(sys.argv[1:], not_taken or {})
    _check_model_choice(sys.argv[1:])
    _check_composes(sys.argv[1:], config_name)

    @hydra.main(config_path=str(config_dir()), config_name=config_name, version_base="1.3")
    def _app(cfg) -> None:
        try:
            task(cfg)
        except Preempted as stop:
            _exit_preempted(stop)
        except BaseException as err:
            found = None if isinstance(err, (SystemExit, KeyboardInterrupt)) else user_error(err)
            if found is None:
                raise
            fail_once(str(found))

    _app()
