"""A corpus of bad inputs and faults: each ends the command with exit code 2, exactly one
``error: <sentence>`` line, no traceback, and nothing written (the output path absent, with no
``.incomplete`` left beside it, and every input byte-identical afterwards).

The CLIs' ``main`` runs in this process where that is faithful (the conversions run in one
process, as ``sami-convert`` does when launched without torchrun); the print-once behaviour
under a multi-process launch and the real read-only and full file systems run in subprocesses.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import conversion_jobs
import pytest

from megatron_sami.cli import convert as convert_cli

HF_FILE = "model.safetensors"
# In-process conversions build megatron-core models, whose MLP warns about its own defaults.
pytestmark = pytest.mark.filterwarnings("ignore:MLP requires ffn_hidden_size")


def call_cli(main: Callable, argv: list[str], capsys) -> tuple[int, str]:
    """(exit code, stderr) of one in-process run of a CLI ``main``."""
    capsys.readouterr()
    try:
        code = main(argv)
    except SystemExit as stop:
        code = stop.code
    return code, capsys.readouterr().err


def assert_one_sentence(code: int, err: str, *expected: str) -> str:
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert code == 2, err
    assert len(errors) == 1 and "Traceback" not in err, err
    assert all(part in errors[0] for part in expected), errors[0]
    return errors[0]


def snapshot(root: Path) -> dict[str, bytes | str]:
    """Every file (bytes) and symlink (target) under ``root``, by relative path."""
    found: dict[str, bytes | str] = {}
    for path in sorted(root.rglob("*")):
        key = str(path.relative_to(root))
        if path.is_symlink():
            found[key] = "-> " + os.readlink(path)
        elif path.is_file():
            found[key] = path.read_bytes()
    return found


def assert_nothing_written(out: Path) -> None:
    assert not out.exists() and not out.is_symlink(), out
    assert not out.with_name(out.name + ".incomplete").exists()


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> tuple[Path, Path]:
    """(a tiny fp32 HF Llama, its converted checkpoint), made once per module."""
    from megatron_sami.testing.tiny import make_tiny_hf_model

    root = tmp_path_factory.mktemp("models")
    hf_dir = make_tiny_hf_model("llama", root / "hf")
    with contextlib.suppress(SystemExit):
        convert_cli.main(["hf-to-megatron", str(hf_dir), str(root / "ckpt")])
    assert (root / "ckpt" / "model.yaml").is_file()
    return hf_dir, root / "ckpt"


@pytest.fixture
def work(models, tmp_path) -> tuple[Path, Path]:
    """Copies of the model and checkpoint that a case may break."""
    hf_dir, ckpt = models
    shutil.copytree(hf_dir, tmp_path / "hf")
    shutil.copytree(ckpt, tmp_path / "ckpt")
    return tmp_path / "hf", tmp_path / "ckpt"


# ---------------------------------------------------------------------------------------------
# Data loss: an output that is, contains or lies inside an input is refused, with or without
# --overwrite, in both directions.

def _overlapping_output(kind: str, source: Path) -> Path:
    if kind == "same":
        return source
    if kind == "parent":
        return source.parent
    if kind == "inside":
        return source / "out"
    if kind == "symlink":
        link = source.parent / "link-to-source"
        link.symlink_to(source, target_is_directory=True)
        return link
    if kind == "dotdot":
        return source / ".." / source.name
    raise ValueError(kind)


@pytest.mark.parametrize("overwrite", [False, True], ids=["", "overwrite"])
@pytest.mark.parametrize("kind", ["same", "parent", "inside", "symlink", "dotdot"])
@pytest.mark.parametrize("command", ["hf-to-megatron", "megatron-to-hf"])
def test_an_output_overlapping_its_source_is_refused_and_the_source_kept(work, capsys, command, kind, overwrite):
    hf_dir, ckpt = work
    source = hf_dir if command == "hf-to-megatron" else ckpt
    out = _overlapping_output(kind, source)
    before = snapshot(source.parent)
    code, err = call_cli(convert_cli.main, [command, str(source), str(out)] + ["--overwrite"] * overwrite, capsys)
    assert_one_sentence(code, err, "neither is, contains nor lies inside")
    assert snapshot(source.parent) == before  # the source byte for byte, and nothing new beside it


@pytest.mark.parametrize("argv", [
    ["mi", "--model", "base={hf}", "--out", "{hf}/mi"],
    ["winrate", "--test", "{hf}", "--baseline-model", "{hf}", "--out", "{hf}/..", "--judge-url", "http://127.0.0.1:9/v1",
     "--judge-model", "judge"],
    ["winrate", "--test-records", "{hf}/config.json", "--baseline-records", "{hf}/config.json", "--out", "{hf}",
     "--judge-url", "http://127.0.0.1:9/v1", "--judge-model", "judge"],
], ids=["mi-inside-model", "winrate-parent-of-model", "winrate-records-inside"])
def test_an_evaluation_output_overlapping_a_model_or_records_is_refused(work, capsys, argv):
    from megatron_sami.cli import eval as eval_cli

    hf_dir, _ = work
    before = snapshot(hf_dir.parent)
    code, err = call_cli(eval_cli.main, [arg.format(hf=hf_dir) for arg in argv], capsys)
    assert_one_sentence(code, err, "neither is, contains nor lies inside")
    assert snapshot(hf_dir.parent) == before


def test_an_output_whose_staging_directory_is_the_source_is_refused(work, capsys):
    """The conversion stages into ``<out>.incomplete`` and clears it first: a source of that name
    would be deleted."""
    hf_dir, _ = work
    staged_source = hf_dir.rename(hf_dir.with_name("m.incomplete"))
    before = snapshot(staged_source)
    code, err = call_cli(convert_cli.main, ["hf-to-megatron", str(staged_source), str(hf_dir.with_name("m"))],
                         capsys)
    assert_one_sentence(code, err, "m.incomplete")
    assert snapshot(staged_source) == before


# ---------------------------------------------------------------------------------------------
# Malformed HF metadata: every config.json field the converter reads is checked for presence,
# type and range as transformers' strict config classes check it; nothing is coerced.

def _edit_config(hf_dir: Path, change: Callable[[dict], object]) -> None:
    config = json.loads((hf_dir / "config.json").read_text())
    (hf_dir / "config.json").write_text(json.dumps(change(config)))


def _without(key: str) -> Callable[[dict], dict]:
    return lambda config: {k: v for k, v in config.items() if k != key}


def _with(**values) -> Callable[[dict], dict]:
    return lambda config: {**config, **values}


CONFIG_CASES = {
    "no-num_attention_heads": (_without("num_attention_heads"), "lacks num_attention_heads"),
    "no-hidden_size": (_without("hidden_size"), "lacks hidden_size"),
    "no-vocab_size": (_without("vocab_size"), "lacks vocab_size"),
    "a-json-list": (lambda config: [config], "holds a JSON list"),
    "heads-as-string": (_with(num_attention_heads="4"), 'num_attention_heads is "4" (str)'),
    "hidden-size-as-float": (_with(hidden_size=64.0), "hidden_size is 64.0 (float)"),
    "tied-as-string": (_with(tie_word_embeddings="false"), "tie_word_embeddings"),
    "tied-as-int": (_with(tie_word_embeddings=1), "tie_word_embeddings is 1 (int)"),
    "bias-as-string": (_with(attention_bias="no"), "attention_bias"),
    "negative-vocab": (_with(vocab_size=-1), "vocab_size is -1; it must be >= 1"),
    "zero-kv-heads": (_with(num_key_value_heads=0), "num_key_value_heads is 0"),
    "eps-as-string": (_with(rms_norm_eps="1e-5"), "rms_norm_eps"),
    "zero-eps": (_with(rms_norm_eps=0.0), "rms_norm_eps is 0.0; it must be positive"),
    "architectures-as-string": (_with(architectures="LlamaForCausalLM"), "architectures"),
    "linear-rope-without-factor": (_with(rope_scaling={"rope_type": "linear"}), "lacks its factor"),
}


@pytest.mark.parametrize("case", sorted(CONFIG_CASES))
def test_malformed_hf_config_is_one_sentence(work, capsys, case):
    hf_dir, _ = work
    change, expected = CONFIG_CASES[case]
    _edit_config(hf_dir, change)
    before = snapshot(hf_dir)
    code, err = call_cli(convert_cli.main, ["hf-to-megatron", str(hf_dir), str(hf_dir.parent / "out")], capsys)
    assert_one_sentence(code, err, "config.json", expected)
    assert_nothing_written(hf_dir.parent / "out")
    assert snapshot(hf_dir) == before


def _shard(hf_dir: Path) -> dict[str, str]:
    """Re-save the model as two shards with an index; returns the weight map."""
    from safetensors.torch import load_file

    tensors = load_file(hf_dir / HF_FILE)
    (hf_dir / HF_FILE).unlink()
    return conversion_jobs.save_in_two_shards(tensors, hf_dir)


def _write_index(hf_dir: Path, weight_map) -> None:
    (hf_dir / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def test_an_index_whose_weight_map_is_a_list(work, capsys):
    hf_dir, _ = work
    _write_index(hf_dir, sorted(_shard(hf_dir).items()))
    code, err = call_cli(convert_cli.main, ["hf-to-megatron", str(hf_dir), str(hf_dir.parent / "out")], capsys)
    assert_one_sentence(code, err, "weight_map must map each tensor name to a file name", "got a list")
    assert_nothing_written(hf_dir.parent / "out")


def test_an_index_naming_the_wrong_existing_shard_names_the_tensor_and_both_files(work, capsys):
    """Caught from the headers before the runtime starts (before: a KeyError during the save)."""
    hf_dir, _ = work
    weight_map = _shard(hf_dir)
    moved = "model.norm.weight"
    right = weight_map[moved]
    wrong = next(name for name in set(weight_map.values()) if name != right)
    _write_index(hf_dir, {**weight_map, moved: wrong})
    code, err = call_cli(convert_cli.main, ["hf-to-megatron", str(hf_dir), str(hf_dir.parent / "out")], capsys)
    assert_one_sentence(code, err, f"tensor {moved} is in {wrong}", f"it is in {right}")
    assert "runtime:" not in err
    assert_nothing_written(hf_dir.parent / "out")


# ---------------------------------------------------------------------------------------------
# Unreadable inputs.

def _not_utf8_config(hf_dir: Path, ckpt: Path) -> None:
    (hf_dir / "config.json").write_bytes(b'{"architectures": ["Llama\xffForCausalLM"]}')


def _model_yaml_not_yaml(hf_dir: Path, ckpt: Path) -> None:
    (ckpt / "model.yaml").write_text("name: tiny\nfamily: [llama\n")


def _model_yaml_a_list(hf_dir: Path, ckpt: Path) -> None:
    (ckpt / "model.yaml").write_text("- llama\n- mistral\n")


def _conversion_json_broken(hf_dir: Path, ckpt: Path) -> None:
    (ckpt / "conversion.json").write_text('{"params_dtype": ')


UNREADABLE = {
    "config-not-utf8": ("hf-to-megatron", _not_utf8_config, "is not UTF-8 text"),
    "model-yaml-not-yaml": ("megatron-to-hf", _model_yaml_not_yaml, "model.yaml is not valid YAML"),
    "model-yaml-a-list": ("megatron-to-hf", _model_yaml_a_list, "model.yaml holds a YAML list"),
    "conversion-json-broken": ("megatron-to-hf", _conversion_json_broken, "conversion.json is not valid JSON"),
}


@pytest.mark.parametrize("case", sorted(UNREADABLE))
def test_unreadable_input_is_one_sentence_naming_the_file(work, capsys, case):
    hf_dir, ckpt = work
    command, damage, expected = UNREADABLE[case]
    damage(hf_dir, ckpt)
    source = hf_dir if command == "hf-to-megatron" else ckpt
    before = snapshot(source)
    code, err = call_cli(convert_cli.main, [command, str(source), str(source.parent / "out")], capsys)
    assert_one_sentence(code, err, expected)
    assert_nothing_written(source.parent / "out")
    assert snapshot(source) == before


def _records(tmp_path: Path, content: bytes) -> Path:
    path = tmp_path / "records.jsonl"
    path.write_bytes(content)
    return path


GOOD_RECORD = {"query": "q?", "constitutions": ["be kind", "be rude"], "responses": ["Sure.", "No."]}
RECORD_CASES = {
    "not-utf8": (json.dumps(GOOD_RECORD).encode() + b"\n" + b'{"query": "caf\xe9"}\n',
                 ["records.jsonl:2", "is not UTF-8"]),
    "number-response": (json.dumps({**GOOD_RECORD, "responses": ["Sure.", 42]}).encode() + b"\n",
                        ["records.jsonl:1", "response 1 is 42 (a number), not a string"]),
    "missing-file": (None, ["does not exist; check data.records."]),
}


@pytest.mark.parametrize("case", sorted(RECORD_CASES))
def test_sami_train_refuses_unreadable_records_in_one_sentence(models, tmp_path, capsys, monkeypatch, case):
    """Through ``sami-train``'s Hydra entry point, in this process: the records are read after
    the runtime started and before anything is written (the run directory stays absent)."""
    from megatron_sami.cli import train as train_cli

    _, ckpt = models
    content, expected = RECORD_CASES[case]
    records = _records(tmp_path, content) if content is not None else tmp_path / "absent.jsonl"
    run_dir = tmp_path / "run"
    monkeypatch.setattr(sys, "argv", ["sami-train", f"checkpoint={ckpt}", f"data.records={records}",
                                      f"run_dir={run_dir}", "queries_per_step=1", "steps=1", "data.seq_length=64"])
    code, err = call_cli(lambda argv: train_cli.main(), [], capsys)
    assert_one_sentence(code, err, *expected)
    assert not run_dir.exists()


def test_sami_train_refuses_a_sequence_length_beyond_the_model_before_anything_is_written(models, tmp_path, capsys,
                                                                                         monkeypatch):
    from megatron_sami.cli import train as train_cli

    _, ckpt = models
    records = _records(tmp_path, json.dumps(GOOD_RECORD).encode() + b"\n")
    run_dir = tmp_path / "run"
    monkeypatch.setattr(sys, "argv", ["sami-train", f"checkpoint={ckpt}", f"data.records={records}",
                                      f"run_dir={run_dir}", "queries_per_step=1", "data.seq_length=100000"])
    code, err = call_cli(lambda argv: train_cli.main(), [], capsys)
    assert_one_sentence(code, err, "data.seq_length=100000 exceeds", "set data.seq_length to at most")
    assert not run_dir.exists()


def test_a_number_response_is_not_reported_as_empty_by_the_filters():
    from megatron_sami.errors import DataError
    from megatron_sami.rollout.filters import FilterConfig, rejection_reason

    with pytest.raises(DataError, match="response 1 is 7, not a string"):
        rejection_reason({"id": "r", "responses": ["Fine.", 7]}, FilterConfig())


# ---------------------------------------------------------------------------------------------
# Misleading sentences.

@pytest.mark.parametrize("arg", ["model=tiny-llama", "+model=tiny-llama", "model=llama-9000"])
def test_sami_train_says_it_takes_the_model_from_the_checkpoint(tmp_path, capsys, monkeypatch, arg):
    """Not Hydra's "use +model=..." nor an unknown-model list: sami-train has no model setting."""
    from megatron_sami.cli import train as train_cli

    monkeypatch.setattr(sys, "argv", ["sami-train", "checkpoint=c", arg])
    code, err = call_cli(lambda argv: train_cli.main(), [], capsys)
    assert_one_sentence(code, err, "takes the model from the checkpoint", "checkpoint=DIR")
    assert "+model" not in err.replace(arg, "")


def test_argparse_commands_name_their_own_options_not_hydra_keys(work, capsys):
    hf_dir, _ = work
    code, err = call_cli(convert_cli.main, ["hf-to-megatron", str(hf_dir), str(hf_dir.parent / "out"),
                                            "--expert", "2"], capsys)
    line = assert_one_sentence(code, err, "--expert")
    assert "parallel." not in line
    assert_nothing_written(hf_dir.parent / "out")


# ---------------------------------------------------------------------------------------------
# File-system errors, in this process: simulated where the machine cannot make them for real.

def test_disk_full_while_converting_is_one_sentence_naming_enospc_and_the_file(work, capsys, monkeypatch):
    """Simulates a disk that fills up after 1 kB: the kernel's in-file copy (copy_file_range,
    what a kept dtype uses) fails with ENOSPC. The error reaches the command wrapped in torch
    DCP's CheckpointException (a BaseException), which the boundary unwraps."""
    hf_dir, _ = work
    copied = 0
    real_copy = os.copy_file_range

    def filling_copy(source, target, count, *offsets):
        nonlocal copied
        if copied > 1024:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        done = real_copy(source, target, count, *offsets)
        copied += done
        return done

    monkeypatch.setattr(os, "copy_file_range", filling_copy)
    out = hf_dir.parent / "out"
    before = snapshot(hf_dir)
    code, err = call_cli(convert_cli.main, ["hf-to-megatron", str(hf_dir), str(out)], capsys)
    assert_one_sentence(code, err, "No space left on device", str(out))
    assert_nothing_written(out)
    assert snapshot(hf_dir) == before


@contextlib.contextmanager
def file_size_limit(nbytes: int):
    """RLIMIT_FSIZE for this process (what ``ulimit -f`` sets), SIGXFSZ ignored: the kernel then
    refuses writes past ``nbytes`` with EFBIG, through every writer (Python, torch.save's C++,
    safetensors' Rust) - the same refusal path a full disk takes, with another errno."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)


@pytest.mark.parametrize("command", ["hf-to-megatron --dtype bfloat16", "megatron-to-hf"],
                         ids=["convert-cast-torch-save", "export-safetensors"])
def test_a_write_refused_by_the_kernel_is_one_sentence_naming_the_output(work, capsys, command):
    hf_dir, ckpt = work
    name, *options = command.split()
    source = hf_dir if name == "hf-to-megatron" else ckpt
    out = source.parent / "out"
    before = snapshot(source)
    with file_size_limit(40_000):
        code, err = call_cli(convert_cli.main, [name, str(source), str(out), *options], capsys)
    assert_one_sentence(code, err, "File too large", str(out), "ulimit -f")
    assert_nothing_written(out)
    assert snapshot(source) == before


# ---------------------------------------------------------------------------------------------
# Real file systems (a full tmpfs, a read-only bind mount) in a private mount namespace, and one
# sentence under a two-process launch.

NAMESPACED = r"""
import contextlib, io, json, os, sys
from megatron_sami.cli.convert import main
results = {}
for name, argv in json.loads(sys.argv[1]).items():
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as stop:
            code = stop.code
    results[name] = [code, err.getvalue(), sorted(os.listdir(os.path.dirname(argv[2])))]
print("RESULTS " + json.dumps(results))
"""


def _in_private_mounts(script: str, tmp_path: Path) -> subprocess.CompletedProcess | None:
    """Run a shell script in a new mount namespace (as root, or mapped to root in a user
    namespace); None where this machine allows neither."""
    if shutil.which("unshare") is None:
        return None
    tmp_path.mkdir()
    for unshare in (["unshare", "--mount"], ["unshare", "--map-root-user", "--mount"]):
        probe = subprocess.run([*unshare, "sh", "-c", f"mount -t tmpfs -o size=64k tmpfs {tmp_path}"],
                               capture_output=True)
        if probe.returncode == 0:
            return subprocess.run([*unshare, "sh", "-c", script], capture_output=True, text=True, timeout=300)
    return None


@pytest.mark.slow
def test_full_and_read_only_file_systems_for_real(models, tmp_path):
    """A 64 kB tmpfs (ENOSPC from the kernel mid-write) and a read-only bind mount (EROFS, which
    stops root too), both conversion directions."""
    hf_dir, ckpt = models
    full, read_only = tmp_path / "full", tmp_path / "ro"
    full.mkdir()
    read_only.mkdir()
    runs = {f"{kind}-{name}": [name, str(source), str(where / "out")]
            for kind, where in (("full", full), ("ro", read_only))
            for name, source in (("hf-to-megatron", hf_dir), ("megatron-to-hf", ckpt))}
    script = (f"mount -t tmpfs -o size=64k tmpfs {full} && mount --bind {read_only} {read_only} && "
              f"mount -o remount,bind,ro {read_only} && "
              f"{sys.executable} -c '{NAMESPACED}' '{json.dumps(runs)}'")
    result = _in_private_mounts(script, tmp_path / "probe")
    if result is None:
        pytest.skip("this machine allows no private mount namespace (unshare --mount)")
    line = next((line for line in result.stdout.splitlines() if line.startswith("RESULTS ")), None)
    assert line is not None, result.stderr[-3000:]
    for name, (code, err, left) in json.loads(line.removeprefix("RESULTS ")).items():
        expected = ("No space left on device",) if name.startswith("full") else ("read-only file system",)
        assert_one_sentence(code, err, *expected, str(tmp_path))
        assert left == [], (name, left)  # neither out nor out.incomplete


@pytest.mark.slow
def test_an_error_after_the_runtime_started_is_printed_once_under_torchrun(models, tmp_path):
    """Both processes meet the layout error after the process group started; one line, with the
    command's own option name."""
    hf_dir, _ = models
    out = tmp_path / "out"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m",
               "megatron_sami.cli.convert", "hf-to-megatron", str(hf_dir), str(out), "--expert", "2"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert result.returncode != 0 and len(errors) == 1, result.stderr[-3000:]
    assert "--expert" in errors[0] and "parallel.expert" not in errors[0]
    assert_nothing_written(out)
