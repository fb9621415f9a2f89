"""Images: :class:`ImagePreprocess`, and decoding images into model input with Pillow."""

from __future__ import annotations

import contextlib
import math
import re
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any, Literal

import numpy as np

from trtq.calib.data.formats import Batch
from trtq.calib.data.messages import dims, one_line
from trtq.errors import DataError, require
from trtq.graph.load import Dim, TensorSpec

Layout = Literal["NCHW", "NHWC"]
Color = Literal["RGB", "BGR", "GRAY"]


@dataclass(frozen=True)
class ImagePreprocess:
    """How an image becomes model input: ``(pixel * scale - mean) / std``, in the model's layout.

    ``resize`` is (height, width), the order of the spatial dims in the model's NCHW or
    NHWC shape, so ``--resize 32x100`` reads like the input shape ``Nx3x32x100``. Images
    are resized bilinearly. Without ``resize`` they are resized to the model's fixed
    spatial dims; where only one of the two is fixed (text lines of fixed height), the
    other follows the image's aspect ratio; where neither is, images keep their size and
    images of different sizes end up in separate batches.

    ``mean`` and ``std`` hold one value for every channel or one per channel, in the order
    the model sees the channels (B, G, R for ``color="BGR"``). ``scale`` is applied first,
    so the default 1/255 maps pixels to [0, 1] and ImageNet statistics apply as published.
    ``layout`` and ``color`` default to what the model input implies: 1 or 3 channels at
    dim 1 means NCHW, at the last dim NHWC; one channel means GRAY, three RGB.
    """

    resize: tuple[int, int] | None = None
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)
    scale: float = 1 / 255
    layout: Layout | None = None
    color: Color | None = None

    def __post_init__(self) -> None:
        if self.resize is not None and (len(self.resize) != 2 or min(self.resize) < 1):
            raise DataError(
                f"image resize {self.resize} is not a (height, width) pair of positive sizes",
                "give it like --resize 224x224",
            )
        if not self.mean or not self.std:
            raise DataError("image mean and std need at least one value", "give one per channel")
        if not all(math.isfinite(v) for v in (*self.mean, *self.std, self.scale)):
            raise DataError("image mean, std and scale must be finite numbers", "fix the values")
        if 0 in self.std:
            raise DataError(f"image std {self.std} has a zero", "give every channel a non-zero std")
        _check_choice("layout", self.layout, ("NCHW", "NHWC"))
        _check_choice("color", self.color, ("RGB", "BGR", "GRAY"))

    @classmethod
    def parse(
        cls,
        resize: str | None = None,
        mean: str | None = None,
        std: str | None = None,
        scale: str | None = None,
        layout: str | None = None,
        color: str | None = None,
    ) -> ImagePreprocess | None:
        """Build from command-line text: ``"224x224"``, ``"0.485,0.456,0.406"``, ``"1/255"``.

        Returns None when no option is given, so a CLI can pass the result straight to
        :func:`open_batches`, which refuses image options for data that is not images.
        """
        given = {
            "resize": None if resize is None else _parse_resize(resize),
            "mean": None if mean is None else _parse_numbers("--mean", mean),
            "std": None if std is None else _parse_numbers("--std", std),
            "scale": None if scale is None else _parse_scale(scale),
            "layout": None if layout is None else layout.strip().upper(),
            "color": None if color is None else color.strip().upper(),
        }
        options = {name: value for name, value in given.items() if value is not None}
        return cls(**options) if options else None


def _parse_resize(text: str) -> tuple[int, int]:
    match = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", text)
    if not match:
        raise DataError(f"--resize {text!r} is not HEIGHTxWIDTH", "write it like --resize 224x224")
    return int(match[1]), int(match[2])


def _parse_numbers(flag: str, text: str) -> tuple[float, ...]:
    try:
        return tuple(float(part) for part in text.split(","))
    except ValueError:
        raise DataError(
            f"{flag} {text!r} is not a comma-separated list of numbers",
            f"write it like {flag} 0.485,0.456,0.406",
        ) from None


def _parse_scale(text: str) -> float:
    try:
        return float(Fraction(text.strip()))
    except (ValueError, ZeroDivisionError):
        raise DataError(
            f"--scale {text!r} is not a number or fraction", "write it like --scale 1/255"
        ) from None


def _check_choice(option: str, value: str | None, choices: tuple[str, ...]) -> None:
    if value is not None and value not in choices:
        raise DataError(f"image {option} {value!r} is unknown", f"use one of {', '.join(choices)}")


def refuse_preprocess(preprocess: ImagePreprocess | None, path: Path) -> None:
    if preprocess is not None:
        raise DataError(
            f"image preprocessing options were given, but {path} holds no images",
            "drop --resize/--mean/--std/--scale/--layout/--color for this data",
        )


@dataclass(frozen=True)
class _ImageRecipe:
    """:class:`ImagePreprocess` resolved against the model's image input."""

    spec: TensorSpec
    layout: Layout
    color: Color
    height: int | None  # None: follow the image
    width: int | None
    mean: np.ndarray
    std: np.ndarray
    scale: float

    def output_size(self, image_size: tuple[int, int]) -> tuple[int, int]:
        """(height, width) of the input made from an image of PIL size (width, height)."""
        width, height = image_size
        if self.height and self.width:
            return self.height, self.width
        if self.height:
            return self.height, max(1, round(width * self.height / height))
        if self.width:
            return max(1, round(height * self.width / width)), self.width
        return height, width

    def sample_shape(self, image_size: tuple[int, int]) -> tuple[int, ...]:
        height, width = self.output_size(image_size)
        channels = 1 if self.color == "GRAY" else 3
        return (channels, height, width) if self.layout == "NCHW" else (height, width, channels)

    def apply(self, image, where: str) -> np.ndarray:
        """One PIL image as a batch of one, in the model's layout and dtype."""
        pil_image = _pil_image()
        image = image.convert("L" if self.color == "GRAY" else "RGB")
        height, width = self.output_size(image.size)
        if image.size != (width, height):
            image = image.resize((width, height), pil_image.Resampling.BILINEAR)
        pixels = np.asarray(image, dtype=np.float32).reshape(height, width, -1)
        if self.color == "BGR":
            pixels = pixels[..., ::-1]
        values = (pixels * np.float32(self.scale) - self.mean) / self.std
        if self.layout == "NCHW":
            values = values.transpose(2, 0, 1)
        return _pixels_as(values[np.newaxis], self.spec, where)


@dataclass(frozen=True)
class _ImageFile:
    path: Path
    recipe: _ImageRecipe
    size: tuple[int, int]  # PIL's (width, height)
    count: int = 1
    whole: None = None  # an image is one sample of a batch, never a whole feed

    @property
    def where(self) -> str:
        return str(self.path)

    @property
    def sample_shapes(self) -> tuple[tuple[int, ...], ...]:
        return (self.recipe.sample_shape(self.size),)

    def read(self) -> Batch:
        with _opened(self.path, decode=True) as image:
            return {self.recipe.spec.name: self.recipe.apply(image, self.where)}


def _pil_image():
    require("PIL", "images", "reading calibration images")
    from PIL import Image

    return Image


def image_file(path: Path, recipe: _ImageRecipe) -> _ImageFile:
    """Read only the image's header: its size decides its batch."""
    with _opened(path, decode=False) as image:
        return _ImageFile(path, recipe, image.size)


@contextlib.contextmanager
def _opened(path: Path, decode: bool) -> Iterator[Any]:
    """The Pillow image of ``path``, decoded if asked; whatever Pillow fails on is the file's
    problem, reported as one line.

    Pillow refuses images with more pixels than ``PIL.Image.MAX_IMAGE_PIXELS`` (a few
    bytes of PNG can claim gigapixels) from the header; its warning for images up to twice
    that is made an error too, since calibration never needs such images.
    """
    pil_image = _pil_image()
    bombs = (pil_image.DecompressionBombError, pil_image.DecompressionBombWarning)
    image = None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", pil_image.DecompressionBombWarning)
            image = pil_image.open(path)
            if decode:
                image.load()
    except bombs as exc:
        _close(image)
        raise DataError(
            f"image {path} is too large to decode safely ({one_line(exc).rstrip('.')})",
            f"re-save it smaller or remove it from the folder (Pillow's limit: "
            f"PIL.Image.MAX_IMAGE_PIXELS = {pil_image.MAX_IMAGE_PIXELS} pixels)",
        ) from exc
    except Exception as exc:  # Pillow's decoders raise many types for a broken file
        _close(image)
        raise DataError(
            f"cannot decode image {path} ({one_line(exc)})",
            "re-save it or remove it from the folder",
        ) from exc
    with image:
        yield image


def _close(image) -> None:
    if image is not None:
        image.close()


def image_recipe(inputs: list[TensorSpec], preprocess: ImagePreprocess) -> _ImageRecipe:
    if len(inputs) != 1 or len(inputs[0].shape) != 4 or inputs[0].dtype.kind not in "fiu":
        shapes = ", ".join(f"{spec.name} {spec.dtype} {dims(spec.shape)}" for spec in inputs)
        raise DataError(
            f"a folder of images feeds one 4-D numeric input, but the model takes {shapes}",
            "pass .npz/.npy data or a .py loader script instead",
        )
    spec = inputs[0]
    layout = preprocess.layout or _infer_layout(spec)
    nchw = layout == "NCHW"
    channel_dim = spec.shape[1] if nchw else spec.shape[3]
    color = preprocess.color or ("GRAY" if channel_dim == 1 else "RGB")
    channels = 1 if color == "GRAY" else 3
    if isinstance(channel_dim, int) and channel_dim != channels:
        raise DataError(
            f"input '{spec.name}' of shape {dims(spec.shape)} has {channel_dim} channels as "
            f"{layout}, but {color} images have {channels}",
            "pass the --layout and --color that fit the model",
        )
    height, width = spec.shape[2:] if nchw else spec.shape[1:3]
    if preprocess.resize is not None:
        _check_resize(spec, preprocess.resize, (height, width))
        height, width = preprocess.resize
    return _ImageRecipe(
        spec,
        layout,
        color,
        height if isinstance(height, int) else None,
        width if isinstance(width, int) else None,
        _per_channel("mean", preprocess.mean, color, channels),
        _per_channel("std", preprocess.std, color, channels),
        preprocess.scale,
    )


def _infer_layout(spec: TensorSpec) -> Layout:
    if spec.shape[1] in (1, 3):
        return "NCHW"
    if spec.shape[3] in (1, 3):
        return "NHWC"
    raise DataError(
        f"cannot tell whether input '{spec.name}' of shape {dims(spec.shape)} is NCHW or NHWC",
        "pass --layout NCHW or --layout NHWC",
    )


def _check_resize(spec: TensorSpec, resize: tuple[int, int], spatial: Sequence[Dim]) -> None:
    if any(
        isinstance(want, int) and want != got for want, got in zip(spatial, resize, strict=True)
    ):
        raise DataError(
            f"--resize {resize[0]}x{resize[1]} does not fit input '{spec.name}' of shape "
            f"{dims(spec.shape)}",
            "drop --resize to use the model's size",
        )


def _per_channel(option: str, values: tuple[float, ...], color: Color, channels: int) -> np.ndarray:
    if len(values) not in (1, channels):
        raise DataError(
            f"image {option} {values} has {len(values)} values, but {color} images have "
            f"{channels} channel(s)",
            f"give one {option} value or {channels}",
        )
    return np.asarray(values, dtype=np.float32)


def _pixels_as(values: np.ndarray, spec: TensorSpec, where: str) -> np.ndarray:
    """Cast preprocessed pixels to the input dtype; integer inputs take whole numbers only."""
    if spec.dtype.kind == "f":
        return values.astype(spec.dtype)
    info = np.iinfo(spec.dtype)
    if np.any(values != np.round(values)) or values.min() < info.min or values.max() > info.max:
        raise DataError(
            f"input '{spec.name}' is {spec.dtype}, but the preprocessed pixels of {where} are "
            f"not whole numbers in [{info.min}, {info.max}]",
            "pass --scale 1 and no --mean/--std to feed raw pixel values",
        )
    return values.astype(spec.dtype)
