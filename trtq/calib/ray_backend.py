"""Calibration on a Ray cluster (``--ray [ADDRESS]``): shards on workers, one exact merge.

:class:`RayCalibration` takes the place of :func:`trtq.calib.collect.collect` (same
arguments, same :class:`~trtq.calib.collect.Collection`), so ``trtq calibrate`` and
``trtq quantize`` choose tensors, ranges and outputs exactly as without Ray; only where
the activations are observed changes. The result is bit-identical to the single process:

* the data is planned once, on the driver, into the batches the single process reads;
  shards are runs of consecutive batches (cut where a file starts when one is near, so a
  file is read by one worker; a single file is cut into batch ranges);
* the tensors are split into the same ``--max-memory`` groups, planned on the driver from
  the same first batch, so every worker runs the graph the single process runs;
* each shard's histograms come back in trtq's exact-merge form and are merged in shard
  order (:mod:`trtq.calib.histogram`: bins, counts, min and max merge exactly).

**Why actors, not tasks or Ray Data.** The costly part of a shard is not reading it but
what comes before: the model (fetched from the object store and parsed) and its ONNX
Runtime session (graph optimisation, kernel selection). An actor builds them once and
reuses them for every shard it is given; a task would rebuild them per shard. Ray Data
would move the batches through the object store, while workers here read their files
from shared storage themselves: only paths travel, and the model travels once per worker
(``ray.put`` once). Actors still get Ray's fault tolerance: an actor that dies (a crashed
or killed process, a lost node) is restarted (``max_restarts``) and its unfinished shards
are retried (``max_task_retries``), and the driver checks that the shards add up to
every batch and sample of the data, so nothing is dropped silently.

Batches travel only when there is no path to read: a Python loader script (``.py``) or
batches handed over in Python. The driver then reads them and ships a few batches per
task, at most two tasks per worker at a time.

Errors are one line (:class:`~trtq.errors.UserError`, exit 2) and come before anything is
written: a cluster that cannot be reached, a worker that cannot open the data or sees
other data than the driver, a worker with another trtq or ONNX Runtime (checked when the
workers start), a worker that dies more often than the retries allow.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import onnx
from tqdm import tqdm

from trtq import proto
from trtq.calib.collect import Batch, Collection, Collector, Shard, peek, plan_groups
from trtq.calib.data import BatchSource, DataRequest
from trtq.calib.data.feeds import samples_in
from trtq.calib.histogram import DEFAULT_BINS, Histogram
from trtq.calib.ray_worker import CalibrationWorker, Pass, ShardResult
from trtq.errors import DataError, UserError
from trtq.graph.load import model_inputs
from trtq.ray_cluster import Failure, RayCluster, address_of

log = logging.getLogger(__name__)

#: Shards per worker: smaller shards balance the load and lose less work to a failure.
SHARDS_PER_WORKER = 4
#: Batches per task when batches travel (loader scripts, batches given in Python).
SHIPPED_BATCHES = 4


def collector_for(ray: str | bool | None) -> AbstractContextManager[Collector | None]:
    """What observes the activations for the API's ``ray`` argument, as a context.

    None or False: this process (the context gives None); True: a local Ray instance (or
    ``RAY_ADDRESS``); a string: that address (:func:`trtq.ray_cluster.parse_address`).
    """
    if ray is None or ray is False:
        return nullcontext(None)
    return RayCalibration(address_of(ray))


class RayCalibration:
    """:func:`~trtq.calib.collect.collect` on a Ray cluster; a context manager.

    ``address`` is Ray's (None: a local instance, or ``RAY_ADDRESS``). Batches read from
    a path (a :class:`BatchSource` with a request) are sharded by path: the workers open
    the path themselves; any other batches travel. The cluster is contacted on the first
    call, so a run that needs no calibration (ranges from ``--stats``) never connects;
    leaving the context stops the workers, and disconnects if the connection was made here.
    """

    def __init__(self, address: str | None = None) -> None:
        self._cluster = RayCluster(address)
        self._source: BatchSource | None = None
        #: Peak resident memory of each worker seen ("host:pid" -> bytes).
        self.worker_peaks: dict[str, int] = {}

    def __enter__(self) -> RayCalibration:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._cluster.close()

    def __call__(
        self, model: onnx.ModelProto, tensors: Sequence[str], batches: Iterable[Batch], **options
    ) -> Collection:
        """Histograms of ``tensors`` over all the data, observed by the Ray workers.

        Takes :func:`trtq.calib.collect.collect`'s options (see :meth:`_collect`). The
        workers are stopped when it returns: their CPUs go back to the cluster (node
        evaluations of ``--target-*`` and ``trtq sensitivity`` start their own workers).
        """
        try:
            return self._collect(model, tensors, batches, **options)
        finally:
            self._cluster.stop_workers()

    def _collect(
        self,
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
        """:meth:`__call__`, leaving the workers running (the caller stops them)."""
        if shard is not None:
            raise UserError("--shard with --ray", "drop --shard: Ray shards the data itself")
        input_names = {v.name for v in model.graph.input}
        outputs = [t for t in tensors if t not in input_names]
        by_path = isinstance(batches, BatchSource) and batches.request is not None
        self._source = batches if by_path else None
        if self._source is not None:
            example = next(self._source.between(0, 1), None)
        else:
            example, batches = peek(batches)
        groups = plan_groups(model, outputs, example, max_memory)
        if len(groups) > 1 and self._source is None and iter(batches) is batches:
            raise UserError(
                f"--max-memory splits calibration into {len(groups)} passes over the data, "
                "but the data can be read only once",
                "pass a file or folder (or a loader whose load_data() can be called again)",
            )
        serialized = proto.serialized(model)
        if serialized is None:
            raise UserError(
                "--ray ships the model to the workers in one piece, and this one is over 2 GB",
                "calibrate without --ray, or run --shard K/N on each machine and --merge",
            )
        ray = self._cluster.ray
        key = hashlib.sha256(serialized).hexdigest()[:16]
        given_inputs = tuple(t for t in tensors if t in input_names)
        passes = [
            Pass(
                key,
                tuple(group),
                (*group, *(given_inputs if i == 0 else ())),
                bins,
                _tuple(providers),
            )
            for i, group in enumerate(groups or [[]])
        ]
        model_ref = [ray.put(serialized)]  # in a list: workers get the reference, fetch once
        histograms = {name: Histogram.empty(bins) for name in tensors}
        merge = _OrderedMerge(histograms, len(passes))
        shipped = None
        if self._source is not None:
            total = self._source.num_samples * len(passes)
            shards = self._plan(self._source)
            tasks = self._shard_tasks(passes, model_ref, shards)
            what = self._source.description
            log.info("Ray: %d shards of %s, read by the workers from its path", len(shards), what)
        else:
            total = None
            self._start_workers(None)
            shipped = _Shipped(batches, model)
            tasks = shipped.tasks(passes, model_ref)
            what = getattr(batches, "description", "the batches given")
            log.info("Ray: %s has no path for the workers to read: its batches travel", what)
        with tqdm(
            total=total,
            unit="sample",
            desc=f"calibrating on {len(self._cluster.actors)} Ray workers",
            disable=None if progress else True,  # None: off when stderr is not a terminal
            leave=False,
        ) as bar:
            for (pass_index, position), result in self._cluster.run(tasks):
                merge.add(pass_index, position, result)
                self._note(result)
                bar.update(result.num_samples)
        counts = merge.finish()
        if shipped is None:
            expected = [(self._source.num_batches, self._source.num_samples)] * len(passes)
        else:
            expected = shipped.counts
        _check_counts(counts, expected, what)
        num_batches, num_samples = counts[0]
        if num_batches == 0:
            raise UserError("no calibration batches were read", "check the data source")
        log.info(
            "calibrated %d tensors on %d samples (%d batches, %d pass%s) on %d Ray workers; "
            "peak RSS per worker %s",
            len(tensors),
            num_samples,
            num_batches,
            len(passes),
            "" if len(passes) == 1 else "es",
            len(self._cluster.actors),
            _peaks(self.worker_peaks),
        )
        return Collection(histograms, num_batches, num_samples, len(passes))

    def _plan(self, source: BatchSource) -> list[tuple[int, int]]:
        assert source.num_batches is not None
        self._start_workers(source.num_batches)
        count = min(source.num_batches, len(self._cluster.actors) * SHARDS_PER_WORKER)
        return plan_shards(source.num_batches, count, source.file_starts)

    def _start_workers(self, most: int | None) -> None:
        """Start the workers once; each opens the data, and must see what the driver sees."""
        if self._cluster.actors:
            return
        request = self._source.request if self._source is not None else None
        for info in self._cluster.start(CalibrationWorker, most, hello=(request,)):
            if isinstance(info, Failure):
                # The driver opened it: the worker's storage differs, not the data's format.
                raise DataError(
                    f"a Ray worker on {info.host} cannot open the calibration data: {info.problem}",
                    "workers read the data themselves: put it where every node sees it at "
                    "the same path",
                )
            source = self._source
            if source is not None and info.data != (source.num_batches, source.num_samples):
                raise DataError(
                    f"the Ray worker on {info.host} sees {info.data[1]} samples in "
                    f"{info.data[0]} batches at {request.path}, this machine "
                    f"{source.num_samples} in {source.num_batches}",
                    "workers must read the same files as the driver (one shared storage)",
                )

    def _shard_tasks(
        self, passes: list[Pass], model_ref: list[Any], shards: list[tuple[int, int]]
    ) -> Iterator[tuple[tuple[int, int], Callable[[Any], Any]]]:
        """Pass by pass (a worker changes session once per pass), shard by shard."""
        assert self._source is not None and self._source.request is not None
        request = self._source.request
        for pass_index, work in enumerate(passes):
            for position, (start, stop) in enumerate(shards):
                yield (pass_index, position), _call(work, model_ref, (request, start, stop), None)

    def _note(self, result: ShardResult) -> None:
        worker = f"{result.host}:{result.pid}"
        self.worker_peaks[worker] = max(self.worker_peaks.get(worker, 0), result.peak_rss)


def plan_shards(num_batches: int, count: int, file_starts: Sequence[int]) -> list[tuple[int, int]]:
    """``count`` runs of consecutive batches ``(start, stop)`` covering ``num_batches``.

    Runs are as even as possible; a cut moves to the nearest batch that starts a file when
    one lies within half a run, so that a file is read by one worker (a single large file
    is cut into batch ranges instead).
    """
    count = max(1, min(count, num_batches))
    starts = sorted(set(file_starts))
    half = num_batches / count / 2
    cuts = [0]
    for k in range(1, count):
        ideal = round(k * num_batches / count)
        near = min(starts, key=lambda s: (abs(s - ideal), s), default=ideal)
        cut = near if abs(near - ideal) <= half else ideal
        if cuts[-1] < cut < num_batches:
            cuts.append(cut)
    cuts.append(num_batches)
    return list(itertools.pairwise(cuts))


class _OrderedMerge:
    """Merges shard results into ``histograms`` in shard order, as they become available.

    The merge is exact in any order but for one detail: ``min``/``max`` keep the first of
    equal values (0.0 and -0.0), so shards are merged in the order of the data, as the
    single process folds its batches; results that arrive early wait for their turn.
    """

    def __init__(self, histograms: dict[str, Histogram], passes: int) -> None:
        self._histograms = histograms
        self._next = [0] * passes
        self._waiting: list[dict[int, ShardResult]] = [{} for _ in range(passes)]
        self._counts = [[0, 0] for _ in range(passes)]

    def add(self, pass_index: int, position: int, result: ShardResult) -> None:
        waiting = self._waiting[pass_index]
        waiting[position] = result
        while self._next[pass_index] in waiting:
            ready = waiting.pop(self._next[pass_index])
            for name, part in ready.histograms.items():
                self._histograms[name] = self._histograms[name].merge(part)
            self._counts[pass_index][0] += ready.num_batches
            self._counts[pass_index][1] += ready.num_samples
            self._next[pass_index] += 1

    def finish(self) -> list[tuple[int, int]]:
        """(batches, samples) merged per pass; every result must have been merged."""
        if any(self._waiting):
            raise RuntimeError("a shard result was never merged: a shard is missing")
        return [(batches, samples) for batches, samples in self._counts]


class _Shipped:
    """Batches that travel: read on the driver, a few per task (loader scripts, Python)."""

    def __init__(self, batches: Iterable[Batch], model: onnx.ModelProto) -> None:
        self._batches = batches
        self._inputs = model_inputs(model)
        #: (batches, samples) shipped per pass.
        self.counts: list[tuple[int, int]] = []

    def tasks(
        self, passes: list[Pass], model_ref: list[Any]
    ) -> Iterator[tuple[tuple[int, int], Callable[[Any], Any]]]:
        for pass_index, work in enumerate(passes):
            shipped = [0, 0]
            chunk: list[Batch] = []
            position = 0
            for batch in self._batches:
                chunk.append(batch)
                shipped[0] += 1
                shipped[1] += samples_in(batch, self._inputs)
                if len(chunk) == SHIPPED_BATCHES:
                    yield (pass_index, position), _call(work, model_ref, None, chunk)
                    chunk, position = [], position + 1
            if chunk:
                yield (pass_index, position), _call(work, model_ref, None, chunk)
            self.counts.append((shipped[0], shipped[1]))


def _call(
    work: Pass,
    model_ref: list[Any],
    shard: tuple[DataRequest, int, int] | None,
    batches: list[Batch] | None,
) -> Callable[[Any], Any]:
    return lambda actor: actor.observe.remote(work, model_ref, shard, batches)


def _check_counts(
    counts: list[tuple[int, int]], expected: Sequence[tuple[int | None, int | None]], what: str
) -> None:
    """Every pass read every batch and sample of the data: nothing was dropped or doubled."""
    for index, (got, want) in enumerate(zip(counts, expected, strict=True)):
        if tuple(got) != tuple(want):
            raise DataError(
                f"the Ray workers read {got[1]} samples in {got[0]} batches on pass {index + 1}, "
                f"but {what} holds {want[1]} in {want[0]}",
                "check that every node sees the same files, unchanged while calibrating",
            )


def _tuple(values: Sequence[str] | None) -> tuple[str, ...] | None:
    return None if values is None else tuple(values)


def _peaks(peaks: dict[str, int]) -> str:
    if not peaks:
        return "unknown"
    low, high = min(peaks.values()) >> 20, max(peaks.values()) >> 20
    return f"{low} MiB" if low == high else f"{low}-{high} MiB"
