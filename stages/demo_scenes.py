"""A small synthetic world for the demo: coloured shapes on backgrounds, with true captions.

Every scene has a class label "<colour> <shape>" (120 classes) and a caption that also names its
size, position and background, which gives several thousand distinct captions. The world is
simple enough for a tiny CLIP to learn on 2 CPU cores, yet rich enough that filtering matters.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 40),
    "blue": (30, 60, 220),
    "yellow": (240, 220, 30),
    "orange": (245, 140, 20),
    "purple": (130, 40, 170),
    "cyan": (30, 210, 220),
    "magenta": (225, 40, 200),
    "white": (250, 250, 250),
    "black": (15, 15, 15),
    "brown": (120, 70, 30),
    "pink": (250, 160, 190),
}
SHAPES = ["circle", "square", "triangle", "star", "cross", "ring", "diamond", "arrow", "hexagon", "crescent"]
BACKGROUNDS = ["plain", "gradient", "striped", "dotted"]
SIZES = {"small": 0.35, "medium": 0.55, "large": 0.8}
POSITIONS = {
    "in the centre": (0.5, 0.5),
    "at the top left": (0.3, 0.3),
    "at the top right": (0.7, 0.3),
    "at the bottom left": (0.3, 0.7),
    "at the bottom right": (0.7, 0.7),
}
UNSAFE_LABEL = "hazard pattern"


@dataclass(frozen=True)
class Scene:
    colour: str
    shape: str
    background: str
    size: str
    position: str
    background_tone: int  # 0..255 grey level behind the pattern

    @property
    def label(self) -> str:
        return f"{self.colour} {self.shape}"

    @property
    def caption(self) -> str:
        return f"a {self.size} {self.colour} {self.shape} {self.position} on a {self.background} background"


def class_names() -> list[str]:
    """All classification labels of the world, in a fixed order."""
    return [f"{c} {s}" for c in COLOURS for s in SHAPES]


def random_scene(rng: np.random.Generator) -> Scene:
    return Scene(
        colour=str(rng.choice(list(COLOURS))),
        shape=str(rng.choice(SHAPES)),
        background=str(rng.choice(BACKGROUNDS)),
        size=str(rng.choice(list(SIZES))),
        position=str(rng.choice(list(POSITIONS))),
        background_tone=int(rng.integers(90, 200)),
    )


def _background(scene: Scene, size: int, rng: np.random.Generator) -> Image.Image:
    tone = scene.background_tone
    base = np.full((size, size, 3), tone, dtype=np.float32)
    if scene.background == "gradient":
        ramp = np.linspace(-50, 50, size, dtype=np.float32)
        base += ramp[None, :, None]
    elif scene.background == "striped":
        period = max(4, size // 8)
        stripes = ((np.arange(size) // (period // 2)) % 2).astype(np.float32)
        base += (stripes[:, None, None] * 40) - 20
    elif scene.background == "dotted":
        yy, xx = np.mgrid[0:size, 0:size]
        period = max(4, size // 8)
        dots = ((yy % period) - period / 2) ** 2 + ((xx % period) - period / 2) ** 2 < (period / 5) ** 2
        base[dots] -= 45
    base += _shading(size, rng)[..., None]
    base += rng.normal(0, 3, base.shape)
    return Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))


def _shading(size: int, rng: np.random.Generator, amplitude: float = 22.0) -> np.ndarray:
    """Smooth random lighting: a few low spatial frequencies, different in every image.

    Real photos differ in their low frequencies; without this, perceptual hashes of two
    unrelated scenes with the same layout would collide.
    """
    coords = (np.arange(size) + 0.5) / size
    field = np.zeros((size, size), dtype=np.float32)
    for u in range(4):
        for v in range(4):
            if u == v == 0:
                continue
            weight = rng.normal(0, amplitude / (1 + u + v))
            field += weight * np.outer(np.cos(np.pi * u * coords), np.cos(np.pi * v * coords)).astype(np.float32)
    return field


def _polygon(cx: float, cy: float, r: float, n: int, rotation: float = 0.0) -> list[tuple[float, float]]:
    return [
        (cx + r * math.cos(rotation + 2 * math.pi * i / n), cy + r * math.sin(rotation + 2 * math.pi * i / n))
        for i in range(n)
    ]


def _shape_mask(shape: str, size: int, cx: float, cy: float, r: float) -> Image.Image:
    mask = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(mask)
    box = (cx - r, cy - r, cx + r, cy + r)
    if shape == "circle":
        draw.ellipse(box, fill=255)
    elif shape == "square":
        draw.rectangle((cx - r * 0.8, cy - r * 0.8, cx + r * 0.8, cy + r * 0.8), fill=255)
    elif shape == "triangle":
        draw.polygon(_polygon(cx, cy + r * 0.15, r, 3, -math.pi / 2), fill=255)
    elif shape == "star":
        outer = _polygon(cx, cy, r, 5, -math.pi / 2)
        inner = _polygon(cx, cy, r * 0.42, 5, -math.pi / 2 + math.pi / 5)
        draw.polygon([p for pair in zip(outer, inner, strict=True) for p in pair], fill=255)
    elif shape == "cross":
        w = r * 0.32
        draw.rectangle((cx - w, cy - r, cx + w, cy + r), fill=255)
        draw.rectangle((cx - r, cy - w, cx + r, cy + w), fill=255)
    elif shape == "ring":
        draw.ellipse(box, fill=255)
        inner = r * 0.55
        draw.ellipse((cx - inner, cy - inner, cx + inner, cy + inner), fill=0)
    elif shape == "diamond":
        draw.polygon(_polygon(cx, cy, r, 4, 0.0), fill=255)
    elif shape == "arrow":
        w = r * 0.3
        draw.rectangle((cx - r, cy - w, cx + r * 0.1, cy + w), fill=255)
        draw.polygon([(cx + r * 0.1, cy - r * 0.75), (cx + r, cy), (cx + r * 0.1, cy + r * 0.75)], fill=255)
    elif shape == "hexagon":
        draw.polygon(_polygon(cx, cy, r, 6, 0.0), fill=255)
    elif shape == "crescent":
        draw.ellipse(box, fill=255)
        draw.ellipse((cx - r * 0.45, cy - r * 1.05, cx + r * 1.35, cy + r * 0.85), fill=0)
    else:
        raise ValueError(f"unknown shape '{shape}'")
    return mask


def render_scene(scene: Scene, size: int, rng: np.random.Generator) -> Image.Image:
    """Render a scene as an RGB image of `size` x `size` pixels."""
    image = _background(scene, size, rng)
    fx, fy = POSITIONS[scene.position]
    jitter = rng.normal(0, 0.06, 2)
    r = SIZES[scene.size] * size * 0.32 * float(rng.uniform(0.85, 1.15))
    cx = float(np.clip(fx + jitter[0], 0.2, 0.8)) * size
    cy = float(np.clip(fy + jitter[1], 0.2, 0.8)) * size
    mask = _shape_mask(scene.shape, size, cx, cy, r)
    image.paste(COLOURS[scene.colour], (0, 0), mask)
    return image


def render_hazard(size: int, rng: np.random.Generator) -> Image.Image:
    """The demo's 'unsafe' content: a diagonal black/yellow hazard pattern with a red disc."""
    yy, xx = np.mgrid[0:size, 0:size]
    period = max(6, size // 6)
    phase = int(rng.integers(0, period))
    stripes = ((xx + yy + phase) // (period // 2)) % 2 == 0
    pixels = np.where(stripes[..., None], np.array([20, 20, 20]), np.array([240, 200, 20])).astype(np.uint8)
    image = Image.fromarray(pixels)
    draw = ImageDraw.Draw(image)
    r = size * float(rng.uniform(0.15, 0.25))
    c = size / 2 + rng.normal(0, size * 0.05, 2)
    draw.ellipse((c[0] - r, c[1] - r, c[0] + r, c[1] + r), fill=(200, 20, 20))
    return image


def degrade_noise(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    pixels = np.asarray(image, dtype=np.float32)
    pixels += rng.normal(0, 70, pixels.shape)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def degrade_blur(image: Image.Image) -> Image.Image:
    return image.filter(ImageFilter.GaussianBlur(radius=max(2.0, image.width / 10)))


def encode_jpeg(image: Image.Image, quality: int = 90) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()
