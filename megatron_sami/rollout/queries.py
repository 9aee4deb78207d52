"""Query datasets through ``datasets``: HH-RLHF, TL;DR, local JSONL/Parquet, the built-in sets.

Every source yields :class:`Query` (``id``, ``text``). Hub names are used when no local path is
given (they work where a hub is reachable); a local path always works and takes the hub's own
file layout (HH-RLHF: ``<path>/<subset>/<split>.jsonl[.gz]``; TL;DR: JSONL/Parquet files of
``comparisons`` rows) or a single file.

:func:`split_queries` makes the disjoint, seeded query sets: one evaluation set and one set per
iteration, so no query is generated twice and none is both trained and evaluated on.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

from megatron_sami.errors import ConfigError, QueryDataError
from megatron_sami.resources import config_dir

SOURCES = ("builtin", "hh-rlhf", "tldr", "jsonl", "parquet")
HH_RLHF_HUB = "Anthropic/hh-rlhf"
TLDR_HUB = "openai/summarize_from_feedback"


@dataclass(frozen=True)
class Query:
    """One query: a stable id (seeds its constitution draw) and its text."""

    id: str
    text: str


@dataclass
class QuerySourceConfig:
    """Where the queries come from (``queries.*``).

    Raises:
        ConfigError: an unknown ``source``.
    """

    source: str = "builtin"  # builtin | hh-rlhf | tldr | jsonl | parquet
    name: str = "dialogue"  # builtin set name (configs/queries/builtin_<name>.jsonl)
    path: str | None = None  # local file or directory; hub name used when null (hh-rlhf, tldr)
    subset: str = "helpful-base"  # hh-rlhf: helpful-base | harmless-base | ...
    split: str = "train"
    field: str = "query"  # jsonl / parquet: the text column
    id_field: str | None = "id"
    limit: int = 0  # 0: all

    def __post_init__(self) -> None:
        if self.source not in SOURCES:
            raise ConfigError(f"unknown query source '{self.source}'; use one of: {', '.join(SOURCES)}.")


def _load(builder: str, data_files=None, **kwargs):
    import datasets

    datasets.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    try:
        if data_files is not None:
            return datasets.load_dataset(builder, data_files=data_files, split="train")
        return datasets.load_dataset(builder, **kwargs)
    except FileNotFoundError as err:
        raise QueryDataError(f"query data not found: {err}; check queries.path.") from err
    except (ConnectionError, OSError) as err:
        raise QueryDataError(f"could not load '{builder}' ({err.__class__.__name__}); without a reachable hub, "
                             f"download it and set queries.path to the local files.") from err


def _existing(path: str) -> Path:
    candidate = Path(path)
    if not candidate.exists():
        raise QueryDataError(f"query path {candidate} does not exist; check queries.path.")
    return candidate


def _files(directory: Path, stem: str) -> list[str]:
    found = sorted(str(p) for p in directory.glob(f"{stem}*") if p.suffix in (".jsonl", ".json", ".gz", ".parquet"))
    if not found:
        raise QueryDataError(f"no {stem}.jsonl[.gz] or {stem}.parquet under {directory}; check queries.path/subset/split.")
    return found


def _builder_for(files: list[str]) -> str:
    return "parquet" if files[0].endswith(".parquet") else "json"


def first_human_turn(dialogue: str) -> str:
    """The first human turn of an HH-RLHF transcript ("\\n\\nHuman: ... \\n\\nAssistant: ...").

    Raises:
        QueryDataError: the transcript has no ``Human:`` turn.
    """
    start = dialogue.find("Human:")
    if start < 0:
        raise QueryDataError("an HH-RLHF row has no 'Human:' turn; is this the hh-rlhf format?")
    text = dialogue[start + len("Human:"):]
    end = text.find("\n\nAssistant:")
    return (text if end < 0 else text[:end]).strip()


def load_hh_rlhf(cfg: QuerySourceConfig) -> list[Query]:
    """HH-RLHF (``subset``, ``split``): the first human turn of each ``chosen`` transcript.

    Raises:
        QueryDataError: the files or hub are unreachable, or the rows are not HH-RLHF's.
    """
    if cfg.path:
        base = _existing(cfg.path)
        files = [str(base)] if base.is_file() else _files(base / cfg.subset if (base / cfg.subset).is_dir() else base,
                                                          cfg.split)
        rows = _load(_builder_for(files), data_files=files)
    else:
        rows = _load(HH_RLHF_HUB, data_dir=cfg.subset, split=cfg.split)
    if "chosen" not in rows.column_names:
        raise QueryDataError(f"HH-RLHF rows need a 'chosen' column, found {rows.column_names}.")
    return [Query(f"hh-{cfg.subset}-{cfg.split}-{i}", first_human_turn(row)) for i, row in enumerate(rows["chosen"])]


def load_tldr(cfg: QuerySourceConfig) -> list[Query]:
    """TL;DR ``comparisons`` rows: each distinct post (``info.post``) once, by its id.

    Raises:
        QueryDataError: the files or hub are unreachable, or the rows have no ``info`` column.
    """
    if cfg.path:
        base = _existing(cfg.path)
        files = [str(base)] if base.is_file() else _files(base, cfg.split)
        rows = _load(_builder_for(files), data_files=files)
    else:
        rows = _load(TLDR_HUB, name="comparisons", split=cfg.split)
    if "info" not in rows.column_names:
        raise QueryDataError(f"TL;DR comparison rows need an 'info' column (with id and post), found {rows.column_names}.")
    queries, seen = [], set()
    for info in rows["info"]:
        post_id = str(info.get("id"))
        if post_id in seen or not info.get("post"):
            continue
        seen.add(post_id)
        queries.append(Query(post_id, info["post"].strip()))
    return queries


def load_table(cfg: QuerySourceConfig) -> list[Query]:
    """A local JSONL or Parquet file (or directory): column ``field``, ids from ``id_field`` or
    the row number; blank texts are skipped.

    Raises:
        QueryDataError: no path, a missing path, or no ``field`` column.
    """
    if not cfg.path:
        raise QueryDataError(f"query source '{cfg.source}' needs queries.path.")
    base = _existing(cfg.path)
    files = [str(base)] if base.is_file() else _files(base, cfg.split)
    rows = _load("parquet" if cfg.source == "parquet" else "json", data_files=files)
    if cfg.field not in rows.column_names:
        raise QueryDataError(f"{base}: no '{cfg.field}' column (found {', '.join(rows.column_names)}); "
                             f"set queries.field.")
    ids = rows[cfg.id_field] if cfg.id_field and cfg.id_field in rows.column_names else range(len(rows))
    return [Query(str(i), str(text)) for i, text in zip(ids, rows[cfg.field], strict=False) if str(text).strip()]


def builtin_path(name: str) -> Path:
    """The built-in set's file, ``configs/queries/builtin_<name>.jsonl``."""
    return config_dir() / "queries" / f"builtin_{name}.jsonl"


def load_builtin(cfg: QuerySourceConfig) -> list[Query]:
    """A built-in query set by ``name``.

    Raises:
        QueryDataError: no set of that name.
    """
    path = builtin_path(cfg.name)
    if not path.is_file():
        names = sorted(p.stem.removeprefix("builtin_") for p in path.parent.glob("builtin_*.jsonl"))
        raise QueryDataError(f"unknown built-in query set '{cfg.name}'; use one of: {', '.join(names)}.")
    return load_table(QuerySourceConfig(source="jsonl", path=str(path), field="query", id_field="id"))


LOADERS = {"builtin": load_builtin, "hh-rlhf": load_hh_rlhf, "tldr": load_tldr, "jsonl": load_table,
           "parquet": load_table}


def load_queries(cfg: QuerySourceConfig) -> list[Query]:
    """The source's queries, the first ``limit`` when it is set.

    Raises:
        QueryDataError: as the source's loader, or no queries at all.
    """
    queries = LOADERS[cfg.source](cfg)
    if cfg.limit:
        queries = queries[:cfg.limit]
    if not queries:
        raise QueryDataError(f"query source '{cfg.source}' gave no queries.")
    return queries


@dataclass(frozen=True)
class QuerySplit:
    """:func:`split_queries`' disjoint sets: the evaluation queries and each iteration's."""

    evaluation: list[Query]
    per_iteration: list[list[Query]]


def split_queries(queries: list[Query], iterations: int, per_iteration: int, num_eval: int, seed: int) -> QuerySplit:
    """Disjoint seeded sets: ``num_eval`` evaluation queries, then ``per_iteration`` for each iteration.

    Raises:
        QueryDataError: the source has fewer queries than the sets need.
    """
    needed = num_eval + iterations * per_iteration
    if needed > len(queries):
        raise QueryDataError(f"{iterations} iterations x {per_iteration} queries + {num_eval} evaluation queries need "
                             f"{needed} distinct queries, but the source has {len(queries)}; lower them or add queries.")
    order = list(queries)
    random.Random(seed).shuffle(order)
    evaluation, rest = order[:num_eval], order[num_eval:]
    return QuerySplit(evaluation, [rest[t * per_iteration:(t + 1) * per_iteration] for t in range(iterations)])
