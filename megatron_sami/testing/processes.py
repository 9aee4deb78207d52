"""Waiting for killed runs to be gone: their processes and their run-directory locks.

A killed process drops out of ``/proc/<pid>/cmdline`` (its memory is released) a moment before its
files, flock locks included, are closed, so "no process names the run directory" does not yet
mean "the lock is free". Tests that kill a run and rerun it wait on both.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from pathlib import Path

import psutil

from megatron_sami.errors import RunInUse
from megatron_sami.runlock import RunLock


def processes_naming(path: Path) -> list[psutil.Process]:
    """Live processes whose command line contains ``path``."""
    return [p for p in psutil.process_iter(["cmdline"]) if str(path) in " ".join(p.info["cmdline"] or [])]


def lock_is_free(run_dir: Path) -> bool:
    """Whether :class:`RunLock` of ``run_dir`` can be taken now (taken and released at once)."""
    try:
        RunLock(run_dir, "test").acquire().release()
    except RunInUse:
        return False
    return True


def wait_until_gone(run_dir: Path, lock_dirs: Iterable[Path] = (), timeout_s: float = 300.0) -> None:
    """Wait until no process names ``run_dir`` and the lock of each of ``lock_dirs`` is free.

    Raises:
        AssertionError: after ``timeout_s`` seconds, naming the processes or locks still there.
    """
    lock_dirs = list(lock_dirs)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not processes_naming(run_dir) and all(lock_is_free(d) for d in lock_dirs if (d / ".lock").exists()):
            return
        time.sleep(0.2)
    alive = [p.info["cmdline"] for p in processes_naming(run_dir)]
    held = [str(d) for d in lock_dirs if (d / ".lock").exists() and not lock_is_free(d)]
    raise AssertionError(f"still running after {timeout_s:.0f} s: {alive}; locks still held: {held}")
