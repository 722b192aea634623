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


def read_table(path: str) -> pa.Table:
    """Read a table from a local path or fsspec URL, raising SourceTableError on any failure."""
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
            raise SourceTableError(
                f"{source}: missing column '{col}' (columns are: {', '.join(table.column_names)})"
            )
    urls = table.column(url_col)
    captions = table.column(caption_col)
    for name, column in ((url_col, urls), (caption_col, captions)):
        if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
            if pa.types.is_null(column.type):
                column = column.cast(pa.string())
            else:
                raise SourceTableError(
                    f"{source}: column '{name}' must hold strings, found {column.type}"
                )
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
