"""One writer per run directory: an advisory lock held for as long as a process works in it.

``sami-train`` and ``sami-iterate`` take the lock of their run directory before they write
anything in it; a second start on the same directory is refused with the holder's host, pid
and start time. The lock is ``fcntl.flock`` on ``<run_dir>/.lock``: the kernel releases it when
the holder exits by any means (kill -9 included), so a stale file never blocks a rerun; the
file's content only says who holds it. On network file systems flock needs the file system's
support (Lustre: the ``flock`` mount option; NFSv4 maps it to byte-range locks).
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path

from megatron_sami.errors import RunInUse

LOCK_NAME = ".lock"


class RunLock:
    """The lock of one run directory (a context manager; :meth:`acquire` / :meth:`release`)."""

    def __init__(self, run_dir: str | Path, holder: str) -> None:
        """``holder`` names the program in the refusal a second start gets (e.g. ``sami-train``)."""
        self.path = Path(run_dir) / LOCK_NAME
        self.holder = holder
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        """Take the lock without waiting (creates the run directory if needed).

        Raises:
            RunInUse: another process holds it; the message names it and what to do.
        """
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _describe(os.pread(fd, 4096, 0))
            os.close(fd)
            raise RunInUse(f"{self.path.parent} is in use by {holder}; wait for it to finish or stop it, "
                           f"or use another run directory.") from None
        record = {"program": self.holder, "host": socket.gethostname(), "pid": os.getpid(),
                  "since": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "command": " ".join(sys.argv)[:500]}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        """Give the lock up (the holder record stays; it is only read while the lock is held)."""
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _describe(content: bytes) -> str:
    try:
        record = json.loads(content.decode())
        return f"{record['program']} (pid {record['pid']} on {record['host']}, since {record['since']})"
    except (ValueError, KeyError, TypeError):
        return "another process (its lock file names no holder yet)"
