"""Records and their tokenisation into C x C blocks with response-only masks (pure)."""

import json

import pytest
import sami_jobs
import torch

from megatron_sami.alignment.data import (
    DataError,
    OverlengthError,
    read_records,
    tokenize_record,
    tokenize_records,
)
from megatron_sami.testing.tiny import make_tiny_tokenizer


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return make_tiny_tokenizer(tmp_path_factory.mktemp("tok"))


def test_masks_select_exactly_each_response_under_each_prompt(tokenizer):
    (record,) = sami_jobs.make_records(1, 3)
    block = tokenize_record(record, tokenizer, sami_jobs.TEMPLATE, seq_length=96)
    assert block["tokens"].shape == (9, 96)
    for k in range(3):
        prompt_ids = tokenizer(sami_jobs.TEMPLATE.render(record.constitutions[k], record.query))["input_ids"]
        for j in range(3):
            row = k * 3 + j
            scored = block["labels"][row][block["loss_mask"][row].bool()].tolist()
            assert tokenizer.decode(scored) == " " + record.responses[j]
            # Inputs are the labels shifted by one: the prompt is the context of the first response token.
            assert block["tokens"][row, : len(prompt_ids)].tolist() == prompt_ids


def test_overlength_is_refused_or_dropped_never_cut(tokenizer):
    records = sami_jobs.make_records(2, 2)
    records[1].responses[0] = "word " * 200
    with pytest.raises(OverlengthError, match="record q1: constitution 0 \\+ response 0"):
        tokenize_records(records, tokenizer, sami_jobs.TEMPLATE, 96)
    kept, dropped = tokenize_records(records, tokenizer, sami_jobs.TEMPLATE, 96, on_overlength="drop")
    assert (len(kept), dropped) == (1, 1)


def _write(tmp_path, lines):
    path = tmp_path / "records.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


GOOD = {"id": "a", "query": "q", "constitutions": ["c1", "c2"], "responses": ["r1", "r2"]}


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        ([json.dumps(GOOD), "{not json"], "records.jsonl:2: not valid JSON"),
        ([json.dumps(GOOD), json.dumps({**GOOD, "constitutions": ["a", "b", "c"], "responses": ["x", "y", "z"]})],
         "record records.jsonl:2 has C=3"),
        ([json.dumps({**GOOD, "responses": ["r1", "  "]})], "records.jsonl:1: response 1 is empty"),
        ([json.dumps({**GOOD, "responses": ["r1"]})], "exactly one response per constitution"),
        ([json.dumps({"query": "q"})], "missing key\\(s\\) constitutions, responses"),
    ],
)
def test_bad_records_name_the_line(tmp_path, lines, message):
    if "has C=3" in message:
        lines[1] = json.dumps({**json.loads(lines[1]), "id": "records.jsonl:2"})
    with pytest.raises(DataError, match=message):
        read_records(_write(tmp_path, lines))


def test_good_records_round_trip_with_metadata(tmp_path):
    records = read_records(_write(tmp_path, [json.dumps({**GOOD, "source": "hh"})]))
    assert records[0].metadata == {"source": "hh"} and records[0].num_constitutions == 2
    assert torch.is_tensor(tokenize_records(records, make_tiny_tokenizer(tmp_path / "t"),
                                            sami_jobs.TEMPLATE, 64)[0][0]["tokens"])
