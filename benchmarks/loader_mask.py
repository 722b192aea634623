"""The training loader through a kept-uid mask against the same loader on a materialised subset.

    .venv/bin/python benchmarks/loader_mask.py                         # 2,400 images, 30% kept, 7 rounds
    .venv/bin/python benchmarks/loader_mask.py --keep 0.1 --json out.json

A sweep's trials train from the shared pool's shards with the strategy's kept uids applied in the
loader (`stages.selection`); the alternative is a filtered copy of the pool per trial (the subset
stage). The work compared is the same on both sides: the same kept samples, decoded, cropped to
the train transform's size and tokenised by the train stage's loader (`stages.train.data.batches`,
one process), the same number of batches, after the same warm-up batches. The mask's side also
reads the dropped samples' bytes off the tar (1/keep times the bytes of the copy's side) and skips
them before decoding; that is the cost measured. A first round of each side is not counted (imports,
page cache); then rounds alternate which side goes first, so that both see the same machine state.
The ratio is the median of the rounds' ratios (mask / copy), with their range.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from itertools import islice
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

from benchmark_result import result, write_results  # noqa: E402 (benchmarks run as scripts)
from scene_shards import write_scene_shards  # noqa: E402


def build_pool(root: Path, images: int, size: int, per_shard: int, keep: float, seed: int):
    """Scene shards, a decisions table keeping `keep` of them at random, the mask, and the subset copy."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from stages.selection import write_kept_mask
    from stages.shard_copy import reshard
    from stages.shards import successful_rows

    shards = [str(p) for p in write_scene_shards(root / "pool", images, size, per_shard)]
    uids = successful_rows(Path(s).with_suffix(".parquet") for s in shards).column("uid").to_pylist()
    kept = np.random.default_rng(seed).random(len(uids)) < keep
    decisions = root / "decisions.parquet"
    reasons = [None if k else "not_selected" for k in kept]
    pq.write_table(pa.table({"uid": uids, "keep": kept, "reason": reasons}), decisions)
    mask = write_kept_mask(shards, decisions, root / "kept")
    wanted = {uid for uid, k in zip(uids, kept, strict=True) if k}
    reshard(shards, root / "subset", per_shard, keep=wanted)
    copy = sorted(str(p) for p in (root / "subset").glob("*.tar"))
    return mask, copy


def samples_per_second(shards, mask, args) -> float:
    import open_clip

    from stages.train.data import Mask, batches

    preprocess = open_clip.image_transform(args.crop, is_train=True)
    tokenizer = open_clip.get_tokenizer("ViT-B-32")
    loader = batches(
        shards,
        preprocess,
        tokenizer,
        args.batch,
        seed=0,
        rank=0,
        segment=0,
        shuffle_buffer=args.shuffle_buffer,
        mask=Mask(mask.folder) if mask else None,
    )
    stream = iter(loader)
    for _ in islice(stream, args.warmup_batches):
        pass
    started = time.perf_counter()
    n = sum(len(images) for images, _ in islice(stream, args.batches))
    return n / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=2400)
    parser.add_argument("--image-size", type=int, default=256, help="side of the stored JPEGs")
    parser.add_argument("--crop", type=int, default=224, help="the train transform's output size")
    parser.add_argument("--shard-size", type=int, default=400)
    parser.add_argument("--keep", type=float, default=0.3, help="fraction of the pool the strategy keeps")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--batches", type=int, default=12)
    parser.add_argument("--warmup-batches", type=int, default=2)
    parser.add_argument("--shuffle-buffer", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--json", default=None, help="write the result here (benchmark_result.py's format)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        mask, copy = build_pool(Path(tmp), args.images, args.image_size, args.shard_size, args.keep, seed=0)
        print(f"{mask.kept} of {mask.in_count} samples kept; mask over {len(mask.shards)} shards, copy in {len(copy)}")
        samples_per_second(mask.shards, mask, args), samples_per_second(copy, None, args)  # not counted
        masked, copied = [], []
        for round_ in range(args.rounds):
            sides = [("mask", mask.shards, mask), ("copy", copy, None)]
            for name, shards, with_mask in sides if round_ % 2 == 0 else sides[::-1]:
                rate = samples_per_second(shards, with_mask, args)
                (masked if name == "mask" else copied).append(rate)
                print(f"round {round_ + 1} {name}: {rate:.1f} samples/s")
    ratios = [m / c for m, c in zip(masked, copied, strict=True)]
    ours, anchor, ratio = statistics.median(masked), statistics.median(copied), statistics.median(ratios)
    print(
        f"mask {ours:.1f} samples/s (range {min(masked):.1f}-{max(masked):.1f}), copy {anchor:.1f} "
        f"(range {min(copied):.1f}-{max(copied):.1f}); mask / copy {ratio:.3f}x "
        f"(rounds {min(ratios):.3f}-{max(ratios):.3f}) over {args.rounds} rounds"
    )
    params = {k: v for k, v in vars(args).items() if k != "json"}
    extra = {"round_ratios": ratios, "mask_rounds": masked, "copy_rounds": copied, "kept": mask.kept}
    row = result("loader_mask", ours, anchor, "samples/s", params, pool=mask.in_count, **extra)
    row["ratio"] = ratio  # the median of the paired rounds, not of the two medians
    write_results(args.json, [row])


if __name__ == "__main__":
    main()
