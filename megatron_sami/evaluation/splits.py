"""The principle splits an evaluation reports, and the names its results and directories use.

A constitution set's principles are either ``train`` (the ones SAMI learns) or ``heldout``
(never trained on). Evaluations report the two separately, as ``learned`` and ``heldout``.
"""

from __future__ import annotations

from megatron_sami.rollout.constitutions import ConstitutionSet

SPLIT_LABELS = {"train": "learned", "heldout": "heldout"}


def split_label(split: str) -> str:
    """``learned`` for ``train``, ``heldout`` for ``heldout``; any other name unchanged."""
    return SPLIT_LABELS.get(split, split)


def splits_of(cset: ConstitutionSet) -> list[str]:
    """The splits (``train`` first, then ``heldout``) that have at least one principle in ``cset``."""
    return [split for split in ("train", "heldout") if any(p.split == split for p in cset.principles)]
