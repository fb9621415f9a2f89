"""The data formats: what a batch is, and which files and sources are accepted."""

from __future__ import annotations

import numpy as np

#: One batch of model inputs, keyed by input name.
Batch = dict[str, np.ndarray]

ARRAY_SUFFIXES = (".npz", ".npy")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
ACCEPTED_SOURCES = (
    "a .npz file keyed by input name, a .npy file, a folder of .npz/.npy files, "
    f"a folder of images ({' '.join(IMAGE_SUFFIXES)}) or a .py script with load_data()"
)
