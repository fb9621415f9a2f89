"""What a Ray worker runs for ``--ray``: one calibration actor per reserved CPU.

The driver (:mod:`trtq.calib.ray_backend`) starts the actors and hands them passes over
shards of the data; this module is everything that runs on the other side, and it does
not import ``ray`` at module level, so ``import trtq`` stays light. An actor keeps,
across the shards it is given:

* the data, opened once from its path (headers only: files are read shard by shard);
* the model of the current calibration, fetched once from Ray's object store;
* one ONNX Runtime session, for the current group of observed tensors.

Each pass folds activations with :func:`trtq.calib.collect.observe`, the very function
the single process runs, and returns the shard's histograms as they are: trtq's
histograms merge exactly (:mod:`trtq.calib.histogram`), so the driver's merge of the
shards is, bit for bit, the single process's histogram. A mistake (data the worker cannot
open, data that does not fit the model) comes back as a
:class:`~trtq.ray_cluster.Failure`, one line the driver raises; anything else is raised,
and Ray reports it to the driver as a bug.
"""

from __future__ import annotations

import os
import resource
import socket
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import onnx

from trtq.calib.collect import Batch, observe, observing_session
from trtq.calib.data import BatchSource, DataRequest
from trtq.calib.histogram import Histogram
from trtq.errors import UserError
from trtq.ray_cluster import Failure, WorkerInfo


@dataclass(frozen=True)
class Pass:
    """One pass over a shard: the model (by key), the session's outputs, what to fill.

    ``tensors`` are the histograms the pass fills: ``outputs`` and, on the first pass over
    the data, the model inputs among the observed tensors.
    """

    model_key: str
    outputs: tuple[str, ...]
    tensors: tuple[str, ...]
    bins: int
    providers: tuple[str, ...] | None


@dataclass(frozen=True)
class ShardResult:
    """A shard's histograms (trtq's exact-merge form) and what the worker read for them."""

    histograms: dict[str, Histogram]
    num_batches: int
    num_samples: int
    host: str
    pid: int
    peak_rss: int


def peak_rss() -> int:
    """This process's peak resident memory in bytes (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class CalibrationWorker:
    """A Ray actor (the driver wraps it with ``ray.remote``) that calibrates shards."""

    def __init__(self, threads: int) -> None:
        self._threads = threads
        self._request: DataRequest | None = None
        self._source: BatchSource | None = None
        self._model_key: str | None = None
        self._model: onnx.ModelProto | None = None
        self._session_key: tuple[Any, ...] | None = None
        self._session: Any = None

    def hello(self, request: DataRequest | None) -> WorkerInfo | Failure:
        """Versions, and the data opened (a path this worker cannot read fails here): its
        (batches, samples), which must be the driver's."""
        try:
            source = None if request is None else self._data(request)
        except UserError as error:
            return Failure.of(error)
        return WorkerInfo.here(None if source is None else (source.num_batches, source.num_samples))

    def observe(
        self,
        work: Pass,
        model: Sequence[Any],
        shard: tuple[DataRequest, int, int] | None,
        batches: list[Batch] | None,
    ) -> ShardResult | Failure:
        """Fill ``work.tensors`` from ``shard`` (batches ``start:stop`` of the data a request
        opens), or from ``batches``.

        ``model`` holds the object reference of the serialized model, wrapped in a list so
        that Ray hands over the reference, not the bytes: a worker fetches a model once.
        """
        try:
            graph = self._fetch_model(work.model_key, model[0])
            session = self._session_for(graph, work)
            if shard is not None:
                request, start, stop = shard
                data: Iterable[Batch] = self._data(request).between(start, stop)
            else:
                data = batches or []
            histograms = {name: Histogram.empty(work.bins) for name in work.tensors}
            # A "first pass" here: count what is read. Model inputs are folded only when
            # the driver asks for them (on the data's first pass), as in the single process.
            num_batches, num_samples = observe(
                graph, session, work.outputs, data, histograms, first_pass=True
            )
        except UserError as error:
            return Failure.of(error)
        return ShardResult(
            histograms, num_batches, num_samples, socket.gethostname(), os.getpid(), peak_rss()
        )

    def _data(self, request: DataRequest) -> BatchSource:
        """The data ``request`` opens, opened once (headers: files are read shard by shard)."""
        if request != self._request or self._source is None:
            self._source = None
            self._source = request.open()
            self._request = request
        return self._source

    def _fetch_model(self, key: str, reference: Any) -> onnx.ModelProto:
        if key != self._model_key:
            import ray

            self._model = self._session = self._session_key = None  # free the old one first
            self._model = onnx.load_from_string(ray.get(reference))
            self._model_key = key
        assert self._model is not None
        return self._model

    def _session_for(self, model: onnx.ModelProto, work: Pass) -> Any:
        """The session whose outputs are ``work.outputs``; one at a time, rebuilt on change."""
        if not work.outputs:
            return None
        key = (work.model_key, work.outputs, work.providers)
        if key != self._session_key:
            self._session = None  # one session's memory at a time
            self._session = observing_session(
                model, list(work.outputs), work.providers, threads=self._threads
            )
            self._session_key = key
        return self._session
