"""Copy the kept samples of a pool's shards into new shards of a target size, one Ray task per new shard.

The subset and seed_models stages use this. The driver never streams sample bytes and holds no
per-sample Python objects:
1. `stages.selection` writes each input shard's kept uids (one vectorised join, in the driver);
2. the plan cuts the kept samples, in input order, into output shards of `samples_per_shard`: each
   is a few (input shard, start, stop) pieces, so the plan grows with the number of shards only;
3. each output shard is written by one task that reads its pieces' tars and tables, so the copy
   runs on every node of the cluster at once.

The new shards hold the same samples in the same order as one process copying them tar by tar
(a sample missing from its tar leaves its new shard one short: the shards are planned from counts).
Every input sample ends up kept, dropped (the decision's reason) or failed (`missing_in_tar` when a
truncated or damaged tar lacks it); a broken input shard shows in the counts, not as a crash.
"""

from __future__ import annotations

import io
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.atomic import atomic_path, write_parquet
from pipeline.manifest import Manifest
from pipeline.mapping import MapFn, local_map
from stages.selection import MASK_DIR, KeptMask, kept_slice, verdicts_keeping, write_kept_mask
from stages.shards import cut_in_order, only_successes, read_tar_samples, shard_name

NOT_SELECTED = "not_selected"  # a sample outside `keep` (or undecided when copying by decisions)


@dataclass(frozen=True)
class Piece:
    """Kept samples `start:stop` of one input shard, in its tar's order."""

    tar: str
    start: int
    stop: int


@dataclass(frozen=True)
class OutputShard:
    index: int
    path: str
    pieces: tuple[Piece, ...]
    kept_folder: str

    @property
    def planned(self) -> int:
        return sum(p.stop - p.start for p in self.pieces)


@dataclass(frozen=True)
class CopyResult:
    path: str
    written: int
    missing: int


def plan_output_shards(mask: KeptMask, samples_per_shard: int, output_dir: Path) -> list[OutputShard]:
    """Cut the kept samples, input shard after input shard, into output shards of `samples_per_shard`."""
    return [
        OutputShard(
            index,
            str(output_dir / f"{shard_name(index)}.tar"),
            tuple(Piece(mask.shards[i], start, stop) for i, start, stop in group),
            mask.folder,
        )
        for index, group in enumerate(cut_in_order(mask.kept_per_shard, samples_per_shard))
    ]


def _add_sample(tar: tarfile.TarFile, key: str, sample: dict[str, bytes]) -> None:
    for ext, data in sorted(sample.items()):
        info = tarfile.TarInfo(f"{key}.{ext}")
        info.size = len(data)
        info.mtime = 0
        tar.addfile(info, io.BytesIO(data))


def write_output_shard(shard: OutputShard) -> CopyResult:
    """Write one output shard (tar, then its table in the tar's order) from its pieces."""
    order: list[str] = []
    tables = []
    with atomic_path(shard.path) as tmp, tarfile.open(tmp, "w") as out:
        for piece in shard.pieces:
            wanted = set(kept_slice(shard.kept_folder, piece.tar, piece.start, piece.stop))
            written = []
            for key, sample in read_tar_samples(piece.tar):
                if key in wanted:
                    _add_sample(out, key, sample)
                    written.append(key)
                    wanted.discard(key)  # a key twice in one tar is copied once
                    if not wanted:
                        break  # the rest of the tar is other pieces' (or dropped samples)
            rows = only_successes(pq.read_table(Path(piece.tar).with_suffix(".parquet")))
            tables.append(rows.filter(pc.is_in(rows.column("uid"), pa.array(written, pa.string()))))
            order += written
    if not order:  # every planned sample was missing from its tar: no empty shard
        Path(shard.path).unlink()
        return CopyResult("", 0, shard.planned)
    rows = pa.concat_tables(tables, promote_options="default")
    position = {uid: i for i, uid in enumerate(rows.column("uid").to_pylist())}
    write_parquet(
        Path(shard.path).with_suffix(".parquet"), rows.take(pa.array([position[u] for u in order], pa.int64()))
    )
    return CopyResult(shard.path, len(order), shard.planned - len(order))


def reshard(
    shard_paths: list[str | Path],
    output_dir: Path,
    samples_per_shard: int,
    *,
    keep: set[str] | frozenset[str] | None = None,
    decisions: str | Path | pa.Table | None = None,
    undecided: str = NOT_SELECTED,
    stage: str = "reshard",
    map_fn: MapFn = local_map,
) -> Manifest:
    """Copy the samples of `shard_paths` into new shards: all of them, those in `keep`, or those the
    `decisions` table (uid, keep, reason) keeps. Samples no decision covers count under `undecided`;
    the per-shard kept uids stay in `output_dir/kept`."""
    if keep is not None and decisions is not None:
        raise ValueError("reshard: give `keep` or `decisions`, not both")
    started = time.perf_counter()
    output_dir.mkdir(parents=True, exist_ok=True)
    verdicts = verdicts_keeping(keep) if keep is not None else decisions
    mask = write_kept_mask([str(p) for p in shard_paths], verdicts, output_dir / MASK_DIR, undecided)
    plan = plan_output_shards(mask, samples_per_shard, output_dir)
    results = map_fn(write_output_shard, plan, desc=stage, weight=lambda r: r.written)
    missing = sum(r.missing for r in results)
    written = [r.path for r in results if r.path]
    return Manifest(
        stage=stage,
        **{"in": mask.in_count},
        kept=sum(r.written for r in results),
        dropped=dict(mask.dropped),
        failed={"missing_in_tar": missing} if missing else {},
        outputs={"shards_dir": str(output_dir), "n_shards": str(len(written))},
        seconds=time.perf_counter() - started,
    )
