"""Filters applied to generated records before training, with a count per reason. Pure code.

A record is dropped for the first rule it breaks, checked in this order:

- ``empty``: a response is empty (after stripping);
- ``truncated``: a response ran into ``max_new_tokens`` (when ``drop_truncated``);
- ``debris``: a response contains template debris (e.g. "[insert", "Human:");
- ``no_sentence_end``: the positive response (constitution 0) does not end a sentence;
- ``identical``: the positive response equals one of the negative responses.

The debris, sentence-end and identical rules are the filters of Fränken et al. 2024,
"Self-Supervised Alignment with Mutual Information: Learning to Follow Principles without
Preference Labels", arXiv:2404.14313.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field

from megatron_sami.errors import DataError

REASONS = ("empty", "truncated", "debris", "no_sentence_end", "identical")


@dataclass
class FilterConfig:
    """The rules' settings (``filters.*``); the module docstring lists the rules."""

    debris: list[str] = field(default_factory=lambda: ["[insert", "Response:", "Human:", "Assistant:",
                                                       "Constitution:", "<|im_start|>", "POST:"])
    drop_truncated: bool = True
    require_sentence_end: bool = True
    sentence_end: str = ".!?"
    closing: str = "\"')]*"  # may follow the sentence end ("... done.)" ends a sentence)
    drop_identical: bool = True


def ends_sentence(text: str, cfg: FilterConfig) -> bool:
    """Whether ``text`` ends with a ``sentence_end`` character (closing quotes or brackets may follow)."""
    stripped = text.rstrip().rstrip(cfg.closing)
    return bool(stripped) and stripped[-1] in cfg.sentence_end


def rejection_reason(record: dict, cfg: FilterConfig) -> str | None:
    """The first rule a generated record (``responses``, ``metadata.finished``) breaks, or None.

    Raises:
        DataError: a response is not a string (a number is not an empty response: it is no text).
    """
    for index, response in enumerate(record["responses"]):
        if not isinstance(response, str):
            raise DataError(f"record {record.get('id', '?')}: response {index} is {json.dumps(response)}, not a "
                            "string; responses must be text.")
    responses = [r.strip() for r in record["responses"]]
    finished = record.get("metadata", {}).get("finished", [True] * len(responses))
    if any(not r for r in responses):
        return "empty"
    if cfg.drop_truncated and not all(finished):
        return "truncated"
    if any(marker in r for marker in cfg.debris for r in responses):
        return "debris"
    if cfg.require_sentence_end and not ends_sentence(responses[0], cfg):
        return "no_sentence_end"
    if cfg.drop_identical and any(responses[0] == other for other in responses[1:]):
        return "identical"
    return None


def filter_records(records: list[dict], cfg: FilterConfig) -> tuple[list[dict], dict[str, int]]:
    """(kept records, counts) with counts for every reason plus ``input`` and ``kept``."""
    kept, counts = [], Counter({reason: 0 for reason in REASONS})
    for record in records:
        reason = rejection_reason(record, cfg)
        if reason is None:
            kept.append(record)
        else:
            counts[reason] += 1
    return kept, {"input": len(records), **dict(counts), "kept": len(kept)}
