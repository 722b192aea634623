"""Our batched pHash is bit-identical to imagehash.phash."""

from io import BytesIO

import imagehash
import numpy as np
import pytest
from PIL import Image

from filters.hamming import to_signed, to_unsigned
from stages import demo_scenes as world
from stages.phash import decode_thumbnail, grey_thumbnail, phash_images, phash_pixels, to_hex


def _images(rng):
    images = []
    for i in range(300):
        size = int(rng.choice([9, 32, 64, 100, 257]))
        image = world.render_scene(world.random_scene(rng), size, rng)
        if i % 3 == 0:
            image = world.degrade_noise(image, rng)
        if i % 7 == 0:
            image = image.convert("RGBA")
        if i % 11 == 0:
            image = image.convert("P")
        images.append(image)
    images.append(Image.new("RGB", (40, 30), (120, 120, 120)))  # flat: every coefficient ties
    images.append(Image.new("L", (5, 500), 0))
    return images


def test_hashes_are_bit_identical_to_imagehash():
    images = _images(np.random.default_rng(0))
    ours = [to_hex(h) for h in phash_images(images)]
    theirs = [str(imagehash.phash(im)) for im in images]
    assert sum(a != b for a, b in zip(ours, theirs, strict=True)) == 0


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP"])
def test_decoding_bytes_matches_imagehash_on_opened_files(fmt):
    rng = np.random.default_rng(1)
    for _ in range(20):
        buffer = BytesIO()
        world.render_scene(world.random_scene(rng), 80, rng).save(buffer, format=fmt)
        thumb, width, height = decode_thumbnail(buffer.getvalue())
        assert (width, height) == (80, 80)
        assert to_hex(phash_pixels(thumb[None])[0]) == str(imagehash.phash(Image.open(BytesIO(buffer.getvalue()))))


def test_signed_storage_round_trips_all_bits():
    values = np.array([0, 1, 2**63, 2**64 - 1, 0x8000_0000_0000_0001], dtype=np.uint64)
    assert np.array_equal(to_unsigned(to_signed(values)), values)
    assert to_hex(to_signed(values)[3]) == "ffffffffffffffff"


def test_thumbnail_is_what_imagehash_hashes():
    image = world.render_scene(world.random_scene(np.random.default_rng(2)), 64, np.random.default_rng(3))
    assert grey_thumbnail(image).shape == (32, 32)
    assert phash_pixels(np.zeros((0, 32, 32))).shape == (0,)
