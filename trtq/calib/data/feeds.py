"""Whole feeds: model calls whose inputs share no batch axis, taken as they are.

Stateful and sequence exports have no dim along which their inputs can be cut into
samples or joined into batches: a voice-activity model exported per sequence takes
``input [T, 576]`` with its LSTM states ``h, c [1, 1, 128]``, and ONNX Runtime runs a feed
of 12 frames and two states as given. Such a feed is a *whole feed*: one model call,
counted as one sample, never re-batched, sliced or concatenated, in calibration, the
check after writing, ``trtq compare`` and ``trtq run`` alike.

Which feeds are whole is decided from the model first, then from the feed:

* a model with a scalar input, or with dim 0 fixed at different sizes on two inputs,
  has no batch axis at all: every feed of it is whole;
* otherwise a feed whose arrays differ in dim 0 is whole, unless the model names one
  symbol for dim 0 on every input (``batch``): then the arrays must agree, and a feed
  that does not is an error, as it always was;
* where some inputs name dim 0 as a batch (``batch``, ``batch_size``, ``N``...), only those
  must agree: the others (a target ``shape [3]``, a fixed setting) go with every batch
  whole, as a batched model reads them.

Feeds whose arrays agree on dim 0 stay batches of that many samples, so models with a
batch axis read, count and slice their data exactly as before.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from trtq.calib.data.messages import dims, quoted
from trtq.graph.load import TensorSpec


def no_batch_axis(inputs: Sequence[TensorSpec]) -> str | None:
    """Why no feed of a model with ``inputs`` has a batch axis (None: feeds may have one)."""
    scalars = [spec.name for spec in inputs if not spec.shape]
    if scalars:
        return f"input {quoted(scalars)} is a scalar"
    fixed = {spec.name: spec.shape[0] for spec in inputs if isinstance(spec.shape[0], int)}
    if len(set(fixed.values())) > 1:
        listing = ", ".join(f"{spec.name} {dims(spec.shape)}" for spec in inputs)
        return f"dim 0 is fixed at different sizes ({listing})"
    return None


def batch_symbol(inputs: Sequence[TensorSpec]) -> str | None:
    """The symbol the model names dim 0 on every input (``batch``), or None."""
    symbols = {spec.shape[0] if spec.shape else None for spec in inputs}
    if len(symbols) == 1:
        (symbol,) = symbols
        if isinstance(symbol, str) and symbol != "?":
            return symbol
    return None


#: Names exporters give a batch dim: ``batch``, ``batch_size``, ``N``, ``B``, ``bs``...
_BATCH_NAME = re.compile(r"batch|^(n|b|bs|num_samples)$", re.IGNORECASE)


def batch_inputs(inputs: Sequence[TensorSpec]) -> list[TensorSpec]:
    """The inputs whose dim 0 the model names as a batch; all inputs when none does."""
    named = [
        spec
        for spec in inputs
        if spec.shape and isinstance(spec.shape[0], str) and _BATCH_NAME.search(spec.shape[0])
    ]
    return named or list(inputs)


def whole_feed(shapes: Mapping[str, Sequence[int]], inputs: Sequence[TensorSpec]) -> str | None:
    """Why a feed whose arrays have ``shapes`` is one model call (None: dim 0 counts samples).

    ``shapes`` may hold more than the model's inputs (labels, frozen inputs); only inputs
    count. A feed that breaks a shared ``batch`` symbol is not whole here: the data checks
    report it.
    """
    reason = no_batch_axis(inputs)
    if reason is not None:
        return f"the model's inputs share no batch dim: {reason}"
    leading = {
        spec.name: shapes[spec.name][0] for spec in batch_inputs(inputs) if shapes.get(spec.name)
    }
    if len(set(leading.values())) > 1 and batch_symbol(inputs) is None:
        listing = ", ".join(f"{name} {size}" for name, size in leading.items())
        return f"its inputs differ in dim 0 ({listing}) and the model has no batch dim they share"
    return None


def feed_shapes(batch: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    """The shape of every array of a batch (device arrays too: anything with ``.shape``)."""
    return {name: tuple(getattr(value, "shape", ())) for name, value in batch.items()}


def is_whole_feed(batch: Mapping[str, Any], inputs: Sequence[TensorSpec]) -> bool:
    """Whether ``batch`` is one model call to pass as given (see the module docstring)."""
    return whole_feed(feed_shapes(batch), inputs) is not None


def samples_in(batch: Mapping[str, Any], inputs: Sequence[TensorSpec]) -> int:
    """Samples in one model call: the inputs' shared dim 0, or 1 for a whole feed."""
    if is_whole_feed(batch, inputs):
        return 1
    for spec in batch_inputs(inputs):
        shape = getattr(batch.get(spec.name), "shape", ())
        if len(shape):
            return int(shape[0])
    return 1
