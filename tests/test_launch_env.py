"""Reading the launcher's variables: torchrun, srun steps, single process."""

import pytest

from megatron_sami.errors import EnvironmentSetupError
from megatron_sami.runtime.distributed import (
    choose_backend,
    launch_env_from,
    local_device_index,
    parse_slurm_nodelist,
)


@pytest.mark.parametrize(
    ("nodelist", "hosts"),
    [
        ("n1", ["n1"]),
        ("n[1-2]", ["n1", "n2"]),
        ("gpu[01-03,07],login1", ["gpu01", "gpu02", "gpu03", "gpu07", "login1"]),
        ("a[8-10]", ["a8", "a9", "a10"]),
        ("x[1,3],y[2-3]", ["x1", "x3", "y2", "y3"]),
    ],
)
def test_slurm_nodelist_expansion(nodelist, hosts):
    assert parse_slurm_nodelist(nodelist) == hosts


def test_torchrun_variables():
    env = launch_env_from({"RANK": "5", "WORLD_SIZE": "16", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "8",
                           "MASTER_ADDR": "node7", "MASTER_PORT": "29500"})
    assert (env.rank, env.world_size, env.local_rank, env.local_world_size) == (5, 16, 1, 8)
    assert (env.master_addr, env.master_port, env.launcher) == ("node7", 29500, "torchrun")


def test_srun_step_variables_give_rank_world_and_master_from_nodelist():
    env = launch_env_from({"SLURM_PROCID": "9", "SLURM_LOCALID": "1", "SLURM_STEP_NUM_TASKS": "16",
                           "SLURM_NTASKS": "16", "SLURM_STEP_NODELIST": "gpu[03-04]", "SLURM_JOB_ID": "4242"})
    assert (env.rank, env.world_size, env.local_rank, env.local_world_size) == (9, 16, 1, 8)
    assert env.master_addr == "gpu03"
    assert env.master_port == 20000 + 4242
    assert env.launcher == "slurm"


def test_batch_script_without_srun_runs_as_one_process():
    # Inside sbatch but outside srun: SLURM_NTASKS is the allocation's, not this process's world.
    env = launch_env_from({"SLURM_PROCID": "0", "SLURM_NTASKS": "16", "SLURM_JOB_NODELIST": "n[1-2]"})
    assert (env.world_size, env.launcher) == (1, "single")


def test_torchrun_wins_over_slurm_and_needs_master_address():
    env = launch_env_from({"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "h", "MASTER_PORT": "1",
                           "SLURM_PROCID": "3", "SLURM_STEP_NUM_TASKS": "8"})
    assert env.launcher == "torchrun"
    with pytest.raises(EnvironmentSetupError, match="MASTER_ADDR"):
        launch_env_from({"RANK": "0", "WORLD_SIZE": "2", "MASTER_PORT": "1"})


def test_non_integer_rank_is_a_clear_error():
    with pytest.raises(EnvironmentSetupError, match="RANK='x'"):
        launch_env_from({"RANK": "x", "WORLD_SIZE": "2", "MASTER_ADDR": "h", "MASTER_PORT": "1"})


def test_backend_from_argument_then_variable_then_hardware():
    torch = pytest.importorskip("torch")
    assert choose_backend("gloo", {"SAMI_DIST_BACKEND": "nccl"}) == "gloo"
    assert choose_backend(None, {"SAMI_DIST_BACKEND": "gloo"}) == "gloo"
    assert choose_backend(None, {}) == ("nccl" if torch.cuda.is_available() else "gloo")
    with pytest.raises(EnvironmentSetupError, match="unknown torch.distributed backend 'mpi'"):
        choose_backend(None, {"SAMI_DIST_BACKEND": "mpi"})


def test_nccl_without_a_gpu_names_the_cpu_backend():
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible: NCCL is allowed here")
    with pytest.raises(EnvironmentSetupError, match="backend 'gloo'"):
        choose_backend("nccl", {})


@pytest.mark.parametrize(("local_rank", "device_count", "device"), [
    (0, 8, 0), (5, 8, 5),  # every GPU of the node visible: the local rank picks one
    (5, 1, 0), (0, 1, 0),  # one GPU per task (srun --gpus-per-task=1, CUDA_VISIBLE_DEVICES=<its GPU>)
])
def test_local_device_is_the_local_rank_or_the_one_visible_gpu(local_rank, device_count, device):
    assert local_device_index(local_rank, device_count) == device


@pytest.mark.parametrize(("local_rank", "device_count"), [(2, 2), (0, 0)])
def test_a_local_rank_without_a_gpu_is_a_clear_error(local_rank, device_count):
    with pytest.raises(EnvironmentSetupError, match=f"local rank {local_rank} has no GPU"):
        local_device_index(local_rank, device_count)


AWKWARD = ["/runs/a b", "/runs/it's", "/runs/a,b", "/runs/café", "/runs/日本", 'q"x', "back\\slash", "end\\",
           "x${y}", "a\\'b", "[1]", "null", "1.5", "key=value", "%j"]


@pytest.mark.parametrize("value", AWKWARD)
def test_an_override_reaches_the_program_unchanged(value):
    """What sami-train's Hydra makes of the driver's override: spaces, quotes, commas (no sweep),
    non-ASCII (no JSON escape), interpolation syntax, backslashes."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf import OmegaConf

    from megatron_sami.iteration.driver import override

    parsed = OverridesParser.create().parse_override(override("run_dir", value))
    config = OmegaConf.create({"run_dir": None})
    config.run_dir = parsed.value()
    assert OmegaConf.to_container(config, resolve=True)["run_dir"] == value


def test_the_launcher_prefix_is_an_argument_list_and_logs_per_phase_and_attempt(monkeypatch):
    from megatron_sami.errors import ConfigError
    from megatron_sami.iteration.driver import LauncherConfig

    run = "/scratch/my run, it's/café 100%"
    launcher = LauncherConfig(prefix=["srun", "--nodes=2", f"--container-mounts={run}:{run}"],
                              python="python3", log_dir=f"{run}/logs")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    assert launcher.command("megatron_sami.cli.train", ["a=1"], "iter2/train") == [
        "srun", "--nodes=2", f"--container-mounts={run}:{run}",
        "--output=/scratch/my run, it's/café 100%%/logs/iter2-train-%j.1-rank%t.log", "--open-mode=append",
        "python3", "-m", "megatron_sami.cli.train", "a=1"]
    # the old string form is still read (split as a shell would)
    old = LauncherConfig(prefix="srun --kill-on-bad-exit=1")
    assert old.command("m", [])[:2] == ["srun", "--kill-on-bad-exit=1"]
    with pytest.raises(ConfigError, match="list of arguments"):
        LauncherConfig(prefix={"srun": 1})
    with pytest.raises(ConfigError, match="needs launcher.prefix"):
        LauncherConfig(log_dir="/logs")
