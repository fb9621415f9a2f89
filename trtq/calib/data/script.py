"""Polygraphy-style loader scripts: a ``.py`` file whose ``load_data()`` yields batches."""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import math
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from trtq.calib.data.checks import check_batch
from trtq.calib.data.formats import Batch
from trtq.calib.data.messages import one_line
from trtq.errors import DataError
from trtq.graph.load import TensorSpec

log = logging.getLogger(__name__)


def script_batches(
    path: Path, inputs: list[TensorSpec], limit: int | None, check_finite: bool
) -> Callable[[], Iterator[Batch]]:
    """Import the script now; each call of the result runs its ``load_data()`` afresh."""
    load_data = _load_data_function(path)
    # The last batch may only be shortened to meet ``limit`` when every batch dim is dynamic.
    can_cut = all(spec.shape and not isinstance(spec.shape[0], int) for spec in inputs)
    return lambda: _checked_batches(load_data, path, inputs, limit, check_finite, can_cut)


def _load_data_function(path: Path) -> Callable[[], Iterable[Any]]:
    """Import the script (its own folder importable, like ``python script.py``)."""
    name = f"trtq_data_loader_{path.stem}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise DataError(f"cannot load {path} as a Python module", "pass a .py loader script")
    module = importlib.util.module_from_spec(spec)
    # Registered so that dataclasses and pickling inside the script find their module.
    sys.modules[name] = module
    try:
        with _on_sys_path(path.parent):
            spec.loader.exec_module(module)
    except (ImportError, SyntaxError) as exc:
        raise DataError(
            f"cannot import loader script {path}: {one_line(exc)}",
            f"fix the script; `python {path}` shows the full error",
        ) from exc
    load_data = getattr(module, "load_data", None)
    if not callable(load_data):
        raise DataError(
            f"loader script {path} defines no load_data() function",
            "define load_data() that yields dicts {input_name: numpy array}, as for polygraphy",
        )
    return load_data


@contextlib.contextmanager
def _on_sys_path(folder: Path) -> Iterator[None]:
    sys.path.insert(0, str(folder))
    try:
        yield
    finally:
        sys.path.remove(str(folder))


def _checked_batches(
    load_data: Callable[[], Iterable[Any]],
    path: Path,
    inputs: list[TensorSpec],
    limit: int | None,
    check_finite: bool,
    can_cut: bool,
) -> Iterator[Batch]:
    remaining = math.inf if limit is None else limit
    for index, raw in enumerate(load_data()):
        where = f"batch {index} of {path}"
        if not isinstance(raw, Mapping):
            raise DataError(
                f"{where} is a {type(raw).__name__}, not a dict",
                "make load_data() yield dicts {input_name: numpy array}",
            )
        batch = check_batch(raw, inputs, where, check_finite=check_finite)
        rows = next((len(array) for array in batch.values() if array.ndim), 1)
        if rows > remaining:
            if not can_cut:
                log.info("stopping before %s: it would go past the limit of %s", where, limit)
                return
            batch = {name: array[: int(remaining)] for name, array in batch.items()}
            rows = int(remaining)
        yield batch
        remaining -= rows
        if remaining <= 0:
            return
