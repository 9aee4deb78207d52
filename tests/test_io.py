"""The atomic-write helpers: content, no temporary files left, the old file kept when writing fails,
and fsync on both the file and its directory."""

from __future__ import annotations

import json
import os
import stat

import pytest

from megatron_sami import io
from megatron_sami.errors import DataError


@pytest.fixture
def fsyncs(monkeypatch):
    """Record, for every os.fsync call, whether it was given a directory or a file."""
    calls: list[str] = []
    real_fsync = os.fsync

    def recording_fsync(fd: int) -> None:
        calls.append("dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    return calls


def test_text_json_and_jsonl_round_trip(tmp_path, fsyncs):
    io.atomic_write_text(tmp_path / "a.txt", "héllo\n")
    io.atomic_write_json(tmp_path / "b.json", {"step": 3, "loss": 0.5})
    io.atomic_write_jsonl(tmp_path / "c.jsonl", ({"i": i} for i in range(3)))
    assert (tmp_path / "a.txt").read_text(encoding="utf-8") == "héllo\n"
    assert json.loads((tmp_path / "b.json").read_text()) == {"step": 3, "loss": 0.5}
    assert (tmp_path / "b.json").read_text().endswith("}\n")
    assert [json.loads(line) for line in (tmp_path / "c.jsonl").read_text().splitlines()] == [
        {"i": 0}, {"i": 1}, {"i": 2}]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "b.json", "c.jsonl"]
    assert fsyncs == ["file", "dir"] * 3


def test_replaces_an_existing_file_with_ordinary_permissions(tmp_path):
    target = tmp_path / "state.json"
    target.write_text("old")
    io.atomic_write_json(target, {"new": True})
    assert json.loads(target.read_text()) == {"new": True}
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~umask  # not mkstemp's 0600


@pytest.mark.parametrize("write", [
    lambda path: io.atomic_write_json(path, {"bad": object()}),
    lambda path: io.atomic_write_jsonl(path, [{"ok": 1}, {"bad": object()}]),  # fails after a row is written
])
def test_a_failed_serialisation_keeps_the_original(tmp_path, write, fsyncs):
    target = tmp_path / "records.jsonl"
    target.write_text('{"kept": true}\n')
    with pytest.raises(TypeError):
        write(target)
    assert target.read_text() == '{"kept": true}\n'
    assert [p.name for p in tmp_path.iterdir()] == ["records.jsonl"]
    assert "dir" not in fsyncs


def test_atomic_output_for_writers_that_need_a_path(tmp_path, fsyncs):
    target = tmp_path / "plot.png"
    with io.atomic_output(target) as staging:
        assert staging.parent == tmp_path and staging != target
        staging.write_bytes(b"\x89PNG")
    assert target.read_bytes() == b"\x89PNG"
    assert fsyncs == ["file", "dir"]

    with pytest.raises(RuntimeError), io.atomic_output(target) as staging:
        staging.write_bytes(b"half")
        raise RuntimeError("the plotting library failed")
    assert target.read_bytes() == b"\x89PNG"
    assert [p.name for p in tmp_path.iterdir()] == ["plot.png"]


def test_append_jsonl_appends_and_fsyncs(tmp_path, fsyncs):
    log = tmp_path / "metrics.jsonl"
    io.append_jsonl(log, {"step": 1})
    io.append_jsonl(log, {"step": 2})
    assert [json.loads(line)["step"] for line in log.read_text().splitlines()] == [1, 2]
    assert fsyncs == ["file", "dir", "file"]  # the directory once, when the log is created
    with pytest.raises(TypeError):
        io.append_jsonl(log, {"bad": object()})
    assert len(log.read_text().splitlines()) == 2


def test_a_missing_directory_fails_and_leaves_nothing(tmp_path):
    with pytest.raises(FileNotFoundError):
        io.atomic_write_text(tmp_path / "absent" / "x.txt", "x")
    assert list(tmp_path.iterdir()) == []


def test_rewrite_jsonl_keeps_rows_and_drops_a_torn_last_line(tmp_path):
    log = tmp_path / "metrics.jsonl"
    log.write_text('{"step": 1}\n{"step": 2}\n{"step": 3}\n{"st')  # a crash in the middle of an append
    io.rewrite_jsonl(log, lambda row: row["step"] <= 2)
    assert log.read_text() == '{"step": 1}\n{"step": 2}\n'
    log.write_text('{"step": 1}\n{"st\n{"step": 3}\n')  # damage elsewhere is not a torn append: refuse
    with pytest.raises(DataError, match="metrics.jsonl:2 is not a JSON object"):
        io.rewrite_jsonl(log, lambda row: True)
    assert log.read_text() == '{"step": 1}\n{"st\n{"step": 3}\n'


@pytest.mark.parametrize(
    ("output", "refused"),
    [("src", "is"), (".", "contains"), ("src/sub/out", "lies inside"), ("link", "is"), ("src/../src", "is"),
     ("link/out", "lies inside"), ("src2", None), ("other/out", None), ("src.incomplete", "is")],
)
def test_an_output_that_is_contains_or_lies_inside_an_input_is_refused(tmp_path, output, refused):
    from megatron_sami.errors import OutputOverlapError
    from megatron_sami.io import check_output_apart

    (tmp_path / "src" / "sub").mkdir(parents=True)
    (tmp_path / "link").symlink_to(tmp_path / "src", target_is_directory=True)
    source = tmp_path / "src.incomplete" if output == "src.incomplete" else tmp_path / "src"
    source.mkdir(exist_ok=True)
    target = tmp_path / ("src" if output == "src.incomplete" else output)
    if refused is None:
        check_output_apart(target, {"source": source}, (".incomplete",))
        return
    with pytest.raises(OutputOverlapError, match=f"{refused} the source {source}"):
        check_output_apart(target, {"source": source}, (".incomplete",))


def test_a_bind_mounted_or_renamed_source_is_caught_by_inode(tmp_path, monkeypatch):
    """Two names of one directory that no path comparison links (here: os.stat of a second
    name reports the source's inode, as a bind mount does)."""
    from megatron_sami.errors import OutputOverlapError
    from megatron_sami.io import check_output_apart

    (tmp_path / "src").mkdir()
    (tmp_path / "mnt").mkdir()
    real_stat = os.stat

    def fake_stat(path, *args, **kwargs):
        return real_stat(tmp_path / "src" if str(path) == str(tmp_path / "mnt") else path, *args, **kwargs)

    monkeypatch.setattr(os, "stat", fake_stat)
    with pytest.raises(OutputOverlapError, match="lies inside"):
        check_output_apart(tmp_path / "mnt" / "out", {"source": tmp_path / "src"})
