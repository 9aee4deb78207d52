"""Run a function as a real N-process torch.distributed job on this machine.

Used by the tests (and the benchmarks) to run Megatron code as several local ranks under
gloo, exactly as torchrun would: each process gets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR`` and ``MASTER_PORT``, so the body calls the project's normal runtime.

- Results come back per rank (anything picklable).
- A rank that raises is reported with its own traceback; once one rank has failed, the others
  get a short grace period and are then killed (they are usually stuck in a collective).
- A job that outlives ``timeout`` is killed and reported with the ranks that did not finish.
- Ranks are not daemonic (megatron-core's checkpoint writer starts processes of its own), so
  they are always killed and joined here.

Processes start from a fork server that has already imported torch and megatron-core, so a
job costs a fork, not a ten-second import, per rank.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import pickle
import queue as queue_module
import signal
import time
import traceback
from collections.abc import Callable, Mapping
from typing import Any

from megatron_sami.runtime.distributed import free_port

_PRELOAD = ["megatron_sami.runtime.quiet", "torch", "torch.distributed", "megatron.core", "megatron.core.models.gpt",
            "megatron.core.optimizer", "megatron.core.dist_checkpointing"]
_context: Any = None


class DistributedJobError(AssertionError):
    """One or more ranks failed or hung; the message holds each rank's report."""


def _mp_context():
    global _context
    if _context is None:
        if "forkserver" in mp.get_all_start_methods():
            _context = mp.get_context("forkserver")
            _context.set_forkserver_preload(_PRELOAD)
        else:
            _context = mp.get_context("spawn")
    return _context


def _child(rank: int, world_size: int, port: int, env: Mapping[str, str], results, fn, args) -> None:
    # Own process group: helpers the rank starts (checkpoint writers) are cleaned up with it.
    os.setpgid(0, 0)
    os.environ.update(env)
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
    )
    try:
        value = fn(*args)
    except BaseException:  # noqa: BLE001 - every failure must reach the parent
        results.put((rank, False, traceback.format_exc()))
        return
    try:
        # Plain pickle: tensors travel by value, not as shared-memory handles that die with the rank.
        results.put((rank, True, pickle.dumps(value)))
    except Exception:  # noqa: BLE001 - an unpicklable result is a failure of this rank
        results.put((rank, False, "result could not be sent to the parent:\n" + traceback.format_exc()))


def run_distributed(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    timeout: float = 300.0,
    grace: float = 15.0,
    env: Mapping[str, str] | None = None,
) -> list[Any]:
    """Run ``fn(*args)`` in ``world_size`` processes; return the per-rank results in rank order.

    ``fn`` must be importable by name (a module-level function). Raises
    :class:`DistributedJobError` naming every rank that failed, crashed or hung.
    """
    if not 1 <= world_size <= 8:
        raise ValueError(f"world_size must be between 1 and 8, got {world_size}")
    ctx = _mp_context()
    results = ctx.Queue()
    port = free_port()
    env = dict(env or {})
    processes = [
        ctx.Process(target=_child, args=(rank, world_size, port, env, results, fn, args), daemon=False)
        for rank in range(world_size)
    ]
    for process in processes:
        process.start()
    outcomes: dict[int, tuple[bool, Any]] = {}
    deadline = time.monotonic() + timeout
    failure_deadline: float | None = None
    while len(outcomes) < world_size:
        now = time.monotonic()
        limit = deadline if failure_deadline is None else min(deadline, failure_deadline)
        if now >= limit:
            break
        try:
            rank, ok, value = results.get(timeout=min(1.0, limit - now))
        except queue_module.Empty:
            # A rank that died without reporting (segfault, os._exit) is a failure too.
            for rank, process in enumerate(processes):
                if rank not in outcomes and not process.is_alive() and results.empty():
                    outcomes[rank] = (False, f"process exited with code {process.exitcode} without a result")
            if failure_deadline is None and any(not ok for ok, _ in outcomes.values()):
                failure_deadline = time.monotonic() + grace
            continue
        outcomes[rank] = (ok, pickle.loads(value) if ok else value)
        if not ok and failure_deadline is None:
            failure_deadline = time.monotonic() + grace
    _stop(processes, wait=grace if len(outcomes) == world_size else 0.0)
    results.close()
    return _collect(outcomes, world_size, timed_out=time.monotonic() >= deadline, timeout=timeout)


def _stop(processes: list, wait: float) -> None:
    """Let finished ranks exit on their own for up to ``wait`` s, then kill what is left."""
    deadline = time.monotonic() + wait
    for process in processes:
        process.join(timeout=max(0.0, deadline - time.monotonic()))
    for process in processes:
        if process.pid is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(process.pid, signal.SIGKILL)
        process.join(timeout=10)


def _collect(outcomes: dict[int, tuple[bool, Any]], world_size: int, timed_out: bool, timeout: float) -> list[Any]:
    if len(outcomes) == world_size and all(ok for ok, _ in outcomes.values()):
        return [outcomes[rank][1] for rank in range(world_size)]
    reports = []
    for rank in range(world_size):
        if rank not in outcomes:
            why = f"did not finish within {timeout:.0f} s (killed)" if timed_out else \
                "killed after another rank failed (probably waiting in a collective)"
            reports.append(f"--- rank {rank}: {why}")
        elif not outcomes[rank][0]:
            reports.append(f"--- rank {rank} failed:\n{outcomes[rank][1]}")
    raise DistributedJobError(f"distributed job with {world_size} ranks failed:\n" + "\n".join(reports))
