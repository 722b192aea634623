"""Perceptual hashes, bit-identical to `imagehash.phash`, computed in batches.

imagehash converts each image to grey, resizes it to 32x32 with LANCZOS, takes a 2-D DCT,
and compares the 8x8 low frequencies with their median. The PIL steps stay per image (that is
what makes the bits identical); the DCTs and medians run once over the whole batch, and only
the 8 low-frequency rows go through the second DCT pass. Hashes are 64-bit integers whose bit
order matches imagehash's hex string (first coefficient = most significant bit).
"""

from __future__ import annotations

from collections.abc import Iterable
from io import BytesIO

import numpy as np
import scipy.fftpack
from PIL import Image

HASH_SIZE = 8
IMAGE_SIZE = HASH_SIZE * 4  # imagehash's highfreq_factor of 4
_BIT_WEIGHTS = (np.uint64(1) << np.arange(63, -1, -1, dtype=np.uint64)).astype(np.uint64)


def grey_thumbnail(image: Image.Image) -> np.ndarray:
    """The 32x32 grey pixels imagehash hashes."""
    return np.asarray(image.convert("L").resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.LANCZOS))


def phash_pixels(thumbnails: np.ndarray) -> np.ndarray:
    """pHash of a (n, 32, 32) uint8 stack, as uint64."""
    if len(thumbnails) == 0:
        return np.zeros(0, dtype=np.uint64)
    rows = scipy.fftpack.dct(thumbnails, axis=1)[:, :HASH_SIZE, :]
    low = scipy.fftpack.dct(rows, axis=2)[:, :, :HASH_SIZE].reshape(len(thumbnails), -1)
    bits = low > np.median(low, axis=1, keepdims=True)
    return (bits.astype(np.uint64) * _BIT_WEIGHTS).sum(axis=1, dtype=np.uint64)


def phash_images(images: Iterable[Image.Image]) -> np.ndarray:
    return phash_pixels(np.stack([grey_thumbnail(im) for im in images]) if images else np.zeros((0, 32, 32)))


def decode_thumbnail(payload: bytes) -> tuple[np.ndarray, int, int]:
    """Decode image bytes into (32x32 grey pixels, width, height); raises on undecodable bytes."""
    with Image.open(BytesIO(payload)) as image:
        image.load()
        return grey_thumbnail(image), image.width, image.height


def to_hex(value: int | np.integer) -> str:
    """imagehash's string form of a hash (`str(imagehash.phash(img))`)."""
    return f"{int(value) & 0xFFFFFFFFFFFFFFFF:016x}"


def to_signed(hashes: np.ndarray) -> np.ndarray:
    """uint64 -> int64 with the same bits, for parquet/Arrow columns."""
    return hashes.astype(np.uint64).view(np.int64)


def to_unsigned(hashes: np.ndarray) -> np.ndarray:
    return np.asarray(hashes, dtype=np.int64).view(np.uint64)
