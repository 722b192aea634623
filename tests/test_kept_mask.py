"""Training through a kept-uid mask: the accounting matches the subset stage's, and the resampled
stream draws every kept sample equally often however unevenly the shards keep them."""

from __future__ import annotations

import io
import random
import tarfile
from collections import Counter
from itertools import islice

import pyarrow as pa
import pyarrow.parquet as pq

from stages.selection import UNDECIDED, kept_uids, write_kept_mask
from stages.train.data import Mask, _samples


def _shard(path, uids: list[str], failed: list[str] = ()) -> str:
    with tarfile.open(path, "w") as tar:
        for uid in uids:
            for ext, data in (("jpg", f"image {uid}".encode()), ("txt", f"caption {uid}".encode())):
                info = tarfile.TarInfo(f"{uid}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    status = ["success"] * len(uids) + ["failed_to_download"] * len(failed)
    pq.write_table(pa.table({"uid": [*uids, *failed], "status": status}), path.with_suffix(".parquet"))
    return str(path)


def _pool(tmp_path):
    """Shard a keeps 1 of 20, shard b all 20, shard c none (3 dropped, 2 never decided)."""
    a = [f"a{i:02d}" for i in range(20)]
    b = [f"b{i:02d}" for i in range(20)]
    c = [f"c{i:02d}" for i in range(5)]
    shards = [_shard(tmp_path / "a.tar", a, ["a_failed"]), _shard(tmp_path / "b.tar", b), _shard(tmp_path / "c.tar", c)]
    decided = [
        ("a00", True, None),
        *[(uid, False, f"duplicate_of:{b[0]}") for uid in a[1:11]],
        *[(uid, False, "eval_duplicate_of:x") for uid in a[11:13]],
        *[(uid, False, "clip_score<0.3") for uid in a[13:]],
        *[(uid, True, None) for uid in b],
        *[(uid, False, "clip_score<0.3") for uid in c[:3]],
    ]
    uid, keep, reason = zip(*decided, strict=True)
    decisions = tmp_path / "decisions.parquet"
    pq.write_table(pa.table({"uid": list(uid), "keep": list(keep), "reason": list(reason)}), decisions)
    return shards, decisions


def test_the_mask_keeps_what_the_decisions_keep_and_counts_every_other_sample_under_its_reason(tmp_path):
    shards, decisions = _pool(tmp_path)
    mask = write_kept_mask(shards, decisions, tmp_path / "kept")
    assert mask.in_count == 45  # the failed download is no sample of the shards
    assert mask.shards == shards[:2] and mask.kept_per_shard == [1, 20] and mask.kept == 21
    assert mask.dropped == {"clip_score<0.3": 10, "duplicate_of": 10, "eval_duplicate_of": 2, UNDECIDED: 2}
    assert mask.in_count == mask.kept + sum(mask.dropped.values())
    assert kept_uids(mask.folder, shards[0]) == frozenset({"a00"})


def test_the_masked_stream_draws_every_kept_sample_equally_often(tmp_path):
    shards, decisions = _pool(tmp_path)
    mask = write_kept_mask(shards, decisions, tmp_path / "kept")
    stream = _samples(mask.shards, random.Random(0), Mask(mask.folder))
    seen = Counter(caption.removeprefix("caption ") for _, caption in islice(stream, 4200))
    assert set(seen) == {"a00", *(f"b{i:02d}" for i in range(20))}  # nothing dropped ever comes through
    per_b_sample = sum(n for uid, n in seen.items() if uid.startswith("b")) / 20
    # shard a keeps 1 sample, b keeps 20: drawing shards by what they keep would show a00 20x less often
    assert abs(seen["a00"] - per_b_sample) < 0.3 * per_b_sample, seen
