"""TensorRT 10's implicit INT8 calibrators, fed by trtq's data sources through pycuda.

TensorRT 11 removed calibrators; there trtq calibrates itself and puts Q/DQ in
the graph. On TensorRT 10 a user may still want TensorRT's own entropy
calibration (``trtq build --calib-mode trt``). The calibrator class must
derive from the real ``trt.IInt8EntropyCalibrator2`` (or MinMax), which only
exists once tensorrt is imported, so it is created by :func:`make_calibrator`.

Batches stream through :class:`trtq.cuda.memory.BatchStreamer` (pinned
staging, two batches in flight); the cache is read and written with
:mod:`trtq.calib.cache`, so a cache written by ``trtq calibrate --cache`` is
accepted here and a cache TensorRT writes is readable by trtq.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np

from trtq.calib.cache import TrtCache

log = logging.getLogger(__name__)


def make_calibrator(
    trt,
    batches: Iterable[Mapping[str, np.ndarray]],
    *,
    cache_path: str | Path | None,
    algorithm: str = "entropy",
    driver=None,
):
    """A calibrator instance for ``config.int8_calibrator`` on TensorRT 10.

    ``driver`` is ``pycuda.driver`` (imported lazily when None). With a cache
    file that already exists, TensorRT reads it and never asks for a batch.
    """
    from trtq.trt.compat import calibrator_base

    base = calibrator_base(trt, algorithm)
    if driver is None:
        from trtq.cuda.memory import import_pycuda

        driver = import_pycuda()
    return _calibrator_class(base)(batches, cache_path, driver)


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
            TrtCache.parse(text, "TensorRT's calibration cache").write(self.cache_path)
            log.info("wrote TensorRT's calibration cache to %s", self.cache_path)

        def close(self) -> None:
            if self._streamer is not None:
                self._streamer.close()

    return Calibrator
