"""Atomic, durable writes of the text, JSON and JSONL files the project writes.

A reader (a resumed run, a rerun of ``sami-iterate``, a batch script after a crash) sees either
the old file or the whole new one, never a prefix, and a file whose write returned survives a
power loss. Every helper does the same four steps:

1. write the content to a temporary file in the target's own directory (a rename is atomic
   only within one file system);
2. flush and ``fsync`` that file, so its bytes are on disk before its name is;
3. ``os.replace`` it onto the target (atomic on POSIX, and it overwrites an existing file);
4. ``fsync`` the directory, so the new name itself survives a crash.

If writing or serialising fails part of the way (e.g. a row that is not JSON-serialisable), the
temporary file is removed and the target is left as it was.

Logs that grow by one row per step (``metrics.jsonl``) are appended with :func:`append_jsonl`
instead of being rewritten: rewriting is quadratic in the run length. An append is flushed and
fsynced, so every row written before a crash survives it; a crash in the middle of one can leave
at most a torn last line. A resumed run drops that line and the rows after its checkpoint with
:func:`rewrite_jsonl` (atomically) before appending again.

Directories that are written as a whole (checkpoints, HF exports) are staged and renamed by
:func:`megatron_sami.models.checkpoint.staged_output`, which calls :func:`fsync_dir` here.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import secrets
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, TextIO

from megatron_sami.errors import OutputOverlapError, StorageError


def fsync_dir(path: Path) -> None:
    """``fsync`` the directory ``path`` so that names created, renamed or removed in it are durable.

    Platforms whose directories cannot be opened (Windows) skip it.
    """
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except (PermissionError, IsADirectoryError):  # pragma: no cover - not on POSIX
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: Path) -> None:
    """``fsync`` the file ``path`` (its bytes durable before a rename publishes its directory)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class WindowReader(io.RawIOBase):
    """A read-only, seekable stream of ``length`` bytes whose bytes a subclass supplies
    (:meth:`read_at`): what ``zipfile`` and ``torch.load`` need of a file object, for a window
    of a larger file or the part of one held in memory."""

    def __init__(self, length: int) -> None:
        self.length, self.position = length, 0

    def read_at(self, position: int, size: int) -> bytes:
        """``size`` bytes (fewer at the end) from ``position`` of the window."""
        raise NotImplementedError

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        self.position = {io.SEEK_SET: 0, io.SEEK_CUR: self.position, io.SEEK_END: self.length}[whence] + offset
        return self.position

    def tell(self) -> int:
        return self.position

    def readinto(self, buffer) -> int:
        wanted = max(0, min(len(buffer), self.length - self.position))
        data = self.read_at(self.position, wanted) if wanted else b""
        buffer[:len(data)] = data
        self.position += len(data)
        return len(data)


def _temp_beside(path: Path, suffix: str = ".tmp") -> tuple[int, Path]:
    """Create a new, empty, hidden temporary file in ``path``'s directory; returns (fd, its path).

    Unlike :func:`tempfile.mkstemp` (mode 0600), the file gets the permissions an ordinary
    ``open(path, "w")`` would (0666 less the umask), so the renamed file is readable as before.
    """
    while True:
        staging = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}{suffix}")
        try:
            return os.open(staging, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), staging
        except FileExistsError:  # pragma: no cover - 32 random bits collided
            continue


@contextlib.contextmanager
def atomic_output(path: Path | str) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` for a writer that needs a file name (e.g.
    ``figure.savefig``); when the block ends without an error, that file is fsynced and renamed
    onto ``path``, and the directory is fsynced. On an error (the writer's, or a check run on
    the staged file inside the block) the temporary file is removed and ``path`` is left as it
    was. The temporary name ends with ``path``'s suffix (``.tmp.png``), for writers that choose
    the format by the name and loaders that check it.
    """
    path = Path(path)
    fd, staging = _temp_beside(path, ".tmp" + path.suffix)
    os.close(fd)
    try:
        yield staging
        with staging.open("rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(staging, path)
    except BaseException:
        staging.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


@contextlib.contextmanager
def _atomic_text(path: Path | str, encoding: str) -> Iterator[TextIO]:
    """An open text handle on a temporary file that replaces ``path`` when the block succeeds
    (:func:`atomic_output`, with the file opened for the caller)."""
    with atomic_output(path) as staging, staging.open("w", encoding=encoding) as handle:
        yield handle


def atomic_write_text(path: Path | str, text: str, encoding: str = "utf-8") -> None:
    """Replace ``path`` with ``text``, atomically and durably (see the module docstring).

    Raises:
        OSError: if the directory does not exist or is not writable; ``path`` is then unchanged.
    """
    with _atomic_text(path, encoding) as handle:
        handle.write(text)


def atomic_write_json(path: Path | str, value: Any, indent: int | None = 2) -> None:
    """Replace ``path`` with ``value`` as JSON (``indent`` spaces, a final newline), atomically.

    Raises:
        TypeError: if ``value`` holds something JSON cannot encode; ``path`` is then unchanged.
        OSError: as :func:`atomic_write_text`.
    """
    atomic_write_text(path, json.dumps(value, indent=indent) + "\n")


def atomic_write_jsonl(path: Path | str, rows: Iterable[Any]) -> None:
    """Replace ``path`` with one JSON document per line, atomically; ``rows`` is streamed, so a
    generator is never held in memory whole.

    Raises:
        TypeError: if a row holds something JSON cannot encode; ``path`` is then unchanged.
        OSError: as :func:`atomic_write_text`.
    """
    with _atomic_text(path, "utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row) + "\n")


def append_jsonl(path: Path | str, row: Any) -> None:
    """Append ``row`` as one JSON line to ``path`` (created if absent), flushed and fsynced.

    The line is serialised before the file is opened, so a row JSON cannot encode leaves the file
    as it was. Not atomic across a crash mid-write (see the module docstring for why that is
    acceptable for logs).

    Raises:
        TypeError: if ``row`` holds something JSON cannot encode.
    """
    line = json.dumps(row) + "\n"
    path = Path(path)
    created = not path.exists()
    with path.open("a", encoding="utf-8") as handle:
        handle.write(line)
        handle.flush()
        os.fsync(handle.fileno())
    if created:
        fsync_dir(path.parent)


def rewrite_jsonl(path: Path | str, keep: Callable[[Any], bool]) -> None:
    """Rewrite the JSONL log ``path`` atomically with only the rows for which ``keep(row)`` holds
    (e.g. a resumed run's rows up to its checkpoint's step). A torn last line, which a crash in the
    middle of :func:`append_jsonl` can leave, is dropped.

    Raises:
        DataError: a line other than the last is not a JSON object (the log is then unchanged).
    """
    from megatron_sami.errors import DataError

    lines = Path(path).read_text(encoding="utf-8", errors="replace").splitlines()
    rows = []
    for number, line in enumerate(lines, 1):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            row = None
        if isinstance(row, dict):
            rows.append(row)
        elif number < len(lines):
            raise DataError(f"{path}:{number} is not a JSON object (the file was edited or damaged); repair or "
                            f"delete that line, then rerun.")
    atomic_write_jsonl(path, (row for row in rows if keep(row)))


def _same_or_inside(inner: Path, outer: Path) -> bool:
    """Whether ``inner`` is ``outer`` or lies inside it, both already resolved. Compared by name
    and, for the parts that exist, by (device, inode), so a bind mount or a second name of a
    directory is caught too."""
    if inner == outer or outer in inner.parents:
        return True
    with contextlib.suppress(OSError):
        target = outer.stat()
        for ancestor in (inner, *inner.parents):
            with contextlib.suppress(OSError):
                found = ancestor.stat()
                if (found.st_dev, found.st_ino) == (target.st_dev, target.st_ino):
                    return True
    return False


def check_output_apart(output: Path | str, inputs: Mapping[str, Path | str], siblings: Iterable[str] = ()) -> None:
    """Refuse an output path that is, contains, or lies inside one of the command's inputs.

    Writing (or ``--overwrite``) there would delete or replace the input, so a command checks this
    before it writes anything. Symlinks and ``..`` are resolved; ``siblings`` are suffixes of
    paths the command also writes or removes beside the output (``".incomplete"`` for a staged
    output), checked the same way.

    Args:
        output: the path the command writes (it need not exist).
        inputs: what each input is called in the message (e.g. ``"HF source"``) -> its path.
        siblings: name suffixes of the output's staging paths.

    Raises:
        OutputOverlapError: the output (or a sibling) is an input, contains one, or lies in one.
    """
    output = Path(output).resolve()  # "." and "dir/.." have no name of their own to add a suffix to
    candidates = [output, *(output.with_name(output.name + suffix) for suffix in siblings if output.name)]
    for label, given in inputs.items():
        source = Path(given).resolve()
        for candidate in candidates:
            target = candidate.resolve()
            if _same_or_inside(target, source):
                where = "is" if _same_or_inside(source, target) else "lies inside"
            elif _same_or_inside(source, target):
                where = "contains"
            else:
                continue
            shown = output if candidate == output else candidate
            raise OutputOverlapError(
                f"the output path {shown} {where} the {label} {given}, so writing it could delete or change the "
                f"{label}; choose an output path that neither is, contains nor lies inside {given}.")


# errno values a user fixes on the file system (space, quota, permissions, a read-only mount).
STORAGE_ERRNOS = {errno.ENOSPC: "free space on that file system or choose another path",
                  errno.EDQUOT: "free space within your quota or choose another path",
                  errno.EFBIG: "raise the file-size limit (ulimit -f) or choose another file system",
                  errno.EROFS: "the file system is mounted read-only: choose a writable path",
                  errno.EACCES: "choose a path you may write to, or change its permissions",
                  errno.EPERM: "choose a path you may write to, or change its permissions"}


def storage_error(err: OSError, path: Path | str | None = None) -> StorageError | None:
    """The one-sentence :class:`~megatron_sami.errors.StorageError` for a file-system refusal
    (disk full, quota, file-size limit, read-only, permission), or None for other OSErrors
    (those are bugs or stay as they are). ``path`` names the file when ``err`` does not."""
    if err.errno not in STORAGE_ERRNOS:
        return None
    where = err.filename if err.filename is not None else path
    text = err.strerror or os.strerror(err.errno)
    subject = f"{where}" if where is not None else "a file operation"
    return StorageError(f"{subject}: {text}; {STORAGE_ERRNOS[err.errno]}, then run again.")


def short_write_error(path: Path | str | None = None) -> StorageError:
    """The :class:`~megatron_sami.errors.StorageError` for a write that ``torch.save`` reports
    only as "unexpected pos N vs M": its C++ writer swallows the file system's ``OSError``, so
    the cause is named from what can still be seen (a file-size limit on this process, a file
    system without free space), else given as the possible causes. ``path`` is the output."""
    import resource

    where = f"writing {path}" if path is not None else "writing a checkpoint file"
    if resource.getrlimit(resource.RLIMIT_FSIZE)[0] != resource.RLIM_INFINITY:
        return StorageError(f"{where} failed: File too large (this process has a file-size limit); "
                            f"{STORAGE_ERRNOS[errno.EFBIG]}, then run again.")
    existing = Path(path).absolute() if path is not None else None
    while existing is not None and not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if existing is not None:
        status = os.statvfs(existing)
        if status.f_bavail * status.f_frsize < 1 << 20:
            return StorageError(f"{where} failed: No space left on device; {STORAGE_ERRNOS[errno.ENOSPC]}, "
                                "then run again.")
    return StorageError(f"{where} was cut short by the file system (disk full, quota or file-size limit); "
                        "free space or choose another path, then run again.")
