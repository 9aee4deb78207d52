"""The GPU lane's checks that a CPU can make (issue 15): one checkpoint key set for the local and
Transformer Engine specs, loading across lanes, damaged checkpoints named, Transformer Engine
detected as megatron-core detects it, a fork server that leaves CUDA alone, and ``verify``
refusing an HF model of another architecture.

The TE lane is built with CPU stand-ins for megatron-core's TE wrappers; ``te_lane_jobs`` says
what that trusts. ``tests/test_gpu.py`` repeats the key comparison with the real TE modules.
"""

import json
import logging
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from megatron_sami.errors import ConversionError
from megatron_sami.models import build
from megatron_sami.models.catalogue import load_model_config
from megatron_sami.models.checkpoint import damaged_file
from megatron_sami.resources import config_dir
from megatron_sami.testing.multiprocess import run_distributed

import te_lane_jobs as jobs

REPO = Path(__file__).resolve().parents[1]
CATALOGUE = sorted(path.stem for path in (config_dir() / "model").glob("*.yaml"))


@pytest.mark.slow
def test_local_and_te_specs_write_one_key_set_for_every_catalogue_model():
    """Same checkpoint keys and global shapes on both lanes; TE adds only ``_extra_state``
    entries (before issue 15 Mixtral's MoE norm was ``mlp.linear_fc1.layer_norm_weight`` on the
    local lane and ``pre_mlp_layernorm.weight`` on TE)."""
    (entries,) = run_distributed(jobs.catalogue_entries, 1, CATALOGUE, backend="gloo")
    assert sorted(entries) == CATALOGUE and len(CATALOGUE) >= 11
    for name, lanes in entries.items():
        local, te = lanes["local"], lanes["te"]
        weights = {lane: {key: entry for key, entry in keys.items() if entry[0] != "extra_state"}
                   for lane, keys in lanes.items()}
        assert weights["local"] == weights["te"], name
        assert set(local) <= set(te), (name, sorted(set(local) - set(te)))
        assert all(key.endswith("_extra_state") for key in set(te) - set(local)), name
        assert "decoder.final_layernorm._extra_state" in te, name
    mixtral = entries["mixtral-8x7b"]["local"]
    assert "decoder.layers.pre_mlp_layernorm.weight" in mixtral
    assert "decoder.layers.mlp.linear_fc1.layer_norm_weight" not in mixtral
    assert "decoder.layers.mlp.linear_fc1.layer_norm_weight" in entries["llama3-70b"]["local"]


@pytest.mark.slow
@pytest.mark.parametrize("model_name", ["tiny-llama", "tiny-mixtral"])
def test_checkpoints_written_by_either_lane_load_on_the_other(model_name, tmp_path):
    (report,) = run_distributed(jobs.cross_lane_load, 1, model_name, str(tmp_path), backend="gloo")
    assert report == {"local->te": [], "te->local": []}
    for lane in ("local", "te"):
        assert damaged_file(tmp_path / f"from-{lane}") is None


@pytest.mark.slow
def test_damaged_or_foreign_checkpoints_are_named(tmp_path):
    """A truncated or corrupt ``.distcp`` names the file (it was reported as "saved from a
    different model"); a checkpoint lacking a weight names the weight (here a Mixtral checkpoint
    converted before the lanes shared one key set)."""
    good = tmp_path / "good"
    run_distributed(jobs.save_local, 1, "tiny-llama-tied", str(good), backend="gloo")
    assert damaged_file(good) is None
    (shard,) = good.glob("*.distcp")
    cases = {}
    for case in ("truncated", "corrupt", "no-index"):
        broken = tmp_path / case
        broken.mkdir()
        for file in good.iterdir():
            (broken / file.name).write_bytes(file.read_bytes())
        data = (broken / shard.name).read_bytes()
        if case == "truncated":
            (broken / shard.name).write_bytes(data[:len(data) // 2])
        elif case == "corrupt":
            (broken / shard.name).write_bytes(b"\0" * 64 + data[64:])
        else:
            (broken / ".metadata").unlink()
        cases[case] = broken
    messages = {case: run_distributed(jobs.load_error, 1, "tiny-llama-tied", str(path), backend="gloo")[0]
                for case, path in cases.items()}
    assert "truncated" in messages["truncated"] and shard.name in messages["truncated"]
    assert "corrupt" in messages["corrupt"] and shard.name in messages["corrupt"]
    assert ".metadata is missing" in messages["no-index"]
    for message in messages.values():
        assert "different model" not in message and "\n" not in message
    legacy = tmp_path / "legacy-mixtral"
    run_distributed(jobs.save_local, 1, "tiny-mixtral", str(legacy), True, backend="gloo")
    (message,) = run_distributed(jobs.load_error, 1, "tiny-mixtral", str(legacy), backend="gloo")
    assert "lacks decoder.layers.pre_mlp_layernorm.weight" in message and "convert it again" in message


def test_a_gpu_without_transformer_engine_builds_the_local_spec_and_says_so(monkeypatch, caplog):
    real_find_spec = build.importlib.util.find_spec
    monkeypatch.setattr(build.importlib.util, "find_spec",
                        lambda name, *args: None if name == "transformer_engine" else real_find_spec(name, *args))
    monkeypatch.setattr(build.torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("RANK", "0")
    build.transformer_engine_problem.cache_clear()
    build._warn_local_spec_on_gpu.cache_clear()
    try:
        with caplog.at_level(logging.WARNING):
            backend = build.Backend.detect()
    finally:
        build.transformer_engine_problem.cache_clear()
        build._warn_local_spec_on_gpu.cache_clear()
    assert backend == build.Backend(use_te=False, on_gpu=True)
    assert "Transformer Engine is not installed" in caplog.text and "local layer spec" in caplog.text


BROKEN_TE_PROBE = textwrap.dedent("""
    import json, torch
    torch.cuda.is_available = lambda: True  # a GPU node, as far as detection can tell
    from megatron_sami.errors import SamiError
    from megatron_sami.models.build import Backend, layer_spec
    from megatron_sami.models.catalogue import load_model_config
    result = {"backend": list(Backend.detect().__dict__.values())}
    try:
        layer_spec(load_model_config("tiny-llama"), Backend(use_te=True, on_gpu=True))
        result["spec"] = "built"
    except SamiError as err:
        result["spec"] = str(err)
    print("RESULT " + json.dumps(result))
""")

# Two ways a Transformer Engine install breaks: the core package without its torch extension,
# and an extension built for another torch. find_spec found TE either way, so the TE spec was
# asked of a megatron-core without it ("'NoneType' object is not callable"); megatron-core
# 0.19.2 itself dies on import with TE's traceback where ``import transformer_engine`` works.
BROKEN_TE = {
    "no-extension": ("import transformer_engine_torch\n", "No module named 'transformer_engine_torch'"),
    "other-torch": ('raise ImportError("transformer_engine_torch.so: undefined symbol: _ZN3c104cuda9SetDeviceEi")\n',
                    "undefined symbol"),
}


@pytest.mark.slow
@pytest.mark.parametrize("kind", sorted(BROKEN_TE))
def test_a_broken_transformer_engine_is_one_sentence_naming_the_failed_import(kind, tmp_path):
    """TE installed but its torch extension does not load. Detection imports TE as megatron-core
    does (no find_spec): the GPU run is told once that it builds the local spec and why, and
    asking for the TE spec (or importing megatron-core) is one sentence naming the import."""
    source, failure = BROKEN_TE[kind]
    package = tmp_path / "transformer_engine"
    (package / "pytorch").mkdir(parents=True)
    (package / "__init__.py").write_text('__version__ = "2.8.0"\n')  # the core package imports
    (package / "pytorch" / "__init__.py").write_text(source)
    done = subprocess.run([sys.executable, "-c", BROKEN_TE_PROBE], capture_output=True, text=True, timeout=300,
                          cwd=REPO, env={**_clean_env(), "PYTHONPATH": str(tmp_path), "RANK": "0"})
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.split("RESULT ", 1)[1])
    assert result["backend"] == [False, True]
    assert "`import transformer_engine.pytorch` fails" in result["spec"]
    assert failure in result["spec"] and "NoneType" not in result["spec"]
    warnings = [line for line in done.stderr.splitlines() if "local layer spec" in line]
    assert len(warnings) == 1 and failure in warnings[0]


def _clean_env() -> dict:
    import os

    return {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "RANK", "WORLD_SIZE")}


FORK_PROBE = textwrap.dedent("""
    import sys
    sys.path.insert(0, {tests!r})
    import te_lane_jobs
    from megatron_sami.testing.multiprocess import run_distributed

    if __name__ == "__main__":
        (calls,) = run_distributed(te_lane_jobs.cuda_runtime_calls, 1, backend="gloo")
        print("CALLS", len(calls))
        print("\\n".join(calls[:3]))
""")

# Loaded by every Python process of the probe, the harness's fork server included: NVML reports
# one GPU (as on a GPU node) and each call of the CUDA runtime's device count (the call that
# initialises CUDA and makes every process forked afterwards fail to use it) is recorded.
RECORDER = textwrap.dedent("""
    import traceback
    import torch
    import torch.cuda

    CALLS = []

    def _record(*args):
        CALLS.append("".join(traceback.format_stack(limit=8)))
        return 1

    torch._C._cuda_getDeviceCount = _record
    torch.cuda._device_count_nvml = lambda: 1
""")


@pytest.mark.slow
def test_the_harness_fork_server_does_not_initialise_cuda(tmp_path):
    """The fork server imports megatron-core once for all ranks; megatron-core and the project's
    import hook ask ``torch.cuda.is_available()`` while importing, which by default initialises
    CUDA in the server, and every forked rank then fails with "Cannot re-initialize CUDA in
    forked subprocess". The harness has the server answer through NVML instead."""
    (tmp_path / "sitecustomize.py").write_text(RECORDER)
    probe = tmp_path / "probe.py"
    probe.write_text(FORK_PROBE.format(tests=str(REPO / "tests")))
    done = subprocess.run([sys.executable, str(probe)], capture_output=True, text=True, timeout=300, cwd=REPO,
                          env={**_clean_env(), "PYTHONPATH": str(tmp_path)})
    assert done.returncode == 0, done.stderr[-3000:]
    assert "CALLS 0" in done.stdout, done.stdout[-3000:]


def _checkpoint_and_hf(tmp_path: Path, **hf_changes) -> tuple[Path, Path]:
    from megatron_sami.models.checkpoint_dir import write_model_files

    ckpt = tmp_path / "ckpt"
    for sub in ("weights", "hf"):
        (ckpt / sub).mkdir(parents=True)
    write_model_files(ckpt, load_model_config("tiny-llama"), {})
    hf = {"architectures": ["LlamaForCausalLM"], "hidden_size": 64, "intermediate_size": 160,
          "num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 4, "vocab_size": 250,
          "max_position_embeddings": 256, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
          "tie_word_embeddings": False, **hf_changes}
    hf_dir = tmp_path / "hf"
    hf_dir.mkdir()
    (hf_dir / "config.json").write_text(json.dumps(hf))
    return hf_dir, ckpt


def test_verify_refuses_an_hf_model_of_another_architecture_in_one_sentence(tmp_path, capsys):
    from megatron_sami.cli import convert as cli
    from megatron_sami.conversion.verify import check_matches_checkpoint

    hf_dir, ckpt = _checkpoint_and_hf(tmp_path)
    check_matches_checkpoint(hf_dir, ckpt)
    other_hf, _ = _checkpoint_and_hf(tmp_path / "other", vocab_size=200, num_hidden_layers=2)
    with pytest.raises(ConversionError, match="num_layers 2 vs 4; vocab_size 200 vs 250"):
        check_matches_checkpoint(other_hf, ckpt)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["verify", str(other_hf), str(ckpt)])
    assert exit_info.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(errors) == 1 and errors[0].startswith("error: the HF model at"), errors


def test_every_check_of_the_gpu_acceptance_script_names_existing_tests():
    """scripts/gpu_check.sh maps test names to its PASS/FAIL lines by pattern: a renamed test would
    turn its check into "no result" on the one GPU run a task may get, so each pattern must match."""
    import re

    root = Path(__file__).resolve().parents[1]
    script = (root / "scripts" / "gpu_check.sh").read_text()
    patterns = re.findall(r'^\s+\("([\w-]+)", r"(.+)"\),$', script, flags=re.M)
    assert len(patterns) >= 15, patterns
    collected = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                                "tests/test_gpu.py", "tests/test_te_lane.py", "tests/test_te_node.py"],
                               capture_output=True, text=True, timeout=300, cwd=root)
    assert collected.returncode == 0, collected.stdout[-3000:]
    # The script matches "<file>.py::<name>" (JUnit's class name + test name).
    node_ids = [line.split("/")[-1] for line in collected.stdout.splitlines() if "::" in line]
    for check, pattern in patterns:
        assert any(re.search(pattern, node_id) for node_id in node_ids), (check, pattern)


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["llama", "mixtral"])
def test_a_checkpoint_written_by_the_te_lane_exports_to_the_source_weights(variant, tmp_path):
    """The streaming export reads the weights and passes over the TE modules' ``_extra_state``
    objects: a converted model saved again from the TE lane exports bit for bit to its HF source."""
    import conversion_jobs
    import torch

    from megatron_sami.conversion.export import megatron_to_hf
    from megatron_sami.conversion.hf_io import SafetensorsReader

    hf_dir = conversion_jobs.make_hf_model(variant, tmp_path / "hf", seed=3)
    (_,) = run_distributed(conversion_jobs.to_megatron, 1, str(hf_dir), str(tmp_path / "ckpt"), backend="gloo")
    run_distributed(jobs.resave_on_the_te_lane, 1, str(tmp_path / "ckpt"), str(tmp_path / "te-ckpt"), backend="gloo")
    from torch.distributed.checkpoint import FileSystemReader

    keys = FileSystemReader(str(tmp_path / "te-ckpt" / "weights")).read_metadata().state_dict_metadata
    assert any("_extra_state" in key for key in keys)  # ShardedObjects: "<key>/shard_<offsets>_<grid>"
    megatron_to_hf(tmp_path / "te-ckpt", tmp_path / "exported")
    source, exported = SafetensorsReader(hf_dir), SafetensorsReader(tmp_path / "exported")
    assert sorted(source.keys()) == sorted(exported.keys())
    for key in source.keys():
        assert torch.equal(source.get(key), exported.get(key)), key
