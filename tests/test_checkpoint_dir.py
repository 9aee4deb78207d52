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
    with pytest.raises(ConversionError, match="--overwrite"):
        check_output_path(tmp_path, overwrite=False)
    check_output_path(tmp_path, overwrite=True)
    check_output_path(tmp_path / "new", overwrite=False)
