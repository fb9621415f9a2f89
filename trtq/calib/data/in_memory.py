"""Data handed over in Python: a path to read, or ``{input_name: array}`` batches in memory.

The Python API takes either wherever the CLI takes ``--calib``/``--data``. A path goes
to :func:`~trtq.calib.data.open_batches` (re-batched, limited, preprocessed); batches
in memory are used as they are and checked against the model one by one as they are
read, with the same one-line errors as files.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence, Sized
from pathlib import Path
from typing import Any

import numpy as np

from trtq.calib.data import BatchSource, ImagePreprocess, check_batch, open_batches
from trtq.errors import DataError, UserError
from trtq.graph.load import TensorSpec

#: Batches in memory: ``{input_name: array}`` per batch, leading dim = samples.
Batches = Iterable[Mapping[str, np.ndarray]]
#: Data: a path in any format trtq reads (README, "Calibration data formats"), or batches.
DataLike = str | Path | Batches


def as_batches(
    data: DataLike,
    inputs: Sequence[TensorSpec],
    *,
    batch_size: int | None = None,
    limit: int | None = None,
    preprocess: ImagePreprocess | None = None,
) -> Iterable[Mapping[str, np.ndarray]]:
    """Validated batches from a path (see :func:`open_batches`) or from batches in memory.

    A re-iterable collection of batches (a list) stays re-iterable, an iterator stays
    one-shot. ``batch_size``, ``limit`` and ``preprocess`` apply to paths only.
    """
    if isinstance(data, str | Path):
        return open_batches(data, inputs, batch_size=batch_size, limit=limit, preprocess=preprocess)
    if isinstance(data, Mapping | np.ndarray) or not isinstance(data, Iterable):
        raise UserError(
            f"data must be a path or an iterable of {{input_name: array}} batches, "
            f"not {type(data).__name__}",
            "pass a path, or a list of batches ([batch] for a single one)",
        )
    shaping = {"batch_size": batch_size, "limit": limit, "preprocess": preprocess}
    given = [name for name, value in shaping.items() if value is not None]
    if given:
        raise UserError(
            f"{', '.join(given)} apply to data read from a path, not to batches in memory",
            "batch and slice the arrays yourself, or pass a path",
        )
    inputs = list(inputs)
    if isinstance(data, Iterator):
        return _checked(data, inputs)
    return BatchSource(
        lambda: _checked(iter(data), inputs),
        "batches given in Python",
        num_batches=len(data) if isinstance(data, Sized) else None,
        num_samples=None,
    )


def _checked(batches: Iterator[Any], inputs: list[TensorSpec]) -> Iterator[Mapping[str, Any]]:
    for index, batch in enumerate(batches):
        where = f"batch {index}"
        if not isinstance(batch, Mapping):
            raise DataError(
                f"{where} is a {type(batch).__name__}, not a mapping {{input_name: array}}",
                "yield one dict per batch, keyed by input name",
            )
        yield check_batch(batch, inputs, where)
