"""The principle writer: a model drafts principles and antitheses; we parse, validate and save.

The prompt shows the seed instruction and a few example principles in a fixed line format::

    Principle: The assistant ...
    Antithesis: The assistant ...

Every Principle/Antithesis pair in the model's output is parsed; pairs that are empty, too
long, identical on both sides, or repeat an earlier principle are rejected (counted). The
accepted principles are saved in the constitution format of ``configs/constitutions/``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import yaml

from megatron_sami.errors import PrincipleWriterError as PrincipleWriterError  # re-exported
from megatron_sami.rollout.constitutions import ConstitutionSet

PAIR = re.compile(r"Principle:\s*(?P<definition>[^\n]+)\s*\n\s*Antithesis:\s*(?P<antithesis>[^\n]+)", re.IGNORECASE)
MAX_WORDS = 40


@dataclass(frozen=True)
class Draft:
    """One drafted principle and its antithesis."""

    definition: str
    antithesis: str


def writer_prompt(seed_prompt: str, examples: ConstitutionSet, count: int) -> str:
    """The writer's prompt: the seed instruction, a request for ``count`` principles, and the
    examples' principles in the line format, ending in ``Principle:``."""
    shown = "\n\n".join(f"Principle: {p.definition}\nAntithesis: {p.antithesis}" for p in examples.principles)
    return (f"{seed_prompt.strip()}\n\nWrite {count} new principles, each followed by its antithesis (its opposite), "
            f"one sentence each, in exactly this format:\n\n{shown}\n\nPrinciple:")


def parse_drafts(text: str) -> list[Draft]:
    """Every Principle/Antithesis pair in the text (the prompt's trailing 'Principle:' included)."""
    text = text if text.lstrip().lower().startswith("principle:") else "Principle: " + text.lstrip()
    return [Draft(m["definition"].strip(), m["antithesis"].strip()) for m in PAIR.finditer(text)]


def rejection(draft: Draft, seen: set[str]) -> str | None:
    """Why a draft is rejected (empty, too long, antithesis equals principle, duplicate of
    ``seen`` lower-cased definitions), or None."""
    if not draft.definition or not draft.antithesis:
        return "empty"
    if len(draft.definition.split()) > MAX_WORDS or len(draft.antithesis.split()) > MAX_WORDS:
        return "too long"
    if draft.definition.lower() == draft.antithesis.lower():
        return "antithesis equals principle"
    if draft.definition.lower() in seen:
        return "duplicate"
    return None


def accept(drafts: list[Draft], existing: set[str]) -> tuple[list[Draft], dict[str, int]]:
    """(accepted drafts in order, rejections counted by reason); ``existing``: lower-cased
    definitions already in use."""
    kept, rejected, seen = [], {}, set(existing)
    for draft in drafts:
        reason = rejection(draft, seen)
        if reason:
            rejected[reason] = rejected.get(reason, 0) + 1
            continue
        seen.add(draft.definition.lower())
        kept.append(draft)
    return kept, rejected


def to_constitution_yaml(name: str, task: str, drafts: list[Draft], heldout: int = 0) -> str:
    """A constitution set file (``configs/constitutions/`` format) of the drafts, the last
    ``heldout`` of them in the ``heldout`` split."""
    principles = [{"name": f"{name}-{index:02d}", "definition": d.definition, "antithesis": d.antithesis,
                   "split": "heldout" if index >= len(drafts) - heldout else "train"}
                  for index, d in enumerate(drafts)]
    header = "# Written by sami-write-principles; review before training.\n"
    return header + yaml.safe_dump({"name": name, "task": task, "principles": principles}, sort_keys=False,
                                   allow_unicode=True, width=1000)
