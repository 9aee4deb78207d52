"""HF <-> Megatron conversion, proven by outputs against transformers and by exact round trips."""

import json
import shutil
from pathlib import Path

import conversion_jobs as jobs
import pytest
import torch
from safetensors import safe_open

from megatron_sami.models.checkpoint import WRITER_THREADS
from megatron_sami.testing.multiprocess import run_distributed

pytestmark = pytest.mark.slow

TOKENS = torch.randint(0, 250, (2, 24), generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """variant -> (HF dir, converted checkpoint dir), converted once per module."""
    made = {}

    def get(variant: str):
        if variant not in made:
            root = tmp_path_factory.mktemp(variant)
            hf_dir = jobs.make_hf_model(variant, root / "hf")
            run_distributed(jobs.to_megatron, 1, str(hf_dir), str(root / "megatron"))
            made[variant] = (hf_dir, root / "megatron")
        return made[variant]

    return get


def read_safetensors_dir(directory: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for path in sorted(directory.glob("*.safetensors")):
        with safe_open(path, framework="pt") as handle:
            tensors.update({key: handle.get_tensor(key) for key in handle.keys()})  # noqa: SIM118
    return tensors


@pytest.mark.parametrize("variant", sorted(jobs.VARIANTS))
def test_round_trip_is_bit_identical_with_identical_config(converted, variant, tmp_path):
    hf_dir, ckpt = converted(variant)
    jobs.to_hf(str(ckpt), str(tmp_path / "back"))
    original, back = read_safetensors_dir(hf_dir), read_safetensors_dir(tmp_path / "back")
    assert sorted(back) == sorted(original)
    for key, tensor in original.items():
        assert back[key].dtype == tensor.dtype and torch.equal(back[key], tensor), key
    assert (tmp_path / "back" / "config.json").read_bytes() == (hf_dir / "config.json").read_bytes()
    index = json.loads((tmp_path / "back" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(original)


@pytest.mark.parametrize("variant", sorted(jobs.VARIANTS))
def test_logits_equal_transformers_at_tp1(converted, variant):
    hf_dir, ckpt = converted(variant)
    (logits,) = run_distributed(jobs.logits_at, 1, str(ckpt), TOKENS, 1, 1, 1)
    torch.testing.assert_close(logits, jobs.hf_logits(hf_dir, TOKENS), rtol=0, atol=1e-4)


@pytest.mark.parametrize(
    ("variant", "tensor", "pipeline", "expert"),
    [("llama", 2, 1, 1), ("llama", 1, 2, 1), ("llama", 2, 2, 1), ("llama", 4, 1, 1), ("llama-tied", 1, 2, 1),
     ("mistral", 2, 1, 1), ("llama31-rope", 2, 1, 1), ("mixtral", 1, 1, 2), ("mixtral", 2, 1, 1),
     ("mixtral", 2, 1, 2)],
    # TP4: tiny models have 2 KV groups, so TP=4 exercises KV-head replication (groups < TP).
    ids=["llama-TP2", "llama-PP2", "llama-TP2xPP2", "llama-TP4-kv-replicated", "tied-PP2", "mistral-TP2",
         "llama31-TP2", "mixtral-EP2", "mixtral-TP2", "mixtral-TP2xEP2"],
)
def test_logits_equal_transformers_at_parallel_layouts(converted, variant, tensor, pipeline, expert):
    hf_dir, ckpt = converted(variant)
    expected = jobs.hf_logits(hf_dir, TOKENS)
    for logits in run_distributed(jobs.logits_at, tensor * pipeline * expert, str(ckpt), TOKENS,
                                  tensor, pipeline, expert):
        torch.testing.assert_close(logits, expected, rtol=0, atol=1e-4)


def test_multi_process_conversion_split_by_pipeline_and_experts_exports_bitwise(converted, tmp_path):
    hf_dir = jobs.make_hf_model("mixtral", tmp_path / "hf", num_layers=4)
    # Four processes: PP=2 x EP=2, each reading and holding only its layers and experts.
    run_distributed(jobs.to_megatron, 4, str(hf_dir), str(tmp_path / "megatron"), 2, 2)
    jobs.to_hf(str(tmp_path / "megatron"), str(tmp_path / "back"), 20_000)  # one process, streaming
    original, back = read_safetensors_dir(hf_dir), read_safetensors_dir(tmp_path / "back")
    assert sorted(back) == sorted(original)
    assert all(torch.equal(back[key], original[key]) for key in original)
    shards = list((tmp_path / "back").glob("*.safetensors"))
    assert len(shards) > 4  # 20 kB shard limit: several files
    (logits,) = run_distributed(jobs.logits_at, 1, str(tmp_path / "megatron"), TOKENS, 1, 1, 1)
    torch.testing.assert_close(logits, jobs.hf_logits(hf_dir, TOKENS), rtol=0, atol=1e-4)


def test_export_loads_with_from_pretrained_and_drops_padded_vocab(converted, tmp_path):
    from transformers import AutoModelForCausalLM

    hf_dir, ckpt = converted("llama-tied")
    jobs.to_hf(str(ckpt), str(tmp_path / "back"))
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "back", dtype=torch.float32)
    assert model.get_input_embeddings().weight.shape[0] == 250  # Megatron holds 256 rows
    assert "lm_head.weight" not in read_safetensors_dir(tmp_path / "back")
    torch.testing.assert_close(model(TOKENS).logits, jobs.hf_logits(hf_dir, TOKENS), rtol=0, atol=1e-5)


def _half_precision_copy(converted, dtype: torch.dtype, directory: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    """The llama model re-saved in ``dtype`` (as Llama 2 and many fine-tunes ship: fp16)."""
    from safetensors.torch import save_file

    hf_dir, _ = converted("llama")
    shutil.copytree(hf_dir, directory, ignore=shutil.ignore_patterns("*.safetensors"))
    tensors = {key: tensor.to(dtype) for key, tensor in read_safetensors_dir(hf_dir).items()}
    save_file(tensors, str(directory / "model.safetensors"))
    return directory, tensors


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_sources_keep_their_dtype_and_come_back_bitwise(converted, dtype, tmp_path):
    """The checkpoint stores the source's dtype (its bytes copied file to file, padding rows left
    as zeros), so the export gives every tensor back bit for bit (fp16 was stored as bf16 before,
    which changed every tensor of an fp16 model)."""
    source, original = _half_precision_copy(converted, dtype, tmp_path / "source")
    run_distributed(jobs.to_megatron, 1, str(source), str(tmp_path / "megatron"))
    record = json.loads((tmp_path / "megatron" / "conversion.json").read_text())
    assert record["params_dtype"] == {torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]
    jobs.to_hf(str(tmp_path / "megatron"), str(tmp_path / "back"))
    back = read_safetensors_dir(tmp_path / "back")
    assert sorted(back) == sorted(original)
    for key, tensor in original.items():
        assert back[key].dtype == dtype and torch.equal(back[key], tensor), key


def test_fp16_conversion_passes_verify_at_default_settings(converted, tmp_path, capsys):
    """``sami-convert verify`` of the project's own fp16 conversion (it reported MISMATCH,
    3.5e-3 > 1e-3, when the weights were rounded to bf16)."""
    from megatron_sami.cli import convert as convert_cli

    source, _ = _half_precision_copy(converted, torch.float16, tmp_path / "source")
    run_distributed(jobs.to_megatron, 1, str(source), str(tmp_path / "megatron"))
    code = convert_cli.main(["verify", str(source), str(tmp_path / "megatron"), "--new-tokens", "4"])
    out = capsys.readouterr().out
    assert code == 0 and out.rstrip().endswith("OK"), out


def test_an_explicit_dtype_casts_and_the_export_returns_the_source_dtype(converted, tmp_path):
    source, original = _half_precision_copy(converted, torch.float16, tmp_path / "source")
    run_distributed(jobs.to_megatron, 1, str(source), str(tmp_path / "megatron"), 1, 1, "bfloat16")
    assert json.loads((tmp_path / "megatron" / "conversion.json").read_text())["params_dtype"] == "bf16"
    jobs.to_hf(str(tmp_path / "megatron"), str(tmp_path / "back"))
    back = read_safetensors_dir(tmp_path / "back")
    for key, tensor in original.items():
        assert back[key].dtype == torch.float16 and torch.equal(back[key], tensor.to(torch.bfloat16).half()), key


# ---------------------------------------------------------------------------------------------
# Bad input: a clear error naming the fix, and nothing written.


def _assert_nothing_written(out_dir: Path) -> None:
    assert not out_dir.exists()
    assert not out_dir.with_name(out_dir.name + ".incomplete").exists()


def _break_copy(converted, tmp_path, variant="llama") -> Path:
    hf_dir, _ = converted(variant)
    broken = tmp_path / "broken"
    shutil.copytree(hf_dir, broken)
    return broken


def _shard(hf_dir: Path, tmp_path: Path) -> Path:
    """Re-save a model as two shards with an index (as large checkpoints are)."""
    tensors = read_safetensors_dir(hf_dir)
    sharded = tmp_path / "sharded"
    shutil.copytree(hf_dir, sharded, ignore=shutil.ignore_patterns("*.safetensors"))
    weight_map = jobs.save_in_two_shards(tensors, sharded)
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return sharded


def convert_must_fail(source: Path, out_dir: Path, kind: str = "hf-to-megatron") -> str:
    (message,) = run_distributed(jobs.expect_conversion_error, 1, kind, str(source), str(out_dir))
    _assert_nothing_written(out_dir)
    return message


def test_sharded_checkpoint_with_index_converts_to_the_same_logits(converted, tmp_path):
    hf_dir, _ = converted("llama")
    sharded = _shard(hf_dir, tmp_path)
    run_distributed(jobs.to_megatron, 1, str(sharded), str(tmp_path / "megatron"))
    (logits,) = run_distributed(jobs.logits_at, 1, str(tmp_path / "megatron"), TOKENS, 1, 1, 1)
    torch.testing.assert_close(logits, jobs.hf_logits(hf_dir, TOKENS), rtol=0, atol=1e-4)


def test_index_naming_a_missing_shard(converted, tmp_path):
    sharded = _shard(converted("llama")[0], tmp_path)
    (sharded / "model-00002-of-00002.safetensors").unlink()
    message = convert_must_fail(sharded, tmp_path / "out")
    assert "model-00002-of-00002.safetensors, which is missing" in message


def test_truncated_shard(converted, tmp_path):
    broken = _break_copy(converted, tmp_path)
    data = (broken / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(data[: len(data) // 2])
    assert "truncated or corrupt" in convert_must_fail(broken, tmp_path / "out")


def test_tensor_with_the_wrong_shape(converted, tmp_path):
    from safetensors.torch import save_file

    broken = _break_copy(converted, tmp_path)
    tensors = read_safetensors_dir(broken)
    tensors["model.layers.1.mlp.down_proj.weight"] = torch.zeros(64, 95)
    save_file(tensors, str(broken / "model.safetensors"))
    message = convert_must_fail(broken, tmp_path / "out")
    assert "model.layers.1.mlp.down_proj.weight [64, 95]" in message and "do not match the config" in message


def _with_config(converted, tmp_path, **changes) -> Path:
    """A copy of the llama model whose config.json has ``changes`` applied."""
    broken = _break_copy(converted, tmp_path)
    config = {**json.loads((broken / "config.json").read_text()), **changes}
    (broken / "config.json").write_text(json.dumps(config))
    return broken


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"num_hidden_layers": 3}, ["model.layers.2.", "3 layers"]),  # config has more layers than weights
        ({"num_hidden_layers": 1}, ["model.layers.1."]),  # weights have more layers than config
        ({"vocab_size": 300}, ["model.embed_tokens.weight [250, 64]"]),
        ({"architectures": ["GPT2LMHeadModel"]}, ["architecture 'GPT2LMHeadModel' is not supported"]),
        ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}}, ["rope scaling type 'yarn'"]),
        ({"rope_parameters": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 2.0, "high_freq_factor": 4.0,
                              "original_max_position_embeddings": 8192, "rope_theta": 1e4}}, ["low_freq_factor=1"]),
    ],
    ids=["more-layers-in-config", "more-layers-in-weights", "vocab-mismatch", "architecture", "rope-type",
         "llama3-rope-factors"],
)
def test_config_that_does_not_fit_the_weights_or_the_converter(converted, tmp_path, changes, expected):
    message = convert_must_fail(_with_config(converted, tmp_path, **changes), tmp_path / "out")
    assert all(part in message for part in expected), message


def test_pickle_only_checkpoint_is_refused(tmp_path):
    source = tmp_path / "pickled"
    source.mkdir()
    shutil.copy(Path(__file__).parent / "conftest.py", source / "pytorch_model.bin")
    (source / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], **jobs.COMMON,
                                                    "max_position_embeddings": 256}))
    assert "pickle" in convert_must_fail(source, tmp_path / "out")


def test_output_path_that_is_a_file_or_exists(converted, tmp_path):
    hf_dir, ckpt = converted("llama")
    a_file = tmp_path / "a_file"
    a_file.write_text("keep me")
    (message,) = run_distributed(jobs.expect_conversion_error, 1, "hf-to-megatron", str(hf_dir), str(a_file))
    assert "is a file" in message and a_file.read_text() == "keep me"
    existing = tmp_path / "existing"
    existing.mkdir()
    (message,) = run_distributed(jobs.expect_conversion_error, 1, "megatron-to-hf", str(ckpt), str(existing))
    assert "--overwrite" in message and list(existing.iterdir()) == []


def test_megatron_checkpoint_from_a_different_model(converted, tmp_path):
    _, llama_ckpt = converted("llama")
    _, mixtral_ckpt = converted("mixtral")
    mixed = tmp_path / "mixed"
    shutil.copytree(llama_ckpt, mixed)
    shutil.copy(mixtral_ckpt / "model.yaml", mixed / "model.yaml")
    message = convert_must_fail(mixed, tmp_path / "out", kind="megatron-to-hf")
    assert "different model" in message


@pytest.mark.parametrize("variant, pipeline", [("llama-tied", 1), ("mixtral", 1), ("llama", 2)])
def test_lazy_writer_matches_megatron_writer_one_chunk_at_a_time(converted, variant, pipeline, tmp_path):
    """The streaming writer conversion uses: same checkpoint layout (keys, global shapes, chunks)
    as megatron-core's own save, values that load back bit-identically, each chunk made once
    (a gated fc1 as its two halves), and at most one chunk's memory alive per writer thread
    (torch's own writer loop would keep every chunk of a file until the file is closed)."""
    hf_dir, _ = converted(variant)
    reports = run_distributed(jobs.lazy_and_eager_saves, pipeline, str(hf_dir), str(tmp_path), pipeline)
    for report in reports:
        assert report["same_layout"], report["keys"]
        assert report["differing"] == []
        assert report["most_alive"] <= WRITER_THREADS
        calls = [tuple(call) for call in report["calls"]]
        assert len(set(calls)) == len(calls)
        chunks_of: dict[str, list[tuple[int, int]]] = {}
        for name, first, count in calls:
            chunks_of.setdefault(name, []).append((first, count))
        for name, chunks in chunks_of.items():  # the chunks of a parameter tile its rows exactly
            chunks.sort()
            assert [first for first, _ in chunks] == [0] + [first + count for first, count in chunks[:-1]], name
            assert sum(count for _, count in chunks) == report["rows"][name], name
        assert any("linear_fc1" in name and len(chunks) == 2 for name, chunks in chunks_of.items())
    assert all(report["calls"] for report in reports)


def test_a_read_error_in_any_writer_thread_fails_the_conversion_and_leaves_no_checkpoint(converted, tmp_path):
    """torch's own writer loop lets a failing writer thread end quietly (its file's entries would
    then be missing from a checkpoint that looks complete); the conversion's loop re-raises."""
    hf_dir, _ = converted("llama")
    out = tmp_path / "out"
    [report] = run_distributed(jobs.conversion_with_a_read_error_in_a_writer_thread, 1, str(hf_dir), str(out))
    assert report["error"] is not None and "Input/output error" in report["error"]
    assert not out.exists() and not out.with_name("out.incomplete").exists()
