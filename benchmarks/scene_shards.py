"""Synthetic webdataset shards for the benchmarks: rendered scenes with captions, laid out as the
download stage writes them (a parquet of expected uids beside each tar)."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np


def write_scene_shards(root: Path, n_images: int, size: int, per_shard: int, unique: int | None = None) -> list[Path]:
    """`unique`: render only that many scenes and repeat them under new keys (a large pool in seconds;
    decoding costs the same for a repeated image)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from stages import demo_scenes as world

    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    rendered: dict[int, tuple[bytes, bytes]] = {}

    def scene(index: int) -> tuple[bytes, bytes]:
        if index not in rendered:
            drawn = world.random_scene(rng)
            rendered[index] = (world.encode_jpeg(world.render_scene(drawn, size, rng)), drawn.caption.encode())
        return rendered[index] if unique else rendered.pop(index)

    shards = []
    for start in range(0, n_images, per_shard):
        tar_path = root / f"{len(shards):05d}.tar"
        keys = [f"{i:08d}" for i in range(start, min(start + per_shard, n_images))]
        with tarfile.open(tar_path, "w") as tar:
            for key in keys:
                payload, caption = scene(int(key) % (unique or n_images))
                for ext, data in (("jpg", payload), ("txt", caption)):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        pq.write_table(pa.table({"uid": keys, "status": ["success"] * len(keys)}), tar_path.with_suffix(".parquet"))
        shards.append(tar_path)
    return shards
