"""Constitutions as data, and how each query samples its C constitutions. Pure code.

A constitution set (``configs/constitutions/<name>.yaml``) lists principles, each with a
``definition``, an ``antithesis`` and a ``split`` (``train`` or ``heldout``). For one query a
constitution is a numbered list of principles, each stated positively (definition) or negated
(antithesis): a *sign pattern*. Constitution 0 is always the all-positive one.

- C = 2: the positive constitution and one negative that negates one or both principles
  (chosen at random among the non-positive patterns: the scheme of Fränken et al. 2024,
  "Self-Supervised Alignment with Mutual Information: Learning to Follow Principles without
  Preference Labels", arXiv:2404.14313, the paper below).
- C > 2: the positive constitution and C - 1 further distinct patterns, each drawn by flipping
  every principle independently with probability 1/2.

The principle order is shuffled once per query (all C constitutions of a query share it), with
a generator seeded by the caller, so a rerun samples the same constitutions.
"""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from megatron_sami.errors import ConfigError
from megatron_sami.resources import config_dir

SPLITS = ("train", "heldout")


@dataclass(frozen=True)
class Principle:
    """A named principle: its definition, its antithesis, and its split (``train``/``heldout``)."""

    name: str
    definition: str
    antithesis: str
    split: str = "train"

    def text(self, positive: bool) -> str:
        """The definition (``positive``) or the antithesis."""
        return self.definition if positive else self.antithesis


@dataclass(frozen=True)
class ConstitutionSet:
    """A constitution set as :func:`load_constitution_set` reads it; ``task``: dialogue or summarization."""

    name: str
    task: str
    principles: tuple[Principle, ...]

    def pool(self, split: str) -> list[Principle]:
        """Principles of one split (``train``, ``heldout``) or of all (``all``).

        Raises:
            ConfigError: an unknown split, or one without principles in this set.
        """
        if split == "all":
            return list(self.principles)
        if split not in SPLITS:
            raise ConfigError(f"constitution split '{split}' is unknown; use train, heldout or all.")
        chosen = [p for p in self.principles if p.split == split]
        if not chosen:
            raise ConfigError(f"constitution set '{self.name}' has no '{split}' principles.")
        return chosen


@dataclass
class SamplingConfig:
    """How one query's constitutions are drawn (validated where it is used, against its set:
    :func:`validate_sampling`).

    Raises:
        ConfigError: ``num_constitutions`` < 2 or ``principles_per_query`` < 0.
    """

    num_constitutions: int = 2
    principles_per_query: int = 0  # 0: every principle of the split
    split: str = "train"
    shuffle_order: bool = True

    def __post_init__(self) -> None:
        if self.num_constitutions < 2:
            raise ConfigError(f"num_constitutions must be >= 2, got {self.num_constitutions}.")
        if self.principles_per_query < 0:
            raise ConfigError("principles_per_query must be >= 0 (0 means all principles).")


@dataclass(frozen=True)
class SampledConstitution:
    """One rendered constitution: its text, its principles' names, and each one's sign."""

    text: str
    principles: tuple[str, ...]
    signs: tuple[bool, ...]  # True: definition, False: antithesis

    @property
    def is_positive(self) -> bool:
        """Every principle stated by its definition."""
        return all(self.signs)


@dataclass
class QueryConstitutions:
    """The C constitutions of one query, the positive one first."""

    constitutions: list[SampledConstitution] = field(default_factory=list)

    def texts(self) -> list[str]:
        """The C constitution texts, in order."""
        return [c.text for c in self.constitutions]


def constitution_path(name_or_path: str) -> Path:
    """A ``.yaml``/``.yml`` path as given, else the catalogue's ``constitutions/<name>.yaml``."""
    candidate = Path(name_or_path)
    if candidate.suffix in (".yaml", ".yml"):
        return candidate
    return config_dir() / "constitutions" / f"{name_or_path}.yaml"


def available_sets() -> list[str]:
    """The catalogue's constitution set names."""
    return sorted(p.stem for p in (config_dir() / "constitutions").glob("*.yaml"))


def load_constitution_set(name_or_path: str) -> ConstitutionSet:
    """A constitution set by catalogue name or path, validated: every principle needs both sides.

    Raises:
        ConfigError: the file is missing, has no principles, or a principle lacks a definition
            or antithesis, has an unknown split, or repeats a name.
    """
    path = constitution_path(name_or_path)
    if not path.is_file():
        raise ConfigError(f"constitution set '{name_or_path}' not found ({path}); use a file path or one of: "
                          f"{', '.join(available_sets())}.")
    raw = yaml.safe_load(path.read_text()) or {}
    entries = raw.get("principles")
    if not isinstance(entries, list) or not entries:
        raise ConfigError(f"{path}: needs a non-empty 'principles' list.")
    principles, seen = [], set()
    for index, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise ConfigError(f"{path}: principle {index} must be a mapping with name, definition and antithesis.")
        name = str(entry.get("name", f"principle-{index}"))
        for key in ("definition", "antithesis"):
            if not isinstance(entry.get(key), str) or not entry[key].strip():
                raise ConfigError(f"{path}: principle '{name}' has no {key}; every principle needs a definition "
                                  f"and an antithesis.")
        split = entry.get("split", "train")
        if split not in SPLITS:
            raise ConfigError(f"{path}: principle '{name}' has split '{split}'; use train or heldout.")
        if name in seen:
            raise ConfigError(f"{path}: principle name '{name}' appears twice.")
        seen.add(name)
        principles.append(Principle(name, entry["definition"].strip(), entry["antithesis"].strip(), split))
    return ConstitutionSet(str(raw.get("name", path.stem)), str(raw.get("task", "dialogue")), tuple(principles))


def max_constitutions(num_principles: int) -> int:
    """How many distinct constitutions P principles give: 2**P sign patterns."""
    return 2 ** num_principles


def sign_patterns(num_principles: int, num_constitutions: int, rng: random.Random) -> list[tuple[bool, ...]]:
    """C distinct sign patterns, the all-positive one first (module docstring: how they are drawn).

    Raises:
        ConfigError: C > 2**num_principles.
    """
    if num_constitutions > max_constitutions(num_principles):
        raise ConfigError(f"num_constitutions={num_constitutions} needs more distinct constitutions than "
                          f"{num_principles} principle(s) allow ({max_constitutions(num_principles)}); lower it or "
                          f"use more principles per query.")
    positive = (True,) * num_principles
    if num_constitutions == 2:
        negatives = [p for p in itertools.product((True, False), repeat=num_principles) if p != positive]
        return [positive, rng.choice(negatives)]
    patterns = [positive]
    while len(patterns) < num_constitutions:
        pattern = tuple(rng.random() < 0.5 for _ in range(num_principles))
        if pattern not in patterns:
            patterns.append(pattern)
    return patterns


def all_sign_patterns(num_principles: int) -> list[tuple[bool, ...]]:
    """Every pattern, all-positive first and all-negative last (the paper's C = 4 evaluation set)."""
    return sorted(itertools.product((True, False), repeat=num_principles), key=lambda p: (-sum(p), p[::-1]))


def render(principles: list[Principle], signs: tuple[bool, ...]) -> SampledConstitution:
    """The numbered constitution: principle i's definition where ``signs[i]``, else its antithesis."""
    lines = [f"{number}. {p.text(sign)}" for number, (p, sign) in enumerate(zip(principles, signs, strict=False), start=1)]
    return SampledConstitution("\n".join(lines), tuple(p.name for p in principles), signs)


def choose_principles(cset: ConstitutionSet, config: SamplingConfig, rng: random.Random) -> list[Principle]:
    """The query's principles: ``principles_per_query`` of the split's (all for 0), drawn and
    (with ``shuffle_order``) ordered by ``rng``.

    Raises:
        ConfigError: more principles per query than the split has, or as :meth:`ConstitutionSet.pool`.
    """
    pool = cset.pool(config.split)
    count = config.principles_per_query or len(pool)
    if count > len(pool):
        raise ConfigError(f"principles_per_query={count} exceeds the {len(pool)} '{config.split}' principles of "
                          f"'{cset.name}'.")
    chosen = rng.sample(pool, count) if count < len(pool) else list(pool)
    if config.shuffle_order:
        rng.shuffle(chosen)
    return chosen


def sample_constitutions(cset: ConstitutionSet, config: SamplingConfig, rng: random.Random) -> QueryConstitutions:
    """The C constitutions of one query (constitution 0 positive), drawn with ``rng``.

    Raises:
        ConfigError: as :func:`choose_principles` and :func:`sign_patterns`.
    """
    principles = choose_principles(cset, config, rng)
    patterns = sign_patterns(len(principles), config.num_constitutions, rng)
    return QueryConstitutions([render(principles, pattern) for pattern in patterns])


def evaluation_constitutions(cset: ConstitutionSet, config: SamplingConfig, rng: random.Random) -> QueryConstitutions:
    """Every sign pattern of the query's principles (C = 2**P: for two principles the paper's
    four); ``config.num_constitutions`` is not read.

    Raises:
        ConfigError: as :func:`choose_principles`.
    """
    principles = choose_principles(cset, config, rng)
    return QueryConstitutions([render(principles, pattern) for pattern in all_sign_patterns(len(principles))])


def validate_sampling(cset: ConstitutionSet, config: SamplingConfig) -> None:
    """Refuse, before any work, a C that the set's principles cannot provide.

    Raises:
        ConfigError: as :func:`choose_principles`, or C > 2**(principles per query).
    """
    count = config.principles_per_query or len(cset.pool(config.split))
    choose_principles(cset, config, random.Random(0))
    if config.num_constitutions > max_constitutions(count):
        raise ConfigError(f"num_constitutions={config.num_constitutions} is larger than the constitutions allow: "
                          f"{count} principle(s) per query give at most {max_constitutions(count)} distinct "
                          f"constitutions; lower num_constitutions or raise principles_per_query.")


def positive_constitution(cset: ConstitutionSet, config: SamplingConfig, rng: random.Random) -> QueryConstitutions:
    """The query's principles (drawn as the MI evaluation draws them), every one positive: the
    win-rate evaluation's one constitution per query.

    Raises:
        ConfigError: as :func:`choose_principles`.
    """
    principles = choose_principles(cset, config, rng)
    return QueryConstitutions([render(principles, (True,) * len(principles))])
