"""The checkpoint-directory format's small files, checked without a process group."""

from __future__ import annotations

import pytest

from megatron_sami.errors import ConversionError
from megatron_sami.models.catalogue import load_model_config
from megatron_sami.models.checkpoint_dir import check_output_path, read_checkpoint_model, write_model_files


def test_model_files_round_trip(tmp_path):
    model = load_model_config("tiny-llama")
    record = {"params_dtype": "fp32", "source_dtype": "float32"}
    write_model_files(tmp_path, model, record)
    (tmp_path / "weights").mkdir()
    (tmp_path / "hf").mkdir()
    assert read_checkpoint_model(tmp_path) == (model, record)


def test_a_directory_without_hf_files_is_refused_before_any_training(tmp_path):
    write_model_files(tmp_path, load_model_config("tiny-llama"), {})
    (tmp_path / "weights").mkdir()
    with pytest.raises(ConversionError, match="lacks hf/"):
        read_checkpoint_model(tmp_path)


def test_a_directory_without_weights_is_not_a_checkpoint(tmp_path):
    write_model_files(tmp_path, load_model_config("tiny-llama"), {})
    with pytest.raises(ConversionError, match="not a converted checkpoint.*sami-convert hf-to-megatron"):
        read_checkpoint_model(tmp_path)


def test_an_interrupted_write_is_named(tmp_path):
    (tmp_path / "ckpt.incomplete").mkdir()
    with pytest.raises(ConversionError, match="interrupted"):
        read_checkpoint_model(tmp_path / "ckpt")


def test_output_path_checks(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConversionError, match="is a file"):
        check_output_path(tmp_path / "file", overwrite=True)
    (tmp_path / "earlier").mkdir()
    (tmp_path / "earlier" / "model.yaml").write_text("name: x\n")
    with pytest.raises(ConversionError, match="--overwrite"):
        check_output_path(tmp_path / "earlier", overwrite=False)
    check_output_path(tmp_path / "earlier", overwrite=True)
    check_output_path(tmp_path / "new", overwrite=False)


@pytest.mark.parametrize(
    ("file_name", "content", "expected"),
    [("model.yaml", b"name: tiny\nfamily: [llama\n", "model.yaml is not valid YAML"),
     ("model.yaml", b"- llama\n", "model.yaml holds a YAML list"),
     ("model.yaml", b"name: caf\xe9\n", "model.yaml is not valid YAML"),
     ("conversion.json", b'{"params_dtype": ', "conversion.json is not valid JSON"),
     ("conversion.json", b"[1]", "conversion.json is not a JSON object")],
    ids=["yaml-syntax", "yaml-list", "not-utf8", "json-syntax", "json-list"],
)
def test_unreadable_small_files_are_one_sentence_naming_the_file(tmp_path, file_name, content, expected):
    write_model_files(tmp_path, load_model_config("tiny-llama"), {})
    (tmp_path / "weights").mkdir()
    (tmp_path / "hf").mkdir()
    (tmp_path / file_name).write_bytes(content)
    with pytest.raises(ConversionError, match=expected):
        read_checkpoint_model(tmp_path)


def test_an_output_overlapping_an_input_is_refused_before_the_overwrite_question(tmp_path):
    from megatron_sami.errors import OutputOverlapError

    with pytest.raises(OutputOverlapError, match="contains the checkpoint"):
        check_output_path(tmp_path, overwrite=False, inputs={"checkpoint": tmp_path / "ckpt"})
    with pytest.raises(OutputOverlapError, match="is the checkpoint"):
        check_output_path(tmp_path / "ckpt", overwrite=True, inputs={"checkpoint": tmp_path / "ckpt"})


@pytest.mark.parametrize(("content", "replaceable"), [
    ({}, True), ({"model.yaml": "name: x\n"}, True), ({"config.json": "{}"}, True), ({"notes.txt": "mine"}, False)])
def test_overwrite_replaces_only_an_empty_directory_or_an_earlier_output(tmp_path, content, replaceable):
    from megatron_sami.errors import ConversionError
    from megatron_sami.models.checkpoint_dir import check_output_path

    out = tmp_path / "out"
    out.mkdir()
    for name, text in content.items():
        (out / name).write_text(text)
    if replaceable:
        check_output_path(out, overwrite=True)
    else:
        with pytest.raises(ConversionError, match="not replaced even with --overwrite"):
            check_output_path(out, overwrite=True)
