"""SAMI training records and their tokenisation into C x C (prompt, response) pairs. Pure code.

The layout follows Fränken et al. 2024, "Self-Supervised Alignment with Mutual Information:
Learning to Follow Principles without Preference Labels", arXiv:2404.14313: every response of a
query is scored under every constitution of that query, response tokens only.

A record is one JSONL line: ``{"id", "query", "constitutions": [C strings], "responses":
[C strings], ...free metadata}`` where response ``j`` was generated under constitution ``j``.
Each record becomes C*C sequences, row-major: sequence ``k*C + j`` is constitution ``k``'s
prompt followed by response ``j``. Only response tokens carry loss (``loss_mask``).

Sequences longer than ``seq_length`` are never cut (a cut response would change what is
scored): ``on_overlength="error"`` (default) refuses the record, naming it; ``"drop"`` skips
it and counts it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from megatron_sami.errors import ConfigError, DataError, OverlengthError

IGNORE = -100


@dataclass
class PromptTemplate:
    """A base-model prompt with ``{constitution}`` and ``{query}`` placeholders; ``response_prefix``
    goes before each response's text (e.g. the space after ``Assistant:``).

    Raises:
        ConfigError: ``prompt`` lacks a placeholder.
    """

    name: str = "dialogue"
    prompt: str = "Constitution:\n{constitution}\n\nHuman: {query}\n\nAssistant:"
    response_prefix: str = " "

    def __post_init__(self) -> None:
        for placeholder in ("{constitution}", "{query}"):
            if placeholder not in self.prompt:
                raise ConfigError(f"template '{self.name}' lacks the {placeholder} placeholder; add it to the prompt.")

    def render(self, constitution: str, query: str) -> str:
        """The prompt with both placeholders filled."""
        return self.prompt.replace("{constitution}", constitution).replace("{query}", query)


def load_template(name: str) -> PromptTemplate:
    """The prompt template ``configs/template/<name>.yaml`` (what ``template=<name>`` selects).

    Raises:
        ConfigError: no such template file, or its prompt lacks a placeholder.
    """
    from omegaconf import OmegaConf

    from megatron_sami.resources import config_dir
    from megatron_sami.typed_config import to_typed

    template_file = config_dir() / "template" / f"{name}.yaml"
    if not template_file.is_file():
        raise ConfigError(f"unknown template '{name}' (no {template_file}); add the file or choose one in "
                          f"{template_file.parent}.")
    return to_typed(PromptTemplate, OmegaConf.load(template_file), "template")


@dataclass
class SamiRecord:
    """One query, its C constitutions and the C responses (response j written under constitution j)."""

    id: str
    query: str
    constitutions: list[str]
    responses: list[str]
    metadata: dict = field(default_factory=dict)

    @property
    def num_constitutions(self) -> int:
        """C."""
        return len(self.constitutions)


def parse_record(line: str, where: str) -> SamiRecord:
    """One JSONL line as a record; ``where`` (e.g. ``file:line``) names it in errors and is its
    id when the line has none.

    Raises:
        DataError: not a JSON object, a missing key, C < 2, C constitutions but not C responses,
            or an empty response or constitution.
    """
    try:
        raw = json.loads(line)
    except json.JSONDecodeError as err:
        raise DataError(f"{where}: not valid JSON ({err.msg}); fix or remove the line.") from err
    if not isinstance(raw, dict):
        raise DataError(f"{where}: a record must be a JSON object.")
    missing = [key for key in ("query", "constitutions", "responses") if key not in raw]
    if missing:
        raise DataError(f"{where}: missing key(s) {', '.join(missing)}.")
    constitutions, responses = raw["constitutions"], raw["responses"]
    if not (isinstance(constitutions, list) and isinstance(responses, list)):
        raise DataError(f"{where}: constitutions and responses must be lists of strings.")
    if len(constitutions) < 2 or len(constitutions) != len(responses):
        raise DataError(f"{where}: needs C >= 2 constitutions and exactly one response per constitution, "
                        f"got {len(constitutions)} and {len(responses)}.")
    for kind, texts in (("response", responses), ("constitution", constitutions)):
        for index, text in enumerate(texts):
            if not isinstance(text, str):
                raise DataError(f"{where}: {kind} {index} is {json.dumps(text)} ({_json_type(text)}), not a string; "
                                f"every {kind} must be text.")
            if not text.strip():
                raise DataError(f"{where}: {kind} {index} is empty; filter the records before training.")
    if not isinstance(raw["query"], str):
        raise DataError(f"{where}: query must be a string.")
    extra = {key: value for key, value in raw.items() if key not in ("id", "query", "constitutions", "responses")}
    return SamiRecord(str(raw.get("id", where)), raw["query"], constitutions, responses, extra)


def _json_type(value) -> str:
    """What JSON calls ``value``'s type (number, boolean, null, array, object)."""
    if isinstance(value, bool):
        return "a boolean"
    names = {int: "a number", float: "a number", type(None): "null", list: "an array", dict: "an object"}
    return names.get(type(value), type(value).__name__)


def read_records(path: str | Path) -> list[SamiRecord]:
    """All records of a JSONL file; every record must have the same C.

    Raises:
        DataError: the file is missing or empty, a line is not UTF-8 text or not a valid record
            (:func:`parse_record`), or two records differ in C.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"records file {path} does not exist; check data.records.")
    records = []
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise DataError(f"{path}:{number}: byte {err.start + 1} of the line (0x{raw[err.start]:02x}) is not "
                                "UTF-8 text; re-encode the file as UTF-8 or remove the line.") from err
            if line.strip():
                records.append(parse_record(line, f"{path}:{number}"))
    if not records:
        raise DataError(f"records file {path} holds no records.")
    counts = {record.num_constitutions for record in records}
    if len(counts) > 1:
        first = records[0].num_constitutions
        odd = next(r for r in records if r.num_constitutions != first)
        raise DataError(f"{path}: record {odd.id} has C={odd.num_constitutions} constitutions but earlier records "
                        f"have C={first}; all records of a run must share C.")
    return records


def tokenize_record(record: SamiRecord, tokenizer, template: PromptTemplate, seq_length: int,
                    append_eos: bool = False) -> dict[str, torch.Tensor]:
    """The C*C sequences of one record: tokens, labels (next token) and response loss mask.

    Row ``k*C + j`` is constitution ``k``'s rendered prompt followed by ``response_prefix`` +
    response ``j`` (and EOS with ``append_eos``), right-padded to ``seq_length``.

    Returns:
        ``{"tokens", "labels", "loss_mask"}``, each [C*C, seq_length]: int64 ids, int64 next
        tokens (0 where nothing is predicted), float32 1.0 on the positions that predict a
        response token.

    Raises:
        ConfigError: ``append_eos`` with a tokenizer that has no EOS token.
        OverlengthError: a sequence is longer than ``seq_length`` (never cut).
    """
    C = record.num_constitutions
    responses = [tokenizer(template.response_prefix + text, add_special_tokens=False)["input_ids"]
                 for text in record.responses]
    if append_eos:
        if tokenizer.eos_token_id is None:
            raise ConfigError("data.append_eos needs a tokenizer with an EOS token.")
        responses = [ids + [tokenizer.eos_token_id] for ids in responses]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    tokens = torch.full((C * C, seq_length), pad_id, dtype=torch.long)
    labels = torch.full((C * C, seq_length), IGNORE, dtype=torch.long)
    mask = torch.zeros(C * C, seq_length)
    for k, constitution in enumerate(record.constitutions):
        prompt = tokenizer(template.render(constitution, record.query))["input_ids"]
        for j, response in enumerate(responses):
            ids = prompt + response
            if len(ids) - 1 > seq_length:
                raise OverlengthError(
                    f"record {record.id}: constitution {k} + response {j} is {len(ids) - 1} tokens, longer than "
                    f"seq_length={seq_length}; raise data.seq_length or set data.on_overlength=drop.")
            row = k * C + j
            length = len(ids) - 1
            tokens[row, :length] = torch.tensor(ids[:-1])
            labels[row, :length] = torch.tensor(ids[1:])
            mask[row, len(prompt) - 1:length] = 1.0
    return {"tokens": tokens, "labels": labels.clamp(min=0), "loss_mask": mask}


def tokenize_records(records: list[SamiRecord], tokenizer, template: PromptTemplate, seq_length: int,
                     append_eos: bool = False, on_overlength: str = "error") -> tuple[list[dict], int]:
    """Tokenise every record (:func:`tokenize_record`); returns (tokenised records, number
    dropped for length: ``on_overlength="drop"``).

    Raises:
        ConfigError: an unknown ``on_overlength``, or as :func:`tokenize_record`.
        OverlengthError: a record is too long and ``on_overlength="error"``.
    """
    if on_overlength not in ("error", "drop"):
        raise ConfigError(f"data.on_overlength '{on_overlength}' is unknown; use error or drop.")
    tokenized, dropped = [], 0
    for record in records:
        try:
            tokenized.append(tokenize_record(record, tokenizer, template, seq_length, append_eos))
        except OverlengthError:
            if on_overlength == "error":
                raise
            dropped += 1
    return tokenized, dropped


def check_vocabulary(tokenized: list[dict[str, torch.Tensor]], vocab_size: int, tokenizer_source: str,
                     model_name: str) -> None:
    """Refuse token ids the model has no embedding row for (a tokenizer of another model).

    Args:
        tokenized: items of :func:`tokenize_record` (``tokens`` and ``labels``, int64 [rows, T]).
        vocab_size: the model's vocabulary size (HF ``vocab_size``, before Megatron's padding).

    Raises:
        DataError: an id is >= ``vocab_size``; the sentence names the tokenizer and the fix.
    """
    largest = max((int(torch.maximum(item["tokens"].max(), item["labels"].max())) for item in tokenized), default=-1)
    if largest >= vocab_size:
        raise DataError(f"the tokenizer {tokenizer_source} produces token id {largest}, beyond {model_name}'s "
                        f"vocabulary of {vocab_size}; use the tokenizer of the model being trained or scored "
                        f"(data.tokenizer / tokenizer, or leave it unset to use the checkpoint's own).")

def used_lengths(mask_NT: torch.Tensor) -> torch.Tensor:
    """[N] tokens each of the [N, T] sequences really uses (in ``mask_NT``'s dtype): the
    response, which the mask marks, ends it."""
    positions = torch.arange(1, mask_NT.shape[1] + 1, dtype=mask_NT.dtype)
    return (mask_NT * positions).amax(dim=1)


def microbatch_lengths(needed: list[int], multiple: int, each: bool, limit: int | None = None) -> list[int]:
    """The length each microbatch of a step is padded to: what it needs, rounded up to
    ``multiple`` (at most ``limit``). With ``each`` every microbatch gets its own length
    (possible without pipeline parallelism); otherwise all get the step's longest, as pipeline
    stages exchange fixed shapes."""
    lengths = [-(-n // multiple) * multiple for n in needed]
    if limit is not None:
        lengths = [min(limit, n) for n in lengths]
    return lengths if each else [max(lengths)] * len(lengths)


def collate(tokenized: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stack whole C x C blocks of several queries into one microbatch ([queries * C * C, T] each)."""
    return {key: torch.cat([item[key] for item in tokenized]) for key in tokenized[0]}
