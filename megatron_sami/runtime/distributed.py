"""Process setup: the launcher's variables -> torch.distributed -> Megatron parallel state.

The one place that initialises and tears down distributed state, for every entry point
(trainer, converter, tests, demo). Works under torchrun, under ``srun`` (one task per GPU)
and as a single plain process.

The backend decides the device: NCCL runs on this rank's GPU; gloo runs on the CPU with the
compatibility layer of :mod:`megatron_sami.runtime.cpu_compat`, installed before megatron-core
is used, also on a machine with GPUs (they are hidden from the process). By default NCCL is
chosen when CUDA is available and gloo otherwise; ``initialize(backend=...)`` or the variable
``SAMI_DIST_BACKEND`` (how a launcher or the test harness picks it for rank code it does not
edit) choose explicitly.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import random
import re
import socket
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

from megatron_sami.errors import EnvironmentSetupError
from megatron_sami.runtime import quiet
from megatron_sami.runtime.layout import ModelShape, ParallelConfig

logger = logging.getLogger("megatron_sami")

BACKEND_ENV = "SAMI_DIST_BACKEND"
BACKENDS = ("nccl", "gloo")


@dataclass(frozen=True)
class LaunchEnv:
    """Who this process is, as the launcher told it."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    master_addr: str
    master_port: int
    launcher: str  # "torchrun" | "slurm" | "single"


def parse_slurm_nodelist(nodelist: str) -> list[str]:
    """Expand a Slurm hostlist such as ``gpu[01-03,07],login1`` into host names."""
    hosts: list[str] = []
    for match in re.finditer(r"([^,\[]+)(?:\[([^\]]*)\])?", nodelist):
        prefix, ranges = match.group(1), match.group(2)
        if ranges is None:
            hosts.append(prefix)
            continue
        for part in ranges.split(","):
            low, _, high = part.partition("-")
            if not high:
                hosts.append(prefix + low)
                continue
            width = len(low)
            hosts.extend(f"{prefix}{number:0{width}d}" for number in range(int(low), int(high) + 1))
    return hosts


def _int(environ: Mapping[str, str], name: str) -> int:
    try:
        return int(environ[name])
    except ValueError as err:
        raise EnvironmentSetupError(f"environment variable {name}={environ[name]!r} is not an integer.") from err


def launch_env_from(environ: Mapping[str, str]) -> LaunchEnv:
    """Read torchrun variables, else those of an ``srun`` step, else run as one process.

    Raises:
        EnvironmentSetupError: a launcher's variables are incomplete or not integers (the message
            names the variable).
    """
    if "RANK" in environ and "WORLD_SIZE" in environ:
        for name in ("MASTER_ADDR", "MASTER_PORT"):
            if name not in environ:
                raise EnvironmentSetupError(f"RANK and WORLD_SIZE are set but {name} is not; launch with torchrun.")
        world_size = _int(environ, "WORLD_SIZE")
        return LaunchEnv(
            rank=_int(environ, "RANK"),
            world_size=world_size,
            local_rank=_int(environ, "LOCAL_RANK") if "LOCAL_RANK" in environ else 0,
            local_world_size=_int(environ, "LOCAL_WORLD_SIZE") if "LOCAL_WORLD_SIZE" in environ else world_size,
            master_addr=environ["MASTER_ADDR"],
            master_port=_int(environ, "MASTER_PORT"),
            launcher="torchrun",
        )
    # SLURM_STEP_NUM_TASKS exists only inside an srun step; a batch script running python
    # directly sees SLURM_NTASKS of the whole allocation and must not wait for peers.
    if "SLURM_PROCID" in environ and "SLURM_STEP_NUM_TASKS" in environ:
        nodelist = environ.get("SLURM_STEP_NODELIST") or environ.get("SLURM_JOB_NODELIST", "")
        hosts = parse_slurm_nodelist(nodelist) if nodelist else []
        master_addr = environ.get("MASTER_ADDR") or (hosts[0] if hosts else "")
        if not master_addr:
            raise EnvironmentSetupError("cannot find the master node: set MASTER_ADDR or run inside an allocation.")
        job_id = _int(environ, "SLURM_JOB_ID") if "SLURM_JOB_ID" in environ else 0
        world_size = _int(environ, "SLURM_STEP_NUM_TASKS")
        num_nodes = max(1, len(hosts))
        return LaunchEnv(
            rank=_int(environ, "SLURM_PROCID"),
            world_size=world_size,
            local_rank=_int(environ, "SLURM_LOCALID") if "SLURM_LOCALID" in environ else 0,
            local_world_size=max(1, world_size // num_nodes),
            master_addr=master_addr,
            master_port=_int(environ, "MASTER_PORT") if "MASTER_PORT" in environ else 20000 + job_id % 20000,
            launcher="slurm",
        )
    return LaunchEnv(0, 1, 0, 1, "127.0.0.1", free_port(), "single")


def free_port() -> int:
    """A TCP port that was free a moment ago on the loopback interface."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass(frozen=True)
class RuntimeInfo:
    """What the rest of the program needs to know about its place in the job."""

    launch: LaunchEnv
    parallel: ParallelConfig
    data_parallel_size: int
    device: str  # "cuda" | "cpu"
    backend: str  # "nccl" | "gloo"

    @property
    def rank(self) -> int:
        """This process's global rank."""
        return self.launch.rank

    @property
    def is_rank0(self) -> bool:
        """Whether this process is global rank 0 (the one that writes shared files)."""
        return self.launch.rank == 0


def setup_logging(rank: int) -> None:
    """Rank 0 logs at INFO; other ranks only warnings and errors, prefixed with their rank."""
    level = logging.INFO if rank == 0 else logging.WARNING
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter(f"[%(asctime)s rank{rank}] %(message)s", datefmt="%H:%M:%S"))
    root = logging.getLogger("megatron_sami")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False


def seed_everything(seed: int) -> None:
    """Megatron's convention: offset by pipeline rank, then the model-parallel RNG tracker."""
    import numpy as np
    import torch
    from megatron.core import parallel_state, tensor_parallel

    stage_seed = seed + 100 * parallel_state.get_pipeline_model_parallel_rank()
    random.seed(stage_seed)
    np.random.seed(stage_seed)
    torch.manual_seed(stage_seed)
    tensor_parallel.model_parallel_cuda_manual_seed(stage_seed)


def choose_backend(backend: str | None = None, environ: Mapping[str, str] | None = None) -> str:
    """The torch.distributed backend of this process: ``"nccl"`` (GPU) or ``"gloo"`` (CPU).

    ``backend`` wins, then the ``SAMI_DIST_BACKEND`` variable of ``environ`` (default
    ``os.environ``), then NCCL when CUDA is available and gloo otherwise.

    Raises:
        EnvironmentSetupError: the name is neither nccl nor gloo, or NCCL is asked for where no
            GPU is visible.
    """
    import torch

    environ = os.environ if environ is None else environ
    chosen = backend or environ.get(BACKEND_ENV) or ("nccl" if torch.cuda.is_available() else "gloo")
    if chosen not in BACKENDS:
        raise EnvironmentSetupError(
            f"unknown torch.distributed backend {chosen!r} (from the argument or ${BACKEND_ENV}); "
            "use 'nccl' (GPUs) or 'gloo' (CPU)."
        )
    if chosen == "nccl" and not torch.cuda.is_available():
        raise EnvironmentSetupError(
            "backend 'nccl' needs a CUDA GPU and none is visible; use backend 'gloo' (the CPU lane) "
            "or run on a GPU node."
        )
    return chosen


def local_device_index(local_rank: int, device_count: int) -> int:
    """The GPU (index among the visible ones) of the process with this local rank.

    Where the launcher shows each task only its own GPU (``srun --gpus-per-task=1`` or a site's
    ``--gpu-bind``: ``CUDA_VISIBLE_DEVICES`` holds one device), that GPU is index 0 whatever the
    local rank; otherwise local rank ``r`` uses visible GPU ``r``.

    Raises:
        EnvironmentSetupError: no GPU is visible, or more local ranks than visible GPUs.
    """
    if device_count == 1:
        return 0
    if local_rank >= device_count:
        raise EnvironmentSetupError(
            f"local rank {local_rank} has no GPU ({device_count} visible); "
            "launch at most one process per GPU, or use backend 'gloo' (CPU)."
        )
    return local_rank


def _bind_device(backend: str, launch: LaunchEnv) -> str:
    """Put this process on the backend's device; returns ``"cuda"`` or ``"cpu"``.

    Under gloo the CPU layer is installed with the GPUs hidden, so every reader of
    ``torch.cuda.is_available()`` (model builder, precision check, step timer) takes the CPU
    path, as on a machine without GPUs.
    """
    import torch

    if backend == "nccl":
        torch.cuda.set_device(local_device_index(launch.local_rank, torch.cuda.device_count()))
        return "cuda"
    from megatron_sami.runtime import cpu_compat

    cpu_compat.install(hide_cuda=True)
    # Share the cores between the local ranks instead of oversubscribing them.
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // launch.local_world_size))
    return "cpu"


def die_with_launcher(environ: Mapping[str, str]) -> None:
    """Under torchrun, end this process when torchrun ends. torchrun starts each worker in a
    process session of its own, so killing the launching program's process group (kill -9 of
    ``sami-iterate``, a batch script's cleanup) would leave the workers training, and a rerun would
    find a second trainer in the run directory. Linux ``prctl(PR_SET_PDEATHSIG, SIGKILL)``: the
    kernel kills this process when the thread that started it (torchrun's main thread) exits.
    Under srun, slurmstepd owns the tasks and ends them with the step; elsewhere nothing is done."""
    if "TORCHELASTIC_RUN_ID" not in environ or not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    pr_set_pdeathsig = 1
    parent = os.getppid()
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0) != 0:
        logger.warning("could not tie this worker's life to torchrun's (prctl errno %d)", ctypes.get_errno())
    if parent == 1 or os.getppid() != parent:  # torchrun ended before the request took effect
        os._exit(1)


def initialize(
    parallel: ParallelConfig,
    model: ModelShape | None = None,
    seed: int = 1234,
    seq_length: int | None = None,
    environ: Mapping[str, str] | None = None,
    timeout_minutes: int = 10,
    backend: str | None = None,
) -> RuntimeInfo:
    """Initialise torch.distributed and Megatron's parallel state for this process.

    ``model`` (a ``ModelConfig``), when given, is checked against the layout first.
    ``environ`` (default ``os.environ``) holds the launcher's variables and
    ``SAMI_DIST_BACKEND``; ``backend`` ("nccl" or "gloo", see :func:`choose_backend`) also
    decides the device: NCCL uses the GPU of the local rank, gloo the CPU.

    Raises:
        LayoutError: the layout does not fit the world size or the model.
        EnvironmentSetupError: bad launcher variables, an unknown backend, NCCL without a GPU,
            a local rank without a GPU of its own, or gloo after this process already used CUDA.
    """
    import torch.distributed as dist
    from megatron.core import parallel_state

    quiet.install()
    environ = os.environ if environ is None else environ
    launch = launch_env_from(environ)
    data_parallel_size = (parallel.validate(model, launch.world_size, seq_length) if model is not None
                          else parallel.data_parallel_size(launch.world_size))
    setup_logging(launch.rank)
    die_with_launcher(environ)
    # Megatron's tensor-parallel overlap relies on in-order kernel launches; must precede CUDA init.
    os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")
    backend = choose_backend(backend, environ)
    device = _bind_device(backend, launch)
    if not dist.is_initialized():
        dist.init_process_group(
            backend=backend,
            init_method=f"tcp://{launch.master_addr}:{launch.master_port}",
            rank=launch.rank,
            world_size=launch.world_size,
            timeout=datetime.timedelta(minutes=timeout_minutes),
        )
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=parallel.tensor,
        pipeline_model_parallel_size=parallel.pipeline,
        expert_model_parallel_size=parallel.expert,
        context_parallel_size=parallel.context,
        distributed_timeout_minutes=timeout_minutes,
    )
    seed_everything(seed)
    info = RuntimeInfo(launch, parallel, data_parallel_size, device, backend)
    logger.info(
        "runtime: %s world=%d TP=%d PP=%d EP=%d CP=%d DP=%d backend=%s device=%s",
        launch.launcher, launch.world_size, parallel.tensor, parallel.pipeline, parallel.expert,
        parallel.context, data_parallel_size, backend, info.device,
    )
    return info


def collective_device():
    """Where small tensors must be for a collective: the current GPU under NCCL (which cannot
    reduce CPU tensors), the CPU under gloo."""
    import torch
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def teardown() -> None:
    """Destroy Megatron's groups and the default process group (safe to call twice)."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def megatron_runtime(parallel: ParallelConfig, **kwargs) -> Iterator[RuntimeInfo]:
    """``with megatron_runtime(ParallelConfig(tensor=2), backend="gloo") as info: ...``: :func:`initialize`
    (same keyword arguments, same errors) on entry, :func:`teardown` on exit."""
    info = initialize(parallel, **kwargs)
    try:
        yield info
    finally:
        teardown()
