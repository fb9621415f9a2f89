"""The files a data path holds, as pieces to batch: array files or images."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

from trtq.calib.data.arrays import array_file
from trtq.calib.data.batching import Piece
from trtq.calib.data.formats import ACCEPTED_SOURCES, ARRAY_SUFFIXES, IMAGE_SUFFIXES
from trtq.calib.data.images import ImagePreprocess, image_file, image_recipe, refuse_preprocess
from trtq.errors import DataError
from trtq.graph.load import TensorSpec

log = logging.getLogger(__name__)


def file_pieces(
    path: Path, inputs: list[TensorSpec], preprocess: ImagePreprocess | None
) -> tuple[Iterator[Piece], str]:
    """The files of ``path`` as pieces, opened lazily, and what their samples are called."""
    if path.is_dir():
        arrays, images = _folder_files(path)
        if images:
            recipe = image_recipe(inputs, preprocess or ImagePreprocess())
            return (image_file(image, recipe) for image in images), "images"
    elif not path.is_file():  # a FIFO or device would block or never end
        raise DataError(
            f"data {path} is not a regular file or a folder", f"pass {ACCEPTED_SOURCES}"
        )
    elif path.suffix.lower() in ARRAY_SUFFIXES:
        arrays = [path]
    else:
        raise DataError(f"unsupported data file: {path}", f"pass {ACCEPTED_SOURCES}")
    refuse_preprocess(preprocess, path)
    return (array_file(file, inputs) for file in arrays), "samples"


def _folder_files(folder: Path) -> tuple[list[Path], list[Path]]:
    """The array files and the image files of a folder, sorted by name."""
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    if not files:
        raise DataError(
            f"data folder {folder} holds no files",
            f"put the data directly in it (subfolders are not read): {ACCEPTED_SOURCES}",
        )
    arrays = [p for p in files if p.suffix.lower() in ARRAY_SUFFIXES]
    images = [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES]
    if arrays and images:
        raise DataError(
            f"data folder {folder} mixes array files ({arrays[0].name}) and images "
            f"({images[0].name})",
            "keep one kind of data per folder",
        )
    if not arrays and not images:
        raise DataError(
            f"data folder {folder} has no usable files (e.g. {files[0].name})",
            f"fill it with {ACCEPTED_SOURCES}",
        )
    skipped = len(files) - len(arrays) - len(images)
    if skipped:
        log.debug("%s: skipping %d files that are neither arrays nor images", folder, skipped)
    return arrays, images
