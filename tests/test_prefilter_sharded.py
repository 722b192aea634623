"""The prefilter part by part against the one-table filter: the same verdicts, the same kept rows.

A LAION-shaped table in three files of uneven size (chunks), with tied scores, missing scores,
small images, duplicate rows and short captions, runs a strategy with two top fractions (one
lower-is-better: pooled figures found across the parts), a threshold and `basic`.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.stage import SourceOutputs
from stages.filter import FilterConfig, run_filter
from stages.filter.pool_table import metadata_pool
from stages.prefilter import prefilter_table
from stages.shards import read_decisions
from stages.source_table import SourceTableError, load_source
from tests.oracles import assert_same_decisions

STRATEGY = [
    {"name": "rank", "column": "aesthetic_score", "top_fraction": 0.5},
    {"name": "rank", "column": "punsafe", "top_fraction": 0.8, "better": "lower"},
    {"name": "rank", "column": "similarity", "threshold": 0.2},
    {"name": "basic", "languages": None},
]


def _laion(rng: np.random.Generator, n: int, start: int) -> pa.Table:
    words = np.array(["a", "photo", "of", "red", "dog", "on", "grass", "x"])
    captions = [" ".join(rng.choice(words, int(rng.integers(1, 6)))) for _ in range(n)]
    return pa.table(
        {
            "URL": [f"http://127.0.0.1/{(start + i) % 150}.jpg" for i in range(n)],  # some rows repeat
            "TEXT": [c if (start + i) < 150 else "a photo of a dog" for i, c in enumerate(captions)],
            "WIDTH": pa.array(rng.choice([100, 300, 640], n), pa.int64()),
            "HEIGHT": pa.array(rng.choice([240, 480], n), pa.int64()),
            "similarity": pa.array(rng.uniform(0.1, 0.4, n)),
            "punsafe": pa.array(rng.choice([0.01, 0.1, 0.5, 0.9], n), pa.float32(), mask=rng.random(n) < 0.05),
            "AESTHETIC_SCORE": pa.array(rng.choice([4.5, 5.0, 5.5, 6.0, 7.0], n), pa.float32()),
        }
    )


@pytest.fixture
def laion_folder(tmp_path):
    rng = np.random.default_rng(0)
    folder = tmp_path / "laion"
    folder.mkdir()
    start = 0
    for index, n in enumerate([120, 1, 80]):
        pq.write_table(_laion(rng, n, start), folder / f"part-{index}.parquet")
        start += n
    return folder


def test_part_by_part_equals_the_one_table_filter(laion_folder, tmp_path):
    steps = FilterConfig(strategy=STRATEGY).strategy
    source = SourceOutputs(table=str(laion_folder), metadata="laion")
    manifest = prefilter_table(source, steps, tmp_path / "prefilter", lambda fn, items, **_: [fn(i) for i in items])
    table = load_source(str(laion_folder), "laion")
    expected, _ = run_filter(metadata_pool(table), FilterConfig(strategy=STRATEGY), tmp_path / "one", stage="prefilter")
    got = read_decisions(manifest.outputs["decisions"])
    assert_same_decisions(got, pq.read_table(expected.outputs["decisions"]))
    assert (manifest.in_count, manifest.kept, manifest.dropped) == (expected.in_count, expected.kept, expected.dropped)
    assert np.array_equal(np.load(manifest.outputs["kept_uids"]), np.load(expected.outputs["kept_uids"]))
    assert 0 < manifest.kept < manifest.in_count == 201
    kept = pa.concat_tables([pq.read_table(p) for p in sorted((tmp_path / "prefilter" / "kept").glob("*.parquet"))])
    keep = pq.read_table(expected.outputs["decisions"]).column("keep")
    assert kept.equals(table.filter(keep))  # the kept rows as they were, in input order
    assert not (tmp_path / "prefilter" / "pool").exists()


def test_a_broken_part_is_one_line_and_leaves_nothing(laion_folder, tmp_path):
    (laion_folder / "part-9.parquet").write_bytes(b"not a parquet file")
    source = SourceOutputs(table=str(laion_folder), metadata="laion")
    with pytest.raises(SourceTableError, match="part-9.parquet"):
        prefilter_table(
            source,
            FilterConfig(strategy=STRATEGY).strategy,
            tmp_path / "p",
            lambda fn, items, **_: [fn(i) for i in items],
        )
    assert not (tmp_path / "p" / "pool").exists()
