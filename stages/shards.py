"""Webdataset shards: naming, reading samples and their parquet tables, and rewriting them.

The one home for shard I/O that several stages share; copying kept samples into new shards is
`stages.shard_copy`.
"""

from __future__ import annotations

import tarfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import BinaryIO

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.atomic import atomic_path

SHARD_DIGITS = 5
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")


def shard_name(index: int) -> str:
    """`00042`: the stem of shard `index`'s tar, parquet and stats files."""
    return f"{index:0{SHARD_DIGITS}d}"


def read_parquet_folder(
    folder: Path,
    columns: list[str] | None = None,
    schema: pa.Schema | None = None,
    with_shard: bool = False,
    only_uids: pa.ChunkedArray | None = None,
) -> pa.Table | None:
    """Every per-shard parquet of `folder`, concatenated in shard order; None when there is none.
    `with_shard` adds `shard`: each row's file, as its index in the sorted list of files.
    `only_uids` keeps just the rows of those uids, file by file."""
    paths = sorted(Path(folder).glob("*.parquet"))
    if not paths:
        return None

    def read(path: Path) -> pa.Table:
        table = pq.read_table(path, columns=columns, schema=schema)
        return table if only_uids is None else table.filter(pc.is_in(table.column("uid"), value_set=only_uids))

    tables = [read(p) for p in paths]
    if with_shard:
        tables = [t.append_column("shard", pa.array(np.full(t.num_rows, i, np.int32))) for i, t in enumerate(tables)]
    return pa.concat_tables(tables, promote_options="default")


NO_DECISIONS = pa.table(
    {"uid": pa.array([], pa.string()), "keep": pa.array([], pa.bool_()), "reason": pa.array([], pa.string())}
)  # decisions that name no uid


def read_decisions(path: str | Path, columns: list[str] | None = None) -> pa.Table:
    """A stage's decisions: one parquet (the prefilter's, runs before 2026-12-01), or a folder of
    one parquet per shard (dedupe's and filter's), concatenated in shard order."""
    path = Path(path)
    if not path.is_dir():
        return pq.read_table(path, columns=columns)
    table = read_parquet_folder(path, columns)
    return NO_DECISIONS if table is None else table


def read_tar_samples(tar_path: str | Path) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Yield (key, {extension: bytes}) per sample; stops quietly at a truncated or damaged end."""
    current_key, current = None, {}
    try:
        with open(tar_path, "rb", buffering=1 << 20) as stream:
            for name, data in tar_files(stream):
                key, _, ext = name.rpartition("/")[2].partition(".")
                if key != current_key and current:
                    yield current_key, current
                    current = {}
                current_key = key
                current[ext] = data
    except (tarfile.ReadError, EOFError, OSError):
        pass  # truncated shard: the samples not yielded are counted as missing by the caller
    if current:
        yield current_key, current


_BLOCK = 512
_REGULAR = (b"0", b"\0", b"7")


def tar_files(stream: BinaryIO) -> Iterator[tuple[str, bytes]]:
    """(name, bytes) of each regular file in an uncompressed tar stream, in order.

    The hot path of every stage that reads shards: `tarfile` builds a TarInfo per member and
    parses webdataset's per-member pax headers with regular expressions, which made it a third of
    the phash stage's time. This reads the same formats (ustar, pax, GNU long names, base-256
    sizes) and checks each header's checksum; a damaged header raises `tarfile.ReadError` and a
    cut-off stream `EOFError`, as `tarfile` does."""
    pending: dict = {}  # a pax or GNU header's path (and pax size) for the member that follows
    while True:
        header = stream.read(_BLOCK)
        if len(header) < _BLOCK:
            if header:
                raise EOFError("tar cut off inside a header")
            return  # no end-of-archive blocks: tolerated, as tarfile does
        if header.count(0) == _BLOCK:
            return  # end of archive
        if not _checksum_matches(header):
            raise tarfile.ReadError("bad checksum in a tar header")
        kind = header[156:157]
        size = pending["size"] if "size" in pending else _octal(header[124:136])
        data = stream.read(size)
        if len(data) < size:
            raise EOFError("tar cut off inside a member")
        stream.read(-size % _BLOCK)
        if kind == b"x":
            pending = _pax_records(data)
        elif kind == b"L":
            pending = {"path": data.rstrip(b"\0").decode("utf-8", "surrogateescape")}
        else:
            if kind in _REGULAR:
                yield pending.get("path") or _ustar_name(header), data
            pending = {}  # a global pax header (g) and every other member type only reset it


def _octal(field: bytes) -> int:
    if field[0] & 0x80:  # base-256, for values beyond the octal field
        return int.from_bytes(field[1:], "big")
    digits = field.split(b"\0", 1)[0].strip()
    try:
        return int(digits, 8) if digits else 0
    except ValueError:
        raise tarfile.ReadError("bad number in a tar header") from None


def _checksum_matches(header: bytes) -> bool:
    """The stored checksum against the sum ustar writers compute (every byte unsigned, the
    checksum field counted as spaces) or, as `tarfile` also accepts, old writers' signed sum."""
    stored = _octal(header[148:156])
    unsigned = sum(header[:148]) + 8 * 32 + sum(header[156:])
    if stored == unsigned:
        return True
    high = sum(b >= 128 for b in header[:148]) + sum(b >= 128 for b in header[156:])
    return stored == unsigned - 256 * high


def _ustar_name(header: bytes) -> str:
    name = header[:100].split(b"\0", 1)[0]
    prefix = header[345:500].split(b"\0", 1)[0] if header[257:262] == b"ustar" else b""
    return (prefix + b"/" + name if prefix else name).decode("utf-8", "surrogateescape")


def _pax_records(data: bytes) -> dict:
    """The path and size of `<length> <key>=<value>\\n` records (the rest a reader does not need)."""
    records, at = {}, 0
    try:
        while at < len(data) and data[at]:
            space = data.index(b" ", at)
            length = int(data[at:space])
            key, _, value = data[space + 1 : at + length - 1].partition(b"=")
            if key == b"path":
                records["path"] = value.decode("utf-8", "surrogateescape")
            elif key == b"size":
                records["size"] = int(value)
            at += length
    except ValueError:
        raise tarfile.ReadError("bad pax header") from None
    return records


def write_sorted_by_key(source: Path, target: Path) -> None:
    """Copy a webdataset tar with its samples in key order (each sample's files kept together, in
    their order), atomically. Reads an index of members, not the samples: memory grows with the
    member count only."""
    with tarfile.open(source) as tar:
        members = [m for m in tar.getmembers() if m.isfile()]
        order = sorted(range(len(members)), key=lambda i: (Path(members[i].name).name.partition(".")[0], i))
        with atomic_path(target) as tmp, tarfile.open(tmp, "w") as out:
            for i in order:
                out.addfile(members[i], tar.extractfile(members[i]))


def successful_rows(parquet_paths: Iterable[Path]) -> pa.Table:
    """The rows img2dataset wrote as `success` (every row of a table without a status column)."""
    tables = [pq.read_table(p) for p in parquet_paths]
    return only_successes(pa.concat_tables(tables, promote_options="default"))


def only_successes(table: pa.Table) -> pa.Table:
    if "status" in table.column_names:
        table = table.filter(pc.equal(table.column("status"), "success"))
    return table


def image_bytes(sample: dict[str, bytes]) -> bytes | None:
    for ext in IMAGE_EXTENSIONS:
        if ext in sample:
            return sample[ext]
    return None


def expected_samples(tar: Path) -> pa.Table:
    """Samples the shard should contain: successful rows of its parquet (all keys if none)."""
    parquet = tar.with_suffix(".parquet")
    if not parquet.exists():
        keys = sorted({key for key, _ in read_tar_samples(tar)})
        return pa.table(
            {
                "uid": keys,
                "original_width": pa.nulls(len(keys), pa.int32()),
                "original_height": pa.nulls(len(keys), pa.int32()),
            }
        )
    table = only_successes(pq.read_table(parquet))
    for column in ("original_width", "original_height"):
        if column not in table.column_names:
            table = table.append_column(column, pa.nulls(table.num_rows, pa.int32()))
    return table.select(["uid", "original_width", "original_height"])


def cut_in_order(counts: list[int], size: int) -> list[list[tuple[int, int, int]]]:
    """Items `counts[i]` of each source i, taken in order and cut into groups of `size` (the last one
    shorter): each group a list of (source, start, stop). The plan of a copy or of download parts."""
    groups: list[list[tuple[int, int, int]]] = []
    current: list[tuple[int, int, int]] = []
    room = size
    for source, count in enumerate(counts):
        start = 0
        while start < count:
            take = min(room, count - start)
            current.append((source, start, start + take))
            start, room = start + take, room - take
            if room == 0:
                groups.append(current)
                current, room = [], size
    if current:
        groups.append(current)
    return groups
