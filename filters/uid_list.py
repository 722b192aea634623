"""uid lists in and out: keep (or drop) the uids listed in a file, in DataComp's format or plain.

DataComp hands out subsets (its baselines, DataComp-1B) as `.npy` files of uids, each uid a
32-digit hex string stored as two unsigned 64-bit halves (`np.dtype("u8,u8")`), sorted and
unique: the format of mlfoundations/datacomp `baselines/apply_filter.py` (it writes them) and
`resharder.py` (it reads them). The same format is what the filter stage writes for its kept
uids, so a subset made here feeds DataComp's resharder and evaluation, and theirs feeds us.
Plain lists work too: a parquet with a `uid` column, or a text file with one uid per line.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pydantic import Field

from filters.base import from_mask
from pipeline.models import StrictModel

NEEDS = ("uid",)
DATACOMP_DTYPE = np.dtype("u8,u8")
UID_DIGITS = 32

_NIBBLE = np.full(256, 255, np.uint8)  # ASCII code -> hex digit value (255: not a hex digit)
for _value, _chars in enumerate(zip("0123456789abcdef", "0123456789ABCDEF", strict=True)):
    _NIBBLE[[ord(c) for c in _chars]] = _value
_HEX_DIGITS = np.frombuffer(b"0123456789abcdef", np.uint8)
_POWERS = (np.uint64(16) ** np.arange(15, -1, -1, dtype=np.uint64)).astype(np.uint64)


class UidListParams(StrictModel):
    name: Literal["uid_list"] = "uid_list"
    path: str = Field(description="DataComp .npy (u8,u8 pairs), a parquet with a uid column, or a .txt of uids")
    mode: Literal["keep", "drop"] = Field("keep", description="keep only the listed uids, or drop them")


class UidListError(ValueError):
    """A uid list cannot be read or written; the message says why in one line."""


def to_datacomp(uids: pa.Array | pa.ChunkedArray | list[str]) -> np.ndarray:
    """32-digit hex uids -> DataComp's sorted, unique `u8,u8` array (vectorised: no per-uid Python)."""
    uids = pa.chunked_array([pa.array(uids, pa.string())]) if isinstance(uids, list) else uids
    lengths = pc.binary_length(uids)  # bytes: a non-ASCII character makes it longer than 32
    if len(uids) and (pc.min(lengths).as_py() != UID_DIGITS or pc.max(lengths).as_py() != UID_DIGITS):
        raise UidListError(f"DataComp uid lists need {UID_DIGITS}-digit hex uids; some of these are not")
    if uids.null_count:
        raise UidListError("a uid list cannot hold empty uids")
    try:
        codes = uids.to_numpy(zero_copy_only=False).astype(f"S{UID_DIGITS}").view(np.uint8)
    except UnicodeEncodeError:
        codes = np.full(UID_DIGITS, ord("?"), np.uint8)  # reported just below
    nibbles = _NIBBLE[codes.reshape(-1, UID_DIGITS)]
    if (nibbles > 15).any():
        raise UidListError("DataComp uid lists need hex uids; a uid has a character outside 0-9a-f")
    pairs = np.empty(len(nibbles), DATACOMP_DTYPE)
    pairs["f0"] = (nibbles[:, :16].astype(np.uint64) * _POWERS).sum(axis=1, dtype=np.uint64)
    pairs["f1"] = (nibbles[:, 16:].astype(np.uint64) * _POWERS).sum(axis=1, dtype=np.uint64)
    return np.unique(pairs)  # sorted, as DataComp's resharder expects


def from_datacomp(pairs: np.ndarray) -> list[str]:
    """DataComp's `u8,u8` array -> 32-digit lower-case hex uids."""
    if pairs.dtype != DATACOMP_DTYPE:
        raise UidListError(f"a DataComp uid list holds u8,u8 pairs, this one holds {pairs.dtype}")
    shifts = np.arange(60, -4, -4, dtype=np.uint64)
    halves = [(pairs[half][:, None] >> shifts) & np.uint64(15) for half in ("f0", "f1")]
    chars = _HEX_DIGITS[np.concatenate(halves, axis=1)]
    return [bytes(row).decode() for row in chars] if len(chars) else []


def write_datacomp(path: Path, uids: pa.Array | pa.ChunkedArray | list[str]) -> Path:
    np.save(path, to_datacomp(uids))
    return path


def read_uid_list(path: str) -> pa.Array:
    """The uids of a list file, as strings."""
    resolved = Path(path).resolve()
    if resolved.suffix.lower() not in (".npy", ".parquet", ".txt"):
        raise UidListError(f"{path}: a uid list is a .npy (DataComp), .parquet or .txt file")
    try:
        stat = resolved.stat()
    except OSError as err:
        raise UidListError(f"{path}: uid list not found") from err
    return _read_uid_list(str(resolved), stat.st_mtime_ns, stat.st_size)


@lru_cache(maxsize=4)
def _read_uid_list(path: str, mtime_ns: int, size: int) -> pa.Array:
    """Cached per file version: one strategy may name a list in several steps (or sweeps reuse it)."""
    suffix = Path(path).suffix.lower()
    try:
        if suffix == ".npy":
            return pa.array(from_datacomp(np.load(path, allow_pickle=False)), pa.string())
        if suffix == ".parquet":
            table = pq.read_table(path)
            if "uid" not in table.column_names:
                raise UidListError(f"{path}: no 'uid' column (columns are: {', '.join(table.column_names)})")
            return table.column("uid").cast(pa.string()).combine_chunks()
        return pa.array([line.strip() for line in Path(path).read_text().splitlines() if line.strip()], pa.string())
    except FileNotFoundError as err:
        raise UidListError(f"{path}: uid list not found") from err
    except (OSError, ValueError) as err:
        if isinstance(err, UidListError):
            raise
        raise UidListError(f"{path}: cannot read the uid list: {str(err).strip().splitlines()[0]}") from err


def apply(table: pa.Table, params: UidListParams):
    listed = pc.is_in(table.column("uid"), value_set=read_uid_list(params.path))
    listed = listed.to_numpy(zero_copy_only=False).astype(bool)
    keep = listed if params.mode == "keep" else ~listed
    reason = "uid_list:not_listed" if params.mode == "keep" else "uid_list:listed"
    return from_mask(table.column("uid").to_pylist(), keep, reason)
