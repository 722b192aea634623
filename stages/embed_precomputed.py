"""DataComp's precomputed embeddings as the embed stage's output: no model pass, no GPU.

DataComp ships, beside each pool parquet, an `.npz` with the same stem whose rows follow the
parquet's rows (mlfoundations/datacomp `baselines/apply_filter.py` reads `<root>.parquet` and
`<root>.npz` together): OpenAI CLIP ViT-L/14 features under `l14_img`/`l14_txt` and ViT-B/32
under `b32_img`/`b32_txt`. Each file is turned, in its own task, into the embed stage's own table
(uid, unit-norm float16 `image_emb`/`text_emb`, float32 `clip_score` = their cosine), so the
filters that read embeddings (`clip_score`, `image_based`, `semantic_dedupe`, `aesthetic` with
LAION's L/14 head) run on them as on computed ones. The converted tables are then regrouped by
download shard (`by_download_shard`), so the output is one parquet per download shard, as the
model pass writes it. Downloaded samples the files do not cover are counted as failed
(`no_precomputed_embedding`), never silently dropped.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.atomic import write_parquet
from pipeline.mapping import MapFn
from stages.uid_join import regroup_by_shard

Features = Literal["l14", "b32"]
KEYS = {"l14": ("l14_img", "l14_txt"), "b32": ("b32_img", "b32_txt")}
WIDTH = {"l14": 768, "b32": 512}
MISSING = "no_precomputed_embedding"


class PrecomputedError(ValueError):
    """Precomputed embeddings cannot be used; the message says why in one line."""


def npz_files(folder: str) -> list[Path]:
    files = sorted(Path(folder).rglob("*.npz"))
    if not files:
        raise PrecomputedError(f"embed.precomputed: no .npz files under {folder}")
    return files


def uid_tables(npzs: list[Path], uids_folder: str | None) -> dict[str, Path]:
    """Each npz's parquet (same stem): beside it, or anywhere under `uids_folder` (DataComp's
    xlarge keeps them apart: `xlarge/*/*.parquet` and `xlarge_npzs/*/*.npz`)."""
    if uids_folder is None:
        pairs = {npz.stem: npz.with_suffix(".parquet") for npz in npzs}
    else:
        found = {p.stem: p for p in Path(uids_folder).rglob("*.parquet")}
        pairs = {npz.stem: found.get(npz.stem, Path(uids_folder) / f"{npz.stem}.parquet") for npz in npzs}
    absent = [str(p) for p in pairs.values() if not p.exists()]
    if absent:
        raise PrecomputedError(
            f"embed.precomputed: {len(absent)} npz file(s) have no parquet of uids, e.g. {absent[0]}"
        )
    return pairs


def _unit(matrix: np.ndarray) -> np.ndarray:
    matrix = matrix.astype(np.float32)
    norms = np.linalg.norm(matrix, axis=1, keepdims=True)
    return matrix / np.maximum(norms, 1e-12)


def _fixed_size(matrix: np.ndarray) -> pa.FixedSizeListArray:
    return pa.FixedSizeListArray.from_arrays(pa.array(matrix.astype(np.float16).reshape(-1)), matrix.shape[1])


def convert(npz: Path, uids_parquet: Path, out_path: Path, features: Features) -> int:
    """One npz (and its parquet's uids) as the embed stage's table; returns its row count."""
    uids = pq.read_table(uids_parquet, columns=["uid"]).column("uid").cast(pa.string())
    image_key, text_key = KEYS[features]
    with np.load(npz, allow_pickle=False) as data:
        if image_key not in data or text_key not in data:
            raise PrecomputedError(f"{npz}: no '{image_key}'/'{text_key}' arrays (it has: {', '.join(data.files)})")
        image, text = _unit(data[image_key]), _unit(data[text_key])
    if not (len(image) == len(text) == len(uids)):
        raise PrecomputedError(f"{npz}: {len(image)} embeddings for {len(uids)} rows of {uids_parquet}")
    order = pc.sort_indices(uids).to_numpy()
    table = pa.table(
        {
            "uid": uids.take(order),
            "reason": pa.nulls(len(uids), pa.string()),
            "image_emb": _fixed_size(image[order]),
            "text_emb": _fixed_size(text[order]),
            "clip_score": pa.array((image * text).sum(axis=1)[order].astype(np.float32)),
        }
    )
    write_parquet(out_path, table)
    return table.num_rows


def by_download_shard(converted: Path, shards_dir: Path, out_dir: Path, map_fn: MapFn) -> tuple[int, int]:
    """Rewrite the per-npz tables as one table per download shard (its rows in the shard's order;
    samples no npz covers are absent), as the model pass writes them, so each later per-shard task
    reads its own shard's embeddings. A hash join by uid in tasks (`stages.uid_join`): the driver
    holds file names and counts. Returns (rows written, samples downloaded)."""
    files = sorted(converted.glob("*.parquet"))
    tars = [str(p.with_suffix(".tar")) for p in sorted(Path(shards_dir).glob("*.parquet"))]
    return regroup_by_shard(files, tars, out_dir, out_dir.parent / REGROUP, map_fn)


REGROUP = "regroup"  # the join's scratch files, beside the embeddings; removed when it ends
