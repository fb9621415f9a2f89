"""TensorRT 10's implicit INT8 calibrators: fed by trtq's data through pycuda, or from a cache.

TensorRT 11 removed calibrators; there trtq calibrates itself and puts Q/DQ in
the graph. On TensorRT 10 a user may still want TensorRT's own entropy
calibration (``trtq build --calib-mode trt``). The calibrator class must
derive from the real ``trt.IInt8EntropyCalibrator2`` (or MinMax), which only
exists once tensorrt is imported, so it is created by :func:`make_calibrator`
(streaming data) or :func:`cache_calibrator` (serving a cache, no data, no GPU
buffers).

Batches stream through :class:`trtq.cuda.memory.BatchStreamer` (pinned
staging, two batches in flight); the cache is read and written with
:mod:`trtq.calib.cache`, so a cache written by ``trtq calibrate --cache`` is
accepted here and a cache TensorRT writes is readable by trtq.

TensorRT calibrates at one shape (the calibration profile's; ``get_batch_size``
is asked once) and reads that many bytes from every pointer ``get_batch`` returns,
so a batch of any other shape would be read past its end or in part. Only batches of
exactly that shape reach TensorRT (:class:`ProfileBatches`): data batches of another
size are regrouped into it, and the samples left over at the end, fewer than one
batch, are dropped (padding them would calibrate on made-up samples), which is logged
with the counts.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from trtq.calib.cache import TrtCache
from trtq.trt import compat

log = logging.getLogger(__name__)


def make_calibrator(
    trt,
    batches: Iterable[Mapping[str, np.ndarray]],
    *,
    cache_path: str | Path | None,
    algorithm: str = "entropy",
    driver=None,
    shapes: Mapping[str, tuple[int, ...]] | None = None,
):
    """A calibrator instance for ``config.int8_calibrator`` on TensorRT 10.

    ``driver`` is ``pycuda.driver`` (imported lazily when None). With a cache
    file that already exists, TensorRT reads it and never asks for a batch.
    ``shapes`` are the calibration profile's shapes (its ``opt``); inputs it does not
    name keep the shape of the first batch (see :class:`ProfileBatches`).
    """
    base = compat.calibrator_base(trt, algorithm)
    if driver is None:
        from trtq.cuda.memory import import_pycuda

        driver = import_pycuda()
    return _calibrator_class(base)(ProfileBatches(batches, shapes), cache_path, driver)


def streaming_calibrator(
    trt: ModuleType,
    batches: Iterable[Mapping[str, np.ndarray]],
    cache_path: Path | None,
    algorithm: str,
    shapes: Mapping[str, tuple[int, ...]] | None = None,
) -> Any:
    """TensorRT's own calibrator fed by trtq's data through pycuda (needs ``trtq[gpu]``).

    :func:`make_calibrator` with the signature the build pipeline's
    ``streaming_factory`` has.
    """
    return make_calibrator(trt, batches, cache_path=cache_path, algorithm=algorithm, shapes=shapes)


Shape = tuple[int, ...]


class ProfileBatches:
    """``batches`` regrouped into batches of exactly the calibration shape, for TensorRT.

    The calibration shape is ``shapes`` where given, else the first batch's. Batches of
    that shape pass unchanged; batches whose inputs share a leading (batch) dim and
    otherwise fit are regrouped along it into full batches; what is left at the end,
    fewer samples than one batch, is dropped; a batch that cannot fit (other trailing
    dims, other inputs, no shared batch dim) is dropped whole. The counts are logged
    when the data ends: :attr:`sent` batches, :attr:`dropped_tail` samples,
    :attr:`dropped_batches` and :attr:`dropped_samples` for misfits.
    """

    def __init__(
        self, batches: Iterable[Mapping[str, np.ndarray]], shapes: Mapping[str, Shape] | None
    ) -> None:
        self._batches = batches
        self._shapes = {
            name: tuple(int(d) for d in shape) for name, shape in (shapes or {}).items()
        }
        self.sent = 0
        self.dropped_tail = 0
        self.dropped_batches = 0
        self.dropped_samples = 0
        self._misfit: str | None = None  # the first dropped batch's shapes, for the log

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        target: dict[str, Shape] | None = None
        pending: list[dict[str, np.ndarray]] = []
        for raw in self._batches:
            batch = {name: np.asarray(value) for name, value in raw.items()}
            if target is None:
                target = {name: a.shape for name, a in batch.items()} | self._shapes
            size = _batch_dim(target)
            if not pending and {n: a.shape for n, a in batch.items()} == target:
                self.sent += 1
                yield batch
            elif size is not None and _fits(batch, target):
                pending.append(batch)
                yield from self._full_batches(pending, size)
            else:
                self._drop(batch)
        self.dropped_tail = sum(_batch_dim(_shapes_of(b)) or 0 for b in pending)
        self._report(target)

    def _full_batches(
        self, pending: list[dict[str, np.ndarray]], size: int
    ) -> Iterator[dict[str, np.ndarray]]:
        """Every full batch in ``pending``, which keeps the rest (fewer than ``size``)."""
        if sum(_batch_dim(_shapes_of(b)) or 0 for b in pending) < size:
            return
        merged = {name: np.concatenate([b[name] for b in pending]) for name in pending[0]}
        pending.clear()
        rows = next(iter(merged.values())).shape[0]
        full = rows - rows % size
        for start in range(0, full, size):
            self.sent += 1
            yield {name: array[start : start + size] for name, array in merged.items()}
        if full < rows:
            pending.append({name: array[full:] for name, array in merged.items()})

    def _drop(self, batch: Mapping[str, np.ndarray]) -> None:
        self.dropped_batches += 1
        self.dropped_samples += _batch_dim(_shapes_of(batch)) or 1
        if self._misfit is None:
            self._misfit = _describe(_shapes_of(batch))

    def _report(self, target: Mapping[str, Shape] | None) -> None:
        if target is None:
            log.error("the calibration data holds no batch: TensorRT gets none")
            return
        shape = _describe(target)
        summary = f"TensorRT calibrates on {_count(self.sent, 'batch')} of {shape}"
        if self.dropped_tail:
            summary += (
                f"; the last {_count(self.dropped_tail, 'sample')}, fewer than a batch, "
                "dropped (TensorRT takes batches of the calibration shape only)"
            )
        log.info("%s", summary)
        if self.dropped_batches:
            regroup = "" if _batch_dim(target) else " (no shared batch dim to regroup by)"
            log.warning(
                "dropped %s (%s; the first: %s) that did not fit the calibration shape %s%s",
                _count(self.dropped_batches, "calibration batch"),
                _count(self.dropped_samples, "sample"),
                self._misfit,
                shape,
                regroup,
            )
        if not self.sent:
            log.error(
                "no calibration batch has the calibration shape %s: TensorRT gets none", shape
            )


def _shapes_of(batch: Mapping[str, np.ndarray]) -> dict[str, Shape]:
    return {name: tuple(array.shape) for name, array in batch.items()}


def _batch_dim(shapes: Mapping[str, Shape]) -> int | None:
    """The leading dim every input shares (the batch size), or None if there is none."""
    leading = {shape[0] if shape else None for shape in shapes.values()}
    return leading.pop() if len(leading) == 1 and None not in leading else None


def _fits(batch: Mapping[str, np.ndarray], target: Mapping[str, Shape]) -> bool:
    """Same inputs, a shared batch dim, and the target's dims after it."""
    shapes = _shapes_of(batch)
    return (
        shapes.keys() == target.keys()
        and _batch_dim(shapes) is not None
        and all(shapes[name][1:] == target[name][1:] for name in target)
    )


def _count(number: int, noun: str) -> str:
    plural = noun + ("es" if noun.endswith("ch") else "s")
    return f"{number} {noun if number == 1 else plural}"


def _describe(shapes: Mapping[str, Shape]) -> str:
    return ", ".join(f"{name} {'x'.join(map(str, s)) or 'scalar'}" for name, s in shapes.items())


def _calibrator_class(base: type) -> type:
    """Subclass the real TensorRT base class (known only at run time)."""

    class Calibrator(base):
        """Streams trtq batches to TensorRT; reads and writes TensorRT's cache format."""

        def __init__(self, batches, cache_path, driver) -> None:
            base.__init__(self)  # the bindings require the base initialiser to run
            self._batches = batches
            self._driver = driver
            self._streamer = None
            self.cache_path = Path(cache_path) if cache_path else None

        def _stream(self):
            if self._streamer is None:
                from trtq.cuda.memory import BatchStreamer

                self._streamer = BatchStreamer(self._batches, self._driver)
            return self._streamer

        def get_batch_size(self) -> int:
            shapes = self._stream().current_shapes()
            return int(next(iter(shapes.values()))[0]) if shapes else 1

        def get_batch(self, names, *args):  # TensorRT passes (names) or (names, p_str)
            pointers = self._stream().next_pointers(list(names))
            if pointers is None:
                log.info("calibration data exhausted after %d batches", self._stream().batches_sent)
            return pointers

        def read_calibration_cache(self):
            if self.cache_path is None or not self.cache_path.exists():
                return None
            cache = TrtCache.read(self.cache_path)  # validates: a corrupt file is a clear error
            log.info("TensorRT reads %s (%d tensors)", self.cache_path, len(cache.scales))
            return cache.to_text().encode()

        def write_calibration_cache(self, cache) -> None:
            if self.cache_path is None:
                return
            text = bytes(cache).decode("utf-8")
            # TensorRT's own ranges, saved for it as it wrote them (0 for an all-zero tensor);
            # trtq validates them when it reads the file later.
            source = "TensorRT's calibration cache"
            TrtCache.parse(text, source, check_ranges=False).write(self.cache_path)
            log.info("wrote TensorRT's calibration cache to %s", self.cache_path)

        def close(self) -> None:
            if self._streamer is not None:
                self._streamer.close()

    return Calibrator


def cache_calibrator(trt: ModuleType, cache_path: str | Path, algorithm: str = "entropy") -> Any:
    """A TensorRT 10 INT8 calibrator that serves an existing calibration cache and no data.

    TensorRT asks the calibrator for its cache first and calibrates only when
    there is none; this one always has one (written by ``trtq calibrate
    --cache``), so no batch is ever needed and no GPU buffers are involved.
    """
    base = compat.calibrator_base(trt, algorithm)
    text = Path(cache_path).read_bytes()

    class CacheCalibrator(base):
        """Serves ``cache_path`` to TensorRT; answers "no data" if TensorRT rejects it."""

        def __init__(self) -> None:
            base.__init__(self)  # the bindings need the base initialiser to run
            self.cache_path = Path(cache_path)

        def get_batch_size(self) -> int:
            return 1

        def get_batch(self, names, *args):  # TensorRT passes (names) or (names, p_str)
            log.error("TensorRT did not accept the calibration cache %s", self.cache_path)
            return None

        def read_calibration_cache(self) -> bytes:
            return text

        def write_calibration_cache(self, cache) -> None:
            return None

    return CacheCalibrator()
