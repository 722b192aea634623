"""All-or-nothing files: a file (or folder) the pipeline writes appears complete under its name, or not at all.

Why: a run can be killed at any instant (Ctrl-C, SIGKILL, a lost node) and `--resume` decides what
is finished by what exists. So every writer writes to a temporary name in the same folder, flushes
it to disk, and renames it into place (`os.replace` is atomic on POSIX). Temporary names end in
`.partial`, which no reader's glob (`*.tar`, `*.parquet`, `manifest.json` …) matches, and the
orchestrator removes leftovers of a killed run before a stage runs again.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

PARTIAL_SUFFIX = ".partial"


def partial_path(path: Path) -> Path:
    """A hidden, unique temporary name beside `path` (unique: two writers never share one)."""
    return path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}{PARTIAL_SUFFIX}")


def is_partial(path: Path) -> bool:
    return path.name.endswith(PARTIAL_SUFFIX)


def _fsync(path: Path) -> None:
    """Flush a file, or every file of a folder being published and the folder itself, to disk."""
    if path.is_dir():
        for child in path.rglob("*"):
            if child.is_file():
                _fsync_one(child)
    _fsync_one(path)


def _fsync_one(path: Path) -> None:
    """Flush one file, or one folder's entries (not what is inside its subfolders)."""
    flags = os.O_RDONLY | (os.O_DIRECTORY if path.is_dir() else 0)
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


class Partial:
    """A file (or folder) being written under a temporary name: `commit()` publishes it, `abort()` drops it.

    For writers that outlive one `with` block (a shard writer rolling tars); otherwise use `atomic_path`.
    """

    def __init__(self, path: str | Path, *, folder: bool = False):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = partial_path(self.path)
        self.folder = folder
        if folder:
            self.tmp.mkdir()

    def commit(self) -> Path:
        try:
            _fsync(self.tmp)
            if self.folder and self.path.is_dir():
                _remove(self.path)
            os.replace(self.tmp, self.path)
            _fsync_one(self.path.parent)  # the new name; never a walk of the parent (other writers' files)
        except BaseException:
            self.abort()
            raise
        return self.path

    def abort(self) -> None:
        _remove(self.tmp)


@contextmanager
def atomic_path(path: str | Path, *, folder: bool = False) -> Iterator[Path]:
    """Yield a temporary path to write; on success it becomes `path`, on any error it is removed.

    `folder=True` yields an (existing, empty) temporary folder: a checkpoint or model folder then
    appears with all its files at once. An existing folder at `path` is replaced.
    """
    partial = Partial(path, folder=folder)
    try:
        yield partial.tmp
    except BaseException:
        partial.abort()
        raise
    partial.commit()


def write_with(path: str | Path, write: Callable[[Path], Any]) -> Path:
    """Atomically write `path` with `write(tmp_path)` (e.g. `lambda p: pq.write_table(t, p)`)."""
    with atomic_path(path) as tmp:
        write(tmp)
    return Path(path)


def write_bytes(path: str | Path, data: bytes) -> Path:
    return write_with(path, lambda tmp: tmp.write_bytes(data))


def write_text(path: str | Path, text: str) -> Path:
    return write_with(path, lambda tmp: tmp.write_text(text))


def write_json(path: str | Path, data: Any, indent: int | None = 2) -> Path:
    return write_text(path, json.dumps(data, indent=indent))


def write_parquet(path: str | Path, table, **kwargs: Any) -> Path:
    import pyarrow.parquet as pq

    return write_with(path, lambda tmp: pq.write_table(table, tmp, **kwargs))


def remove_partials(folder: str | Path) -> int:
    """Delete what killed writers left behind under `folder`; the number removed."""
    folder = Path(folder)
    if not folder.is_dir():
        return 0
    leftovers = [p for p in folder.rglob(f"*{PARTIAL_SUFFIX}") if is_partial(p)]
    for path in sorted(leftovers, key=lambda p: len(p.parts)):  # a partial folder takes its contents with it
        _remove(path)
    return len(leftovers)


__all__ = [
    "PARTIAL_SUFFIX",
    "Partial",
    "atomic_path",
    "is_partial",
    "remove_partials",
    "write_bytes",
    "write_json",
    "write_parquet",
    "write_text",
    "write_with",
]
