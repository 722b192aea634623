"""Streaming training batches from webdataset shards, resampled and deterministic per segment.

Each Ray Train worker (and each of its DataLoader workers) draws shards with replacement and
shuffles samples in a buffer, from an RNG seeded by (seed, rank, loader worker, segment). A
segment is the stretch between two checkpoints, so a run resumed from a checkpoint sees exactly
the batches an uninterrupted run would have seen.
"""

from __future__ import annotations

import io
import random
from collections.abc import Callable, Iterator

import torch
from PIL import Image

from stages.shards import image_bytes, read_tar_samples


def _samples(shards: list[str], rng: random.Random) -> Iterator[tuple[bytes, str]]:
    while True:  # resampled: the stream never ends, the step budget does
        for _, sample in read_tar_samples(rng.choice(shards)):
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
        self, shards: list[str], preprocess: Callable, tokenizer: Callable, seed: tuple[int, ...], shuffle_buffer: int
    ):
        self.shards, self.preprocess, self.tokenizer = shards, preprocess, tokenizer
        self.seed, self.shuffle_buffer = seed, shuffle_buffer

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker = info.id if info else 0
        rng = random.Random(str((*self.seed, worker)))
        torch.manual_seed(rng.randrange(2**31))  # the random crops of the train transform
        for payload, caption in _shuffled(_samples(self.shards, rng), self.shuffle_buffer, rng):
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
) -> torch.utils.data.DataLoader:
    dataset = ShardStream(shards, preprocess, tokenizer, (seed, rank, segment), shuffle_buffer)
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, num_workers=loader_workers, persistent_workers=False, drop_last=True
    )
