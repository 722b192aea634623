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

from stages.metadata_schema import MetadataSchema, SchemaName, resolve
from stages.uid import compute_uid

SUPPORTED_FORMATS = {".parquet": "parquet", ".csv": "csv", ".jsonl": "jsonl", ".json": "jsonl"}


# a table's own uid becomes a tar member and file name: letters, digits, '_' and '-' only
# (DataComp's are 32 hex digits)
SAFE_UID = r"^[0-9A-Za-z_-]{1,128}$"


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
    try:
        fs, fs_path = fsspec.core.url_to_fs(path)
    except (ImportError, ValueError) as err:  # e.g. s3:// without s3fs installed: fsspec says which package
        raise SourceTableError(f"{path}: {str(err).strip().splitlines()[0]}") from None
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
    except (pa.ArrowInvalid, OSError, UnicodeDecodeError) as err:  # FileNotFoundError is an OSError
        raise unreadable(path, err) from err


def unreadable(path: str, err: Exception) -> SourceTableError:
    """The one line for a table file that cannot be opened or parsed."""
    if isinstance(err, FileNotFoundError):
        return SourceTableError(f"{path}: file not found")
    first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return SourceTableError(f"{path}: cannot read {detect_format(path)} table: {first_line}")


def normalise_table(table: pa.Table, schema: MetadataSchema, source: str) -> pa.Table:
    """Return a table with string columns `uid`, `url`, `caption`, in input order, then every other
    column under its stable name (see `stages.metadata_schema`).

    Null captions become empty strings (a missing caption is a sample, not an error); null or empty
    URLs are kept so the download stage can account for them as failures. A table's own uid column
    (DataComp's) is kept as the uid; otherwise it is derived from the url and caption.
    """
    for col, key in ((schema.url, "url_col"), (schema.caption, "caption_col")):
        if col not in table.column_names:
            raise SourceTableError(
                f"{source}: missing column '{col}' (columns are: {', '.join(table.column_names)}; "
                f"name yours with --set source.{key}=...)"
            )
    urls, captions = (_string_column(table, name, source) for name in (schema.url, schema.caption))
    urls = pc.fill_null(urls, "")
    captions = pc.fill_null(captions, "")
    if schema.uid and schema.uid in table.column_names:
        uids = _own_uids(table, schema.uid, source)
    else:
        uids = pa.array([compute_uid(u, c) for u, c in zip(urls.to_pylist(), captions.to_pylist(), strict=True)])
    carried = schema.carried_names(table.column_names)
    columns = {"uid": uids, "url": urls, "caption": captions}
    return pa.table({**columns, **{new: table.column(old) for old, new in carried.items()}})


def _string_column(table: pa.Table, name: str, source: str) -> pa.ChunkedArray:
    column = table.column(name)
    if pa.types.is_string(column.type) or pa.types.is_large_string(column.type) or pa.types.is_null(column.type):
        return column.cast(pa.string())
    raise SourceTableError(f"{source}: column '{name}' must hold strings, found {column.type}")


def _own_uids(table: pa.Table, name: str, source: str) -> pa.ChunkedArray:
    """The table's uid column as strings; a missing uid would make a sample unaddressable."""
    uids = _string_column(table, name, source)
    empty = pc.sum(pc.or_(pc.is_null(uids), pc.equal(pc.utf8_length(pc.fill_null(uids, "")), 0))).as_py() or 0
    if empty:
        raise SourceTableError(f"{source}: column '{name}' has {empty:,} empty uid(s); every row needs one")
    unsafe = pc.invert(pc.match_substring_regex(uids, SAFE_UID))
    if pc.any(unsafe).as_py():
        example = uids.filter(unsafe)[0].as_py()
        raise SourceTableError(
            f"{source}: column '{name}' has {pc.sum(unsafe).as_py():,} uid(s) that are not plain names (e.g. "
            f"{example[:40]!r}): uids name files in the shards; --set source.metadata=plain derives them instead"
        )
    return uids


def first_file_columns(path: str) -> list[str]:
    """The column names of a table's first file, without reading its rows (parquet) or most of them."""
    first = expand_table_paths(path)[0]
    try:
        if detect_format(first) == "parquet":
            with fsspec.open(first, "rb") as f:
                return pq.read_schema(f).names
        return read_table(first).column_names
    except FileNotFoundError as err:
        raise SourceTableError(f"{first}: file not found") from err
    except (pa.ArrowInvalid, OSError) as err:
        raise SourceTableError(f"{first}: cannot read its columns: {str(err).strip().splitlines()[0]}") from err


def metadata_columns(path: str, schema: SchemaName = "auto", url_col=None, caption_col=None) -> tuple[str, ...]:
    """The per-uid table names of a table's metadata columns (none while the table cannot be read)."""
    try:
        names = first_file_columns(path)
        return tuple(resolve(names, schema, url_col, caption_col).carried_names(names).values())
    except ValueError:
        return ()


def load_source(
    path: str, schema: SchemaName = "auto", url_col: str | None = None, caption_col: str | None = None
) -> pa.Table:
    """Read, validate and normalise a url/caption table (LAION or DataComp metadata as they ship)."""
    table = read_table(path)
    if table.num_rows == 0:
        raise SourceTableError(f"{path}: the table has no rows")
    chosen = resolve(table.column_names, schema, url_col, caption_col)
    try:
        return normalise_table(table, chosen, path)
    except ValueError as err:
        if isinstance(err, SourceTableError):
            raise
        raise SourceTableError(f"{path}: {err}") from err
