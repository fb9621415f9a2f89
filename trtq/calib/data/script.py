"""Polygraphy-style loader scripts: a ``.py`` file whose ``load_data()`` yields batches."""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, TypeVar

from trtq.calib.data.checks import check_batch
from trtq.calib.data.formats import Batch
from trtq.errors import DataError, UserError
from trtq.graph.load import TensorSpec
from trtq.pyfile import describe_exception, import_file

T = TypeVar("T")

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
    module = import_file(
        path,
        kind="loader script",
        prefix="trtq_data_loader",
        fix=f"fix the script; `python {path}` shows the full error",
        error=DataError,
        importable_folder=True,
    )
    load_data = getattr(module, "load_data", None)
    if not callable(load_data):
        raise DataError(
            f"loader script {path} defines no load_data() function",
            "define load_data() that yields dicts {input_name: numpy array}, as for polygraphy",
        )
    return load_data


def _checked_batches(
    load_data: Callable[[], Iterable[Any]],
    path: Path,
    inputs: list[TensorSpec],
    limit: int | None,
    check_finite: bool,
    can_cut: bool,
) -> Iterator[Batch]:
    remaining = math.inf if limit is None else limit
    produced = _run_user_code(path, load_data)
    if produced is None or isinstance(produced, Mapping | str | bytes) or not _iterable(produced):
        raise DataError(
            f"loader script {path}: load_data() returned {_what(produced)}, not batches",
            "make it yield dicts {input_name: numpy array} (or return a list of them)",
        )
    iterator = _run_user_code(path, iter, produced)
    for index in itertools.count():
        raw = _run_user_code(path, next, iterator, _END)
        if raw is _END:
            return
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


#: What ``next`` returns when the script's iterator is exhausted.
_END = object()


def _run_user_code(path: Path, function: Callable[..., T], *args: Any) -> T:
    """``function(*args)``, where the script's own code runs (calling or advancing load_data).

    Whatever that code raises is the script's problem, reported as one line: exceptions,
    and ``sys.exit()`` too, which would otherwise end trtq silently with the script's
    status. Ctrl-C still interrupts, and trtq's own errors pass through as they are.
    """
    try:
        return function(*args)
    except (KeyboardInterrupt, UserError):
        raise
    except BaseException as exc:  # the script's code: SystemExit included on purpose
        raise DataError(
            f"loader script {path}: load_data() raised {describe_exception(exc)}",
            "fix the script; rerun with --debug for its traceback",
        ) from exc


def _iterable(value: Any) -> bool:
    return isinstance(value, Iterable) or hasattr(value, "__getitem__")


def _what(value: Any) -> str:
    return "None" if value is None else f"a {type(value).__name__}"
