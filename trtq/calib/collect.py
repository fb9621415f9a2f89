"""Run the FP32 model on calibration batches and stream activations into histograms.

The tensors to observe are added as extra graph outputs and ONNX Runtime runs
the model one batch at a time; each returned activation is folded into its
:class:`~trtq.calib.histogram.Histogram` and dropped at once, so memory does
not grow with the number of batches. When the activations of one batch would
exceed ``max_memory``, the tensors are split into groups and the data is
streamed once per group: more passes, bounded memory.
"""

from __future__ import annotations

import itertools
import logging
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime as ort
from tqdm import tqdm

from trtq.calib.data.feeds import is_whole_feed, samples_in
from trtq.calib.histogram import DEFAULT_BINS, Histogram
from trtq.errors import UserError
from trtq.graph.load import model_inputs
from trtq.graph.shapes import Shapes
from trtq.sessions import open_session

log = logging.getLogger(__name__)

Batch = Mapping[str, np.ndarray]


@dataclass
class Collection:
    """What one calibration run saw."""

    histograms: dict[str, Histogram]
    num_batches: int
    num_samples: int
    passes: int


@dataclass(frozen=True)
class Shard:
    """Shard ``index`` (1-based) of ``count``: batches i with i % count == index - 1."""

    index: int
    count: int

    @classmethod
    def parse(cls, text: str) -> Shard:
        match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
        if not match:
            raise UserError(
                f"bad shard {text!r}: not K/N", "write e.g. --shard 2/4 for the 2nd of 4 shards"
            )
        if not 1 <= int(match[1]) <= int(match[2]):
            raise UserError(f"bad shard {text!r}: K must be from 1 to N", "write e.g. --shard 2/4")
        return cls(int(match[1]), int(match[2]))

    def owns(self, batch_index: int) -> bool:
        return batch_index % self.count == self.index - 1


#: What observes the activations: :func:`collect` here, or the same call on a Ray cluster
#: (:class:`trtq.calib.ray_backend.RayCalibration`); same arguments, same result.
Collector = Callable[..., Collection]


def peek(batches: Iterable[Batch]) -> tuple[Batch | None, Iterable[Batch]]:
    """The first batch, and batches to iterate that still include it.

    A one-shot iterator (a generator) loses what ``next`` takes from it, so it
    is chained back together; re-iterable sources are returned as they are.
    """
    iterator = iter(batches)
    first = next(iterator, None)
    if iterator is batches and first is not None:
        return first, itertools.chain([first], iterator)
    return first, batches


def parse_memory(text: str) -> int:
    """'512M', '4G', '1.5GiB', '1000000' -> bytes."""
    match = re.fullmatch(r"\s*(\d+\.?\d*|\.\d+)\s*([kmgt]?)(i?b)?\s*", text.lower())
    if not match:
        raise UserError(f"bad memory size {text!r}", "write it like 512M or 4G")
    factor = 1024 ** " kmgt".index(match[2] or " ")
    size = int(float(match[1]) * factor)
    if not 1 <= size < 1 << 60:
        raise UserError(f"bad memory size {text!r}: out of range", "write it like 512M or 4G")
    return size


def collect(
    model: onnx.ModelProto,
    tensors: Sequence[str],
    batches: Iterable[Batch],
    *,
    bins: int = DEFAULT_BINS,
    max_memory: int | None = None,
    providers: Sequence[str] | None = None,
    shard: Shard | None = None,
    progress: bool = True,
) -> Collection:
    """Histograms of ``tensors`` over every batch (of this shard), in bounded memory."""
    input_names = {v.name for v in model.graph.input}
    outputs = [t for t in tensors if t not in input_names]
    example, batches = peek(batches)
    groups = plan_groups(model, outputs, example, max_memory)
    if len(groups) > 1 and iter(batches) is batches:
        raise UserError(
            f"--max-memory splits calibration into {len(groups)} passes over the data, "
            "but the data can be read only once",
            "pass a file or folder (or a loader whose load_data() can be called again)",
        )
    histograms = {name: Histogram.empty(bins) for name in tensors}
    total_batches = _len_or_none(batches)
    num_batches = num_samples = 0
    with tqdm(
        total=None if total_batches is None else total_batches * max(len(groups), 1),
        unit="batch",
        desc="calibrating",
        disable=None if progress else True,  # None: off when stderr is not a terminal
        leave=False,
    ) as bar:
        for group_index, group in enumerate(groups or [[]]):
            session = observing_session(model, group, providers) if group else None
            seen = observe(
                model,
                session,
                group,
                batches,
                histograms,
                first_pass=group_index == 0,
                shard=shard,
                bar=bar,
            )
            if group_index == 0:
                num_batches, num_samples = seen
    if num_batches == 0:
        raise UserError("no calibration batches were read", "check the data source and --shard")
    log.info(
        "calibrated %d tensors on %d samples (%d batches, %d pass%s)",
        len(tensors),
        num_samples,
        num_batches,
        max(len(groups), 1),
        "" if len(groups) <= 1 else "es",
    )
    return Collection(histograms, num_batches, num_samples, max(len(groups), 1))


def observe(
    model: onnx.ModelProto,
    session: ort.InferenceSession | None,
    group: Sequence[str],
    batches: Iterable[Batch],
    histograms: Mapping[str, Histogram],
    *,
    first_pass: bool,
    shard: Shard | None = None,
    bar: tqdm | None = None,
) -> tuple[int, int]:
    """One pass over ``batches``: fold ``group``'s activations into ``histograms``.

    ``session`` (from :func:`observing_session`) outputs exactly ``group``. The first pass
    over the data also folds the model inputs among ``histograms`` and counts what it read:
    it returns (batches, samples) of this shard, (0, 0) on later passes. One function for
    the single process and for Ray workers (:mod:`trtq.calib.ray_worker`), so both fold
    the same values the same way.
    """
    input_names = {v.name for v in model.graph.input} & histograms.keys()
    inputs = model_inputs(model)
    num_batches = num_samples = 0
    for batch_index, batch in enumerate(batches):
        if bar is not None:
            bar.update(1)
        if shard and not shard.owns(batch_index):
            continue
        if first_pass:
            num_batches += 1
            num_samples += samples_in(batch, inputs)
            for name in input_names:
                histograms[name].update(batch[name])
        if session is not None:
            feeds = {name: batch[name] for name in _session_inputs(session)}
            for name, value in zip(group, session.run(group, feeds), strict=True):
                histograms[name].update(value)
    return num_batches, num_samples


def plan_groups(
    model: onnx.ModelProto,
    tensors: Sequence[str],
    example: Batch | None,
    max_memory: int | None,
) -> list[list[str]]:
    """Split ``tensors`` so that one batch's activations of each group fit ``max_memory``.

    Sizes come from shape inference, with symbolic dims (batch, sequence
    length…) resolved from an example batch; a dim that cannot be resolved counts
    as 1 and is logged. No budget: one group.
    """
    if not tensors:
        return []
    if max_memory is None:
        return [list(tensors)]
    shapes = Shapes(model, example=example)
    sizes = {name: shapes.nbytes(name) for name in tensors}
    groups: list[list[str]] = [[]]
    used = 0
    for name in tensors:
        size = sizes[name]
        if size > max_memory:
            log.warning(
                "tensor %s alone needs ~%d MiB per batch, over --max-memory", name, size >> 20
            )
        if groups[-1] and used + size > max_memory:
            groups.append([])
            used = 0
        groups[-1].append(name)
        used += size
    log.info(
        "--max-memory: %d tensors in %d groups (one pass over the data each)",
        len(tensors),
        len(groups),
    )
    return groups


def observe_shapes(
    model: onnx.ModelProto,
    tensors: Sequence[str],
    example: Batch,
    providers: Sequence[str] | None = None,
) -> dict[str, tuple[int, ...]]:
    """Shapes of ``tensors`` on one sample of ``example``: what shape inference could not say.

    Exporters compute reshapes from run-time shapes, which shape inference leaves
    symbolic, so MACs (and coverage) would otherwise count those dims as 1. Dims
    that scale with the batch are divided back to one sample.
    """
    graph_inputs = {v.name for v in model.graph.input}
    outputs = [t for t in dict.fromkeys(tensors) if t and t not in graph_inputs]
    if not outputs:
        return {}
    session = observing_session(model, outputs, providers)
    feeds = first_samples({name: example[name] for name in _session_inputs(session)}, 1, model)
    values = session.run(outputs, feeds)
    return {n: tuple(int(d) for d in np.shape(v)) for n, v in zip(outputs, values, strict=True)}


def batch_size(batch: Batch, model: onnx.ModelProto) -> int:
    """Samples in one call of ``model``: its inputs' shared dim 0, or 1 for a whole feed.

    A whole feed (inputs without a shared batch axis, such as a sequence and its recurrent
    state: :mod:`trtq.calib.data.feeds`) is one model call and counts as one sample.
    """
    return samples_in(batch, model_inputs(model))


def first_samples(batch: Batch, keep: int, model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """The first ``keep`` samples of every batch-major input; other inputs as they are.

    An input is batch-major when the model leaves its leading dim free and the data's
    leading dim is the batch size (a recurrent state ``[2, batch, 128]``, a scalar
    setting or a fixed-length sequence is not). A whole feed is one sample: it is
    returned as it is.
    """
    inputs = model_inputs(model)
    if is_whole_feed(batch, inputs):
        return dict(batch)
    samples = samples_in(batch, inputs)
    free = {
        v.name
        for v in model.graph.input
        if v.type.tensor_type.shape.dim
        and not v.type.tensor_type.shape.dim[0].HasField("dim_value")
    }
    return {
        name: array[:keep] if name in free and len(array) == samples else array
        for name, array in batch.items()
    }


def observing_session(
    model: onnx.ModelProto,
    outputs: Sequence[str],
    providers: Sequence[str] | None,
    *,
    threads: int | None = None,
) -> ort.InferenceSession:
    """An ONNX Runtime session whose graph outputs are exactly ``outputs``.

    ``threads`` caps ONNX Runtime's intra-op threads (a Ray worker uses the CPUs it
    reserved); the values observed do not depend on it.
    """
    exposed = onnx.ModelProto()
    exposed.CopyFrom(model)
    types = {v.name: v.type for v in (*model.graph.value_info, *model.graph.output)}
    del exposed.graph.output[:]
    for name in outputs:
        value = onnx.ValueInfoProto(name=name)
        if name in types:
            value.type.CopyFrom(types[name])
        else:
            value.type.tensor_type.elem_type = onnx.TensorProto.FLOAT
        exposed.graph.output.append(value)
    # Calibration observes the FP32 graph: full optimisations, and memory given back.
    return open_session(exposed, providers, fake_quant=False, memory_arena=False, threads=threads)


def _session_inputs(session: ort.InferenceSession) -> list[str]:
    return [i.name for i in session.get_inputs()]


def _len_or_none(batches: Iterable[Batch]) -> int | None:
    try:
        return len(batches)  # type: ignore[arg-type]
    except TypeError:
        return None
