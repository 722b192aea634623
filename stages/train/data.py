"""Streaming training batches from webdataset shards, resampled and deterministic per segment.

Each Ray Train worker (and each of its DataLoader workers) draws shards with replacement and
shuffles samples in a buffer, from an RNG seeded by (seed, rank, loader worker, segment). A
segment is the stretch between two checkpoints, so a run resumed from a checkpoint sees exactly
the batches an uninterrupted run would have seen.

With a kept-uid mask (`stages.selection`), the samples a strategy dropped are skipped before any
decoding. Shards are drawn uniformly either way, and each drawn shard is read whole: every sample is
then drawn as often as any other, however many samples its shard holds or keeps.
"""

from __future__ import annotations

import io
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from PIL import Image

from stages.selection import kept_uids
from stages.shards import image_bytes, read_tar_samples


@dataclass(frozen=True)
class Mask:
    """Where the kept uids of each shard are (`stages.selection`)."""

    folder: str


def _samples(shards: list[str], rng: random.Random, mask: Mask | None = None) -> Iterator[tuple[bytes, str]]:
    while True:  # resampled: the stream never ends, the step budget does
        shard = rng.choice(shards)
        wanted = kept_uids(mask.folder, shard) if mask else None
        for key, sample in read_tar_samples(shard):
            if wanted is not None and key not in wanted:
                continue
            payload = image_bytes(sample)
            if payload is not None and "txt" in sample:
                yield payload, sample["txt"].decode("utf-8")


def _shuffled(stream: Iterator, buffer_size: int, rng: random.Random) -> Iterator:
    buffer = []
    for item in stream:
        if len(buffer) < buffer_size:
            buffer.append(item)
            continue
        i = rng.randrange(buffer_size)
        yield buffer[i]
        buffer[i] = item


class ShardStream(torch.utils.data.IterableDataset):
    """(image tensor, token ids) pairs; each DataLoader worker gets its own RNG stream."""

    def __init__(
        self,
        shards: list[str],
        preprocess: Callable,
        tokenizer: Callable,
        seed: tuple[int, ...],
        shuffle_buffer: int,
        mask: Mask | None = None,
    ):
        self.shards, self.preprocess, self.tokenizer = shards, preprocess, tokenizer
        self.seed, self.shuffle_buffer, self.mask = seed, shuffle_buffer, mask

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker = info.id if info else 0
        rng = random.Random(str((*self.seed, worker)))
        torch.manual_seed(rng.randrange(2**31))  # the random crops of the train transform
        for payload, caption in _shuffled(_samples(self.shards, rng, self.mask), self.shuffle_buffer, rng):
            with Image.open(io.BytesIO(payload)) as image:
                pixels = self.preprocess(image.convert("RGB"))
            yield pixels, self.tokenizer([caption])[0]


def batches(
    shards: list[str],
    preprocess: Callable,
    tokenizer: Callable,
    batch_size: int,
    *,
    seed: int,
    rank: int,
    segment: int,
    loader_workers: int = 0,
    shuffle_buffer: int = 1000,
    mask: Mask | None = None,
) -> torch.utils.data.DataLoader:
    dataset = ShardStream(shards, preprocess, tokenizer, (seed, rank, segment), shuffle_buffer, mask)
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, num_workers=loader_workers, persistent_workers=False, drop_last=True
    )
