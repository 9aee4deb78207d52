"""The multi-process harness reports every rank's fate; the CPU layer does what it promises."""

import pytest

from megatron_sami.testing.multiprocess import DistributedJobError, run_distributed

import harness_jobs as jobs


@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_results_come_back_in_rank_order_from_a_real_gloo_job(world_size):
    results = run_distributed(jobs.rank_and_world, world_size)
    expected_sum = world_size * (world_size + 1) // 2
    assert results == [(rank, expected_sum) for rank in range(world_size)]


def test_a_failing_rank_is_reported_with_its_traceback_and_its_stuck_peer_is_killed():
    with pytest.raises(DistributedJobError) as failure:
        run_distributed(jobs.fail_on_rank_one, 2, timeout=120, grace=2)
    report = str(failure.value)
    assert "rank 1 failed" in report and "ValueError: rank one was told to fail" in report
    assert "rank 0: killed after another rank failed" in report


def test_a_hung_job_is_killed_at_the_timeout():
    with pytest.raises(DistributedJobError, match="rank 0: did not finish within 3 s"):
        run_distributed(jobs.hang, 1, timeout=3)


def test_a_rank_that_dies_without_a_result_is_a_failure():
    with pytest.raises(DistributedJobError, match="exited with code 3"):
        run_distributed(jobs.die_without_result, 1, timeout=60, grace=1)


def test_cpu_layer_redirects_cuda_calls_to_the_cpu():
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("the CPU layer is never active on a GPU machine")
    (report,) = run_distributed(jobs.cuda_calls_under_the_cpu_layer, 1)
    assert report["active"] is True
    assert report["devices"] == {"cpu"}
    assert report["type_name"] == "torch.cuda.FloatTensor"
    assert report["bf16_type_name"] == "torch.cuda.BFloat16Tensor"
    assert report["rng_replays"] is True
    assert report["backward_grad"] == [2.0, 2.0]


def test_cpu_layer_is_never_active_when_cuda_is_available():
    (report,) = run_distributed(jobs.layer_inactive_when_cuda_is_available, 1)
    assert report == {"active": False, "untouched": True, "type_name": "torch.FloatTensor"}


def test_deferred_compile_compiles_each_function_once_at_its_first_call():
    from megatron_sami.runtime.megatron_import import deferred_compile

    compiled = []

    def fake_compile(fn, **options):
        compiled.append((fn.__name__, options))
        return lambda *args: ("compiled", fn(*args))

    compile_later = deferred_compile(fake_compile)

    @compile_later
    def double(x):
        return 2 * x

    @compile_later(mode="max-autotune")
    def negate(x):
        return -x

    assert compiled == [] and double.__name__ == "double"
    assert double(3) == ("compiled", 6) and double(4) == ("compiled", 8)
    assert negate(5) == ("compiled", -5)
    assert compiled == [("double", {}), ("negate", {"mode": "max-autotune"})]


_IMPORT_PROBE = """
import atexit, gc, sys
import megatron_sami
import torch
import megatron.core
from megatron.core.models.gpt import GPTModel
from megatron.core.jit import jit_fuser
atexit._run_exitfuncs()
print(sorted(name for name in ("torch._dynamo", "torch._inductor") if name in sys.modules),
      jit_fuser is torch.compile, torch.compile.__module__, gc.get_freeze_count() > 0)
"""


def test_megatron_imports_without_dynamo_or_inductor_on_cpu_and_freezes_objects_at_exit():
    """On CPU, megatron-core's import-time ``torch.compile`` decorators are deferred (they pulled
    in torch._dynamo and torch._inductor: 1.6 s per process); torch.compile itself is restored."""
    import subprocess
    import sys

    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("the deferral applies only without CUDA")
    result = subprocess.run([sys.executable, "-c", _IMPORT_PROBE], capture_output=True, text=True, check=True)
    assert result.stdout.split("\n")[-2] == "[] False torch True"


def test_the_backend_reaches_every_rank_and_gloo_ranks_see_no_gpu():
    assert run_distributed(jobs.backend_variables, 2, backend="gloo") == [
        {"SAMI_DIST_BACKEND": "gloo", "CUDA_VISIBLE_DEVICES": ""}] * 2
    with pytest.raises(ValueError, match="backend must be one of nccl, gloo"):
        run_distributed(jobs.backend_variables, 1, backend="mpi")


def test_results_keep_their_containers_and_come_back_on_the_cpu():
    (result,) = run_distributed(jobs.tensors_in_containers, 1)
    assert type(result["pair"]).__name__ == "Pair" and result["plain"] == "text"
    assert result["pair"].first.tolist() == [1.0, 1.0] and result["pair"].second[1] == 3
    assert result["pair"].first.device.type == "cpu"


def test_gloo_runs_on_the_cpu_where_a_gpu_is_visible():
    (report,) = run_distributed(jobs.gloo_on_a_machine_that_shows_a_gpu, 1)
    assert "already used CUDA" in report.pop("refused")
    assert report == {"device": "cpu", "backend": "gloo", "layer": True, "cuda_visible": False,
                      "tensor_device": "cpu", "dist_backend": "gloo"}
