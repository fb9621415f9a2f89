"""Checks of model input data (names, shapes, dtypes, NaN/Inf) and the cast to its dtypes."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from trtq.calib.data.formats import Batch
from trtq.calib.data.messages import dims, expected_shape, one_line, quoted
from trtq.errors import DataError
from trtq.graph.load import TensorSpec

log = logging.getLogger(__name__)


def check_batch(
    batch: Mapping[str, Any],
    inputs: Sequence[TensorSpec],
    where: str,
    *,
    check_finite: bool = True,
) -> Batch:
    """Check one ready-made batch against the model inputs; return it cast to their dtypes.

    Loader-script batches, and any other batch fed to the model, meet the same checks as
    re-batched files: every input present, ranks and fixed dims equal, dynamic dims of the
    same name equal across inputs, dtypes castable without loss (float64 to float32 too),
    and, with ``check_finite``, no NaN or Inf. ``where`` names the batch in error
    messages. Keys that are not model inputs are dropped.
    """
    missing = [spec.name for spec in inputs if spec.name not in batch]
    if missing:
        raise DataError(
            f"{where} has no array for input {quoted(missing)} "
            f"(keys given: {quoted(batch) or 'none'})",
            "key each array by its model input name",
        )
    names = {spec.name for spec in inputs}
    ignored = [key for key in batch if key not in names]
    if ignored:
        log.debug("%s: ignoring %s (not model inputs)", where, quoted(ignored))
    arrays = {spec.name: _as_array(batch[spec.name], spec, where) for spec in inputs}
    check_shapes({name: array.shape for name, array in arrays.items()}, inputs, where)
    for spec in inputs:
        check_dtype(spec, arrays[spec.name].dtype, where)
    return convert(arrays, inputs, where, check_finite)


def _as_array(value: Any, spec: TensorSpec, where: str) -> np.ndarray:
    """``value`` as a numeric array; ragged lists and non-numbers are refused by name."""
    try:
        array = np.asarray(value)
    except (ValueError, TypeError) as exc:  # ragged nested lists, objects numpy cannot read
        raise DataError(
            f"input '{spec.name}' in {where} is not an array: {one_line(exc)}",
            "give each input as one numpy array (lists of equal-length rows)",
        ) from exc
    if array.dtype.kind not in "biufc" and spec.dtype.kind not in "OUS":
        raise DataError(
            f"input '{spec.name}' in {where} holds {type(value).__name__} data of dtype "
            f"{array.dtype}, not numbers",
            f"give it as a numpy array of {spec.dtype}",
        )
    return array


def check_shapes(
    shapes: Mapping[str, tuple[int, ...]],
    inputs: Sequence[TensorSpec],
    where: str,
    *,
    batched: bool = True,
) -> None:
    """Ranks, fixed dims, and dynamic dims of one name having one size across inputs.

    Dim 0 is only checked when ``batched``: file data is regrouped along it.
    """
    first = 0 if batched else 1
    named: dict[str, tuple[int, str]] = {}
    for spec in inputs:
        shape = shapes[spec.name]
        pairs = list(zip(spec.shape[first:], shape[first:], strict=False))
        if len(shape) != len(spec.shape) or any(
            isinstance(want, int) and want != got for want, got in pairs
        ):
            raise DataError(
                f"input '{spec.name}': expected shape {expected_shape(spec)}, got {dims(shape)} "
                f"in {where}",
                "reshape the data to the model input's shape",
            )
        for want, got in pairs:
            if isinstance(want, str) and want != "?":
                size, owner = named.setdefault(want, (got, spec.name))
                if size != got:
                    raise DataError(
                        f"dynamic dim '{want}' is {size} in input '{owner}' but {got} in "
                        f"input '{spec.name}' in {where}",
                        f"give every input the same size along '{want}'",
                    )


def check_dtype(spec: TensorSpec, dtype: np.dtype, where: str) -> None:
    # float64 is numpy's default float and models take float32: narrowing it is what
    # users mean. Any other cast that can lose information is refused.
    if np.can_cast(dtype, spec.dtype, "safe") or (dtype == np.float64 and spec.dtype == np.float32):
        return
    raise DataError(
        f"input '{spec.name}': expected dtype {spec.dtype}, got {dtype} in {where}",
        f"save the data as {spec.dtype} (casting {dtype} to it could lose information)",
    )


def convert(
    arrays: Mapping[str, np.ndarray], inputs: Sequence[TensorSpec], where: str, check_finite: bool
) -> Batch:
    """Cast each array to its input's dtype (known to be safe) and look for NaN/Inf."""
    batch = {}
    # A float64 beyond float32's range becomes Inf, which the finite check reports.
    with np.errstate(over="ignore"):
        for spec in inputs:
            array = np.asarray(arrays[spec.name], dtype=spec.dtype)
            if check_finite:
                _check_finite(spec.name, array, where)
            batch[spec.name] = array
    return batch


def _check_finite(name: str, array: np.ndarray, where: str) -> None:
    if array.dtype.kind != "f":
        return
    finite = np.isfinite(array)
    if finite.all():
        return
    nans = int(np.isnan(array).sum())
    infs = int(finite.size - finite.sum()) - nans
    found = " and ".join(f"{n} {kind}" for n, kind in ((nans, "NaN"), (infs, "Inf")) if n)
    raise DataError(
        f"input '{name}' has {found} values in {where}",
        "clean the data: drop or repair the samples that hold them",
    )
