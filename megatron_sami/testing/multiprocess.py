"""Run a function as a real N-process torch.distributed job on this machine.

Used by the tests (and the benchmarks) to run Megatron code as several local ranks, exactly
as torchrun would: each process gets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``
and ``MASTER_PORT``, so the body calls the project's normal runtime.

- The backend is a parameter: ``backend="gloo"`` runs the ranks on the CPU with no GPU visible
  to them (``CUDA_VISIBLE_DEVICES=""``), on any machine; ``backend="nccl"`` gives rank r GPU r.
  Both reach the rank's runtime through ``SAMI_DIST_BACKEND``, so rank bodies that call
  ``megatron_runtime(...)`` are the same for both. Without it the runtime chooses (NCCL where
  CUDA is available).
- Results come back per rank (anything picklable); tensors come back on the CPU.
- A rank that raises is reported with its own traceback; once one rank has failed, the others
  get a short grace period and are then killed (they are usually stuck in a collective).
- A job that outlives ``timeout`` is killed and reported with the ranks that did not finish.
- Ranks are not daemonic (Megatron-Core's checkpoint writer starts processes of its own), so
  they are always killed and joined here.

Processes start from a fork server that has already imported torch and Megatron-Core, so a
job costs a fork, not a ten-second import, per rank.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import pickle
import queue as queue_module
import signal
import sys
import time
import traceback
from collections.abc import Callable, Mapping
from typing import Any

from megatron_sami.errors import DistributedJobError
from megatron_sami.runtime.distributed import BACKEND_ENV, BACKENDS, free_port
from megatron_sami.runtime.megatron_import import PRELOAD_MODULES

_PRELOAD = ["megatron_sami.runtime.quiet", "torch", "torch.distributed", *PRELOAD_MODULES]
_context: Any = None


def _mp_context():
    global _context
    if _context is None:
        # The fork server's imports ask torch whether CUDA is available (the project's import
        # hook, megatron-core's dist_checkpointing/strategies/torch.py, torch's cpp_extension);
        # by default that asks the CUDA runtime, which makes every forked rank fail to initialise
        # CUDA ("Cannot re-initialize CUDA in forked subprocess"). NVML answers without that, and
        # counts only the devices CUDA_VISIBLE_DEVICES shows, so a gloo rank that hides them sees
        # none. Set, not defaulted: the server cannot work without it.
        os.environ["PYTORCH_NVML_BASED_CUDA_CHECK"] = "1"
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
        if env.get(BACKEND_ENV) == "nccl" and _cuda_unusable_after_fork():
            raise DistributedJobError(
                "CUDA was initialised in the fork server before this rank was forked, so the rank cannot use "
                "it (NVML, which the server asks instead, is unavailable here?); run GPU jobs where "
                "nvidia-smi works, or with backend='gloo'.")
        value = fn(*args)
    except BaseException:  # noqa: BLE001 - every failure must reach the parent
        results.put((rank, False, traceback.format_exc()))
        return
    try:
        # Plain pickle: tensors travel by value, not as shared-memory handles that die with the rank.
        results.put((rank, True, pickle.dumps(_on_cpu(value))))
    except Exception:  # noqa: BLE001 - an unpicklable result is a failure of this rank
        results.put((rank, False, "result could not be sent to the parent:\n" + traceback.format_exc()))


def _cuda_unusable_after_fork() -> bool:
    """Whether this forked process inherited an initialised CUDA context. Private API of torch
    2.13 (``torch.cuda._is_in_bad_fork``)."""
    torch = sys.modules.get("torch")
    return torch is not None and torch.cuda._is_in_bad_fork()


def _on_cpu(value: Any) -> Any:
    """``value`` with its GPU tensors (also inside lists, tuples and dicts) moved to the CPU, so
    the parent compares NCCL results with CPU references and never initialises CUDA itself."""
    torch = sys.modules.get("torch")
    if torch is None:
        return value
    if isinstance(value, torch.Tensor):
        return value if value.device.type == "cpu" else value.cpu()
    if isinstance(value, dict):
        return {key: _on_cpu(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        items = [_on_cpu(item) for item in value]
        return type(value)(*items) if hasattr(value, "_fields") else type(value)(items)
    return value


def _rank_env(env: Mapping[str, str] | None, backend: str | None) -> dict[str, str]:
    """The variables every rank adds to its environment: the caller's, then the backend's."""
    rank_env = dict(env or {})
    if backend is None:
        return rank_env
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)} (or None for the runtime's choice), "
                         f"got {backend!r}")
    rank_env[BACKEND_ENV] = backend
    if backend == "gloo":
        # The CPU lane, also on a GPU machine: a CUDA call that escapes the CPU layer fails as it
        # would without GPUs, instead of quietly putting a tensor on a GPU.
        rank_env["CUDA_VISIBLE_DEVICES"] = ""
    return rank_env


def run_distributed(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    timeout: float = 300.0,
    grace: float = 15.0,
    env: Mapping[str, str] | None = None,
    backend: str | None = None,
) -> list[Any]:
    """Run ``fn(*args)`` in ``world_size`` processes; return the per-rank results in rank order.

    ``fn`` must be importable by name (a module-level function); ``env`` adds variables to each
    rank's environment. ``backend`` ("gloo", "nccl", or None for the runtime's default) reaches
    the ranks' runtime; under "gloo" no GPU is visible to them, under "nccl" rank r uses GPU r.
    ``timeout`` and ``grace`` are in seconds. Tensors in the results are on the CPU.

    Raises:
        ValueError: ``world_size`` outside 1..8 or an unknown ``backend``.
        DistributedJobError: naming every rank that failed, crashed or hung, with its traceback.
    """
    if not 1 <= world_size <= 8:
        raise ValueError(f"world_size must be between 1 and 8, got {world_size}")
    env = _rank_env(env, backend)
    ctx = _mp_context()
    results = ctx.Queue()
    port = free_port()
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
