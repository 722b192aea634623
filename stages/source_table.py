"""Read and validate url/caption tables before any download starts.

Users hand us parquet, csv or jsonl files (local paths or fsspec URLs). Everything that can be
wrong with the table itself is reported here, in one line, so that no download is wasted on a
table that would fail halfway.
"""

from __future__ import annotations

from pathlib import PurePosixPath

import fsspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.json as pajson
import pyarrow.parquet as pq

from stages.uid import compute_uid

SUPPORTED_FORMATS = {".parquet": "parquet", ".csv": "csv", ".jsonl": "jsonl", ".json": "jsonl"}


class SourceTableError(ValueError):
    """The input table cannot be used; the message says why in one line."""


def detect_format(path: str) -> str:
    suffix = PurePosixPath(path.split("?")[0]).suffix.lower()
    if suffix not in SUPPORTED_FORMATS:
        raise SourceTableError(
            f"{path}: unsupported table format '{suffix or '(none)'}' "
            f"(use one of {', '.join(sorted(SUPPORTED_FORMATS))})"
        )
    return SUPPORTED_FORMATS[suffix]


def expand_table_paths(path: str) -> list[str]:
    """A file, a folder of tables or a glob (e.g. DataComp's metadata folder) -> sorted files."""
    fs, fs_path = fsspec.core.url_to_fs(path)
    protocol = path.split("://")[0] + "://" if "://" in path else ""
    if any(ch in fs_path for ch in "*?["):
        files = sorted(fs.glob(fs_path))
    elif fs.isdir(fs_path):
        files = sorted(f for f in fs.find(fs_path) if PurePosixPath(f).suffix.lower() in SUPPORTED_FORMATS)
    else:
        return [path]
    if not files:
        raise SourceTableError(f"{path}: no {'/'.join(sorted(SUPPORTED_FORMATS))} tables found")
    return [protocol + f if protocol else f for f in files]


def read_table(path: str) -> pa.Table:
    """Read one table (or a folder/glob of them) from a local path or fsspec URL."""
    files = expand_table_paths(path)
    if len(files) > 1:
        tables = [read_table(f) for f in files]
        try:
            return pa.concat_tables(tables, promote_options="default")
        except pa.ArrowInvalid as err:
            raise SourceTableError(f"{path}: tables do not share a schema: {str(err).splitlines()[0]}") from err
    path = files[0]
    fmt = detect_format(path)
    try:
        with fsspec.open(path, "rb") as f:
            if fmt == "parquet":
                return pq.read_table(f)
            if fmt == "csv":
                return pacsv.read_csv(f)
            return pajson.read_json(f)
    except FileNotFoundError as err:
        raise SourceTableError(f"{path}: file not found") from err
    except (pa.ArrowInvalid, OSError, UnicodeDecodeError) as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise SourceTableError(f"{path}: cannot read {fmt} table: {first_line}") from err


def normalise_table(table: pa.Table, url_col: str, caption_col: str, source: str) -> pa.Table:
    """Return a table with string columns `url`, `caption` and `uid`, in input order.

    Null captions become empty strings (a missing caption is a sample, not an error); null or empty
    URLs are kept so the download stage can account for them as failures.
    """
    for col in (url_col, caption_col):
        if col not in table.column_names:
            raise SourceTableError(f"{source}: missing column '{col}' (columns are: {', '.join(table.column_names)})")
    urls = table.column(url_col)
    captions = table.column(caption_col)
    for name, column in ((url_col, urls), (caption_col, captions)):
        if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
            if pa.types.is_null(column.type):
                column = column.cast(pa.string())
            else:
                raise SourceTableError(f"{source}: column '{name}' must hold strings, found {column.type}")
    urls = pc.fill_null(urls.cast(pa.string()), "")
    captions = pc.fill_null(captions.cast(pa.string()), "")
    uids = [compute_uid(u, c) for u, c in zip(urls.to_pylist(), captions.to_pylist(), strict=True)]
    return pa.table({"uid": pa.array(uids, pa.string()), "url": urls, "caption": captions})


def load_source(path: str, url_col: str = "url", caption_col: str = "caption") -> pa.Table:
    """Read, validate and normalise a url/caption table."""
    table = read_table(path)
    if table.num_rows == 0:
        raise SourceTableError(f"{path}: the table has no rows")
    return normalise_table(table, url_col, caption_col, path)
