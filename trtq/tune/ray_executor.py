"""Node evaluations on a Ray cluster (``trtq sensitivity --ray``, ``quantize --target-* --ray``).

An executor of :mod:`trtq.tune.evaluate` (``map`` and ``close``), like its local process
pool: one actor per CPU of the cluster (:mod:`trtq.ray_cluster`), each building one
:class:`~trtq.tune.evaluate.Evaluator` from the job, and one task per configuration. The
job (the model, the plan and its ranges, the evaluation batches and their FP32 outputs)
is put in Ray's object store once and fetched once per worker; a task carries only its
configuration, a set of node names. Actors rather than tasks for the same reason as in
calibration: the evaluator holds the job and the FP32 references, built once per worker,
not once per configuration.

Scores come back in the order the configurations were given, whatever order the workers
finish in, so the sensitivity table and every fallback step are those of the local
executors. A worker killed mid-evaluation is restarted and the evaluation retried.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from trtq.errors import UserError
from trtq.ray_cluster import Failure, RayCluster, WorkerInfo
from trtq.report.compare import ComparisonReport
from trtq.tune.evaluate import Configuration, Evaluator, Job


class EvaluationWorker:
    """A Ray actor (wrapped with ``ray.remote`` by :class:`RayExecutor`) that scores
    configurations of one job."""

    def __init__(self, threads: int) -> None:
        self._threads = threads
        self._evaluator: Evaluator | None = None

    def hello(self) -> WorkerInfo:
        return WorkerInfo.here()

    def score(
        self, job: Sequence[Any], configuration: Configuration, ranking: bool = False
    ) -> ComparisonReport | Failure:
        """The score of ``configuration`` (a ranking run if ``ranking``); ``job`` holds the
        job's object reference (in a list, so that Ray hands over the reference and the
        worker fetches the job once)."""
        try:
            if self._evaluator is None:
                import ray

                self._evaluator = Evaluator(
                    dataclasses.replace(ray.get(job[0]), threads=self._threads)
                )
            return self._evaluator(configuration, ranking)
        except UserError as error:
            return Failure.of(error)


class RayExecutor:
    """Configurations of ``job`` scored on the Ray cluster at ``address`` (None: local)."""

    def __init__(self, job: Job, address: str | None) -> None:
        self._cluster = RayCluster(address)
        try:
            self._job = [self._cluster.ray.put(job)]
            self._cluster.start(EvaluationWorker, None)
        except BaseException:
            self._cluster.close()
            raise

    def map(
        self, configurations: Sequence[Configuration], ranking: bool = False
    ) -> Iterator[ComparisonReport]:
        """The scores of ``configurations``, in their order (ranking runs if ``ranking``)."""
        tasks = ((index, self._score(c, ranking)) for index, c in enumerate(configurations))
        waiting: dict[int, ComparisonReport] = {}
        ready = 0
        for index, score in self._cluster.run(tasks):
            waiting[index] = score
            while ready in waiting:
                yield waiting.pop(ready)
                ready += 1

    def _score(self, configuration: Configuration, ranking: bool) -> Callable[[Any], Any]:
        return lambda actor: actor.score.remote(self._job, configuration, ranking)

    def close(self) -> None:
        self._cluster.close()
