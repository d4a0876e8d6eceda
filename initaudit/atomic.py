"""Atomic file writes (fixed models, reports, baselines, plots): a temp file in the target
directory, fsync, ``os.replace``.

The target either keeps its old bytes or gets all of the new ones: a failure at any step
(an unwritable directory, a full disk, an exception while the content is produced) removes
the temp file and leaves the target as it was. Several files (an ONNX model and its fresh
external-data file) are staged first and replaced together, the model last.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from initaudit.errors import LoadError

#: Bytes per write when streaming a large payload: a full disk fails mid-file, not at once.
CHUNK = 1 << 20
#: Temp files carry this suffix, so a test (or a person) can tell them from real outputs.
TEMP_SUFFIX = ".initaudit-tmp"


class _Sink:
    """The file object handed to a writer: every write goes through :meth:`write`, so tests
    can fail one mid-file; everything else (``flush``, ``tell``) is the real file's."""

    def __init__(self, raw: BinaryIO) -> None:
        self._raw = raw
        self.written = 0

    def write(self, data: Any) -> int:
        count = self._raw.write(data)
        self.written += count if count is not None else len(memoryview(data))
        return count

    def __getattr__(self, name: str) -> Any:
        return getattr(self._raw, name)


def write_all(sink: Any, data: bytes | memoryview) -> None:
    """Write ``data`` in :data:`CHUNK`-sized pieces."""
    view = memoryview(data)
    for start in range(0, len(view), CHUNK):
        sink.write(view[start : start + CHUNK])


def os_problem(exc: OSError) -> str:
    """A one-line reason for a failed write."""
    if isinstance(exc, PermissionError) or exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return "permission denied (read-only directory or file system?)"
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return "no space left on the device"
    if isinstance(exc, FileNotFoundError):
        return "the directory does not exist"
    return exc.strerror or type(exc).__name__


def source_mode(path: Path) -> int | None:
    """The permission bits of ``path``, for the file written from it."""
    try:
        return stat.S_IMODE(path.stat().st_mode)
    except OSError:
        return None


@dataclass
class _Staged:
    target: Path
    temp: Path
    existed: bool


@dataclass
class Transaction:
    """Stage files with :meth:`stage`; on a clean exit they replace their targets in order.

    Any exception inside the ``with`` block, or while committing, removes every temp file;
    a target created by this transaction (it did not exist before) is removed again when a
    later one fails to commit. An OSError comes out as :class:`LoadError` naming the file.
    """

    staged: list[_Staged] = field(default_factory=list)

    def stage(self, target: Path, fill: Callable[[Any], None], mode: int | None = None) -> None:
        directory = target.parent
        try:
            fd, name = tempfile.mkstemp(dir=directory, prefix=f".{target.name}.", suffix=TEMP_SUFFIX)
        except OSError as exc:
            raise LoadError(target, f"cannot be written: {os_problem(exc)}") from None
        temp = Path(name)
        self.staged.append(_Staged(target, temp, os.path.lexists(target)))
        try:
            with os.fdopen(fd, "wb") as raw:
                sink = _Sink(raw)
                fill(sink)
                raw.flush()
                os.fsync(raw.fileno())
            if mode is not None:
                os.chmod(temp, mode)
        except OSError as exc:
            raise LoadError(target, f"cannot be written: {os_problem(exc)}") from None

    def commit(self) -> None:
        done: list[_Staged] = []
        try:
            for item in self.staged:
                os.replace(item.temp, item.target)
                done.append(item)
        except OSError as exc:
            failed = self.staged[len(done)].target
            for item in done:
                if not item.existed:  # undo what this transaction created; an overwrite cannot be undone
                    with contextlib.suppress(OSError):
                        item.target.unlink()
            raise LoadError(failed, f"cannot be written: {os_problem(exc)}") from None
        finally:
            self.cleanup()
        for directory in {item.target.parent for item in done}:
            _fsync_dir(directory)

    def cleanup(self) -> None:
        for item in self.staged:
            with contextlib.suppress(OSError):
                item.temp.unlink()

    def __enter__(self) -> Transaction:
        return self

    def __exit__(self, kind: type[BaseException] | None, *_: object) -> None:
        if kind is None:
            self.commit()
        else:
            self.cleanup()


@contextlib.contextmanager
def transaction() -> Iterator[Transaction]:
    with Transaction() as tx:
        yield tx


def atomic_write(target: Path, fill: Callable[[Any], None], mode: int | None = None) -> None:
    """Write one file atomically: ``fill(file)`` produces the content. Without ``mode`` the
    file keeps the mode of the one it replaces, or gets a new file's usual mode."""
    with Transaction() as tx:
        tx.stage(target, fill, mode if mode is not None else _mode_for(target))


def write_text(target: Path, text: str) -> None:
    """Write a report or a baseline atomically (UTF-8)."""
    atomic_write(Path(target), lambda sink: write_all(sink, text.encode("utf-8")))


def write_bytes(target: Path, data: bytes) -> None:
    atomic_write(Path(target), lambda sink: write_all(sink, data))


def _mode_for(target: Path) -> int:
    existing = source_mode(target)
    if existing is not None:
        return existing
    mask = os.umask(0)  # the only portable way to read the umask
    os.umask(mask)
    return 0o666 & ~mask


def _fsync_dir(directory: Path) -> None:
    """Make the rename durable (best effort: not every OS or file system allows it)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
