"""trtq on a Ray cluster: connecting, starting checked workers, running their tasks.

What calibration (:mod:`trtq.calib.ray_backend`) and node evaluations
(:mod:`trtq.tune.ray_executor`) share. Both run *actors*: a worker process that builds
its costly state once (a model and its ONNX Runtime session, or an evaluator holding
the evaluation data) and then serves many small tasks. Each actor reserves
:data:`CPUS_PER_WORKER` CPU and runs ONNX Runtime with that many threads, so workers
side by side do not fight over the cores. An actor that dies (a crashed or killed
process, a lost node) is restarted and its unfinished tasks retried, :data:`RETRIES`
times (Ray's ``max_restarts`` and ``max_task_retries``).

Nothing here imports ``ray`` at module level (``import trtq`` stays light); it is
imported through :func:`trtq.errors.require` when a cluster is first contacted. Every
failure is one line: a :class:`~trtq.errors.UserError` (exit 2) for an address nobody
answers at, a worker with another trtq or ONNX Runtime (checked when the workers start),
a worker that dies on every retry; a ``RuntimeError`` (exit 1) for trtq's own code
failing on a worker.
"""

from __future__ import annotations

import hashlib
import logging
import os
import socket
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from trtq.errors import UserError, require

log = logging.getLogger(__name__)

K = TypeVar("K")

#: How often Ray restarts a dead worker, and retries the tasks it was running.
RETRIES = 3
#: CPUs each worker reserves; ONNX Runtime runs that many threads in it.
CPUS_PER_WORKER = 1
#: Tasks queued on a worker at once (the next one's arguments arrive while it works).
IN_FLIGHT_PER_WORKER = 2
#: Seconds to wait for a TCP connection to the cluster before calling it unreachable.
CONNECT_TIMEOUT_S = 5.0
#: Seconds to wait for the workers to start (a cluster without a free CPU never starts one);
#: after the first :data:`START_PATIENCE_S` the wait is logged.
START_TIMEOUT_S = 600.0
START_PATIENCE_S = 30.0

ADDRESS_FIX = (
    "give auto (a cluster started on this machine with `ray start`), ray://HOST:10001 "
    "(Ray Client) or HOST:6379 (the head node); --ray alone starts a local instance"
)
_START_FIX = (
    "start it (`ray start --head`, see the README's 'Running on a Ray cluster') or fix the address"
)


@dataclass(frozen=True)
class Failure:
    """A user mistake seen on a worker: the driver raises it as one line naming the host."""

    host: str
    problem: str
    fix: str | None

    @classmethod
    def of(cls, error: UserError) -> Failure:
        return cls(socket.gethostname(), error.problem, error.fix)


@dataclass(frozen=True)
class WorkerInfo:
    """Who a worker is and what it runs; ``data``: what it saw of the data (if any)."""

    host: str
    pid: int
    versions: dict[str, str]
    data: Any = None

    @classmethod
    def here(cls, data: Any = None) -> WorkerInfo:
        return cls(socket.gethostname(), os.getpid(), software_versions(), data)


def software_versions() -> dict[str, str]:
    """What must match between the driver and every worker for identical results.

    trtq's version, with a digest of its source (two builds of one version differ), and
    ONNX Runtime's, which computes the activations.
    """
    import onnxruntime

    from trtq import __version__

    digest = hashlib.sha256()
    package = Path(__file__).resolve().parent
    for path in sorted(package.rglob("*.py")):
        digest.update(str(path.relative_to(package)).encode())
        digest.update(path.read_bytes())
    return {
        "trtq": f"{__version__} (source {digest.hexdigest()[:12]})",
        "onnxruntime": onnxruntime.__version__,
    }


def parse_address(text: str) -> str:
    """A Ray address as ``ray.init`` takes it, checked: ``auto``, ``local``, ``ray://HOST:PORT``
    or ``HOST:PORT``. Nothing is contacted here."""
    address = text.strip()
    if address in ("auto", "local"):
        return address
    host, port = _host_port(address)
    if not host or port is None or not 0 < port < 65536:
        raise UserError(f"bad Ray address {text!r}", ADDRESS_FIX)
    return address


def address_of(ray: str | bool) -> str | None:
    """The address for the API's ``ray`` argument: True is a local instance (or RAY_ADDRESS)."""
    if ray is True:
        return None
    if isinstance(ray, str):
        return parse_address(ray)
    raise UserError(f"ray must be None, True or a Ray address, not {ray!r}", ADDRESS_FIX)


class RayCluster:
    """A connection to Ray (made on first use) and the workers started on it.

    ``close()`` stops the workers, and disconnects if the connection was made here (a
    caller that ran ``ray.init`` itself keeps its connection).
    """

    def __init__(self, address: str | None) -> None:
        self.address = address
        self._ray: Any = None
        self._connected_here = False
        self.actors: list[Any] = []

    @property
    def ray(self) -> Any:
        """The ``ray`` module, connected."""
        if self._ray is None:
            self._ray = self._connect()
        return self._ray

    def _connect(self) -> Any:
        ray = require("ray", "ray", "running on a Ray cluster (--ray)")
        if ray.is_initialized():
            return ray
        address = self.address or os.environ.get("RAY_ADDRESS") or None
        if address not in (None, "auto", "local"):
            _check_reachable(address)
        options: dict[str, Any] = {}
        if not str(address).startswith("ray://"):  # Ray Client takes no driver options
            options = {"include_dashboard": False, "logging_level": logging.ERROR}
            options["log_to_driver"] = False
        try:
            ray.init(address=address, **options)
        except (ConnectionError, TimeoutError, ValueError, RuntimeError) as exc:
            where = address or "a local instance"
            raise UserError(
                f"cannot connect to the Ray cluster at {where}: {first_line(exc)}", _START_FIX
            ) from exc
        self._connected_here = True
        return ray

    def start(
        self, worker: type, most: int | None, *, hello: Sequence[Any] = ()
    ) -> list[WorkerInfo | Failure]:
        """One ``worker`` actor per free CPU of the cluster (at most ``most``), each asked
        ``hello(*hello)``; a worker running other software is refused here. What the
        workers answered comes back, :class:`Failure` included, for the caller to judge."""
        ray = self.ray
        cpus = int(ray.cluster_resources().get("CPU", 0)) // CPUS_PER_WORKER
        if cpus < 1:
            raise UserError("the Ray cluster has no CPU for a worker", "add nodes with CPUs")
        count = cpus if most is None else max(1, min(cpus, most))
        remote = ray.remote(worker).options(
            num_cpus=CPUS_PER_WORKER,
            max_restarts=RETRIES,
            max_task_retries=RETRIES,
            scheduling_strategy="SPREAD",
        )
        self.actors = [remote.remote(CPUS_PER_WORKER) for _ in range(count)]
        pending = [actor.hello.remote(*hello) for actor in self.actors]
        ready, _ = ray.wait(pending, num_returns=len(pending), timeout=START_PATIENCE_S)
        if len(ready) < len(pending):
            log.warning(
                "waiting for %d of %d Ray workers to start (free CPUs: %s)",
                len(pending) - len(ready),
                len(pending),
                ray.available_resources().get("CPU", 0),
            )
            ready, _ = ray.wait(
                pending, num_returns=len(pending), timeout=START_TIMEOUT_S - START_PATIENCE_S
            )
        if len(ready) < len(pending):
            raise UserError(
                f"{len(pending) - len(ready)} of {len(pending)} Ray workers did not start "
                f"within {START_TIMEOUT_S:.0f} s",
                "check that the cluster has free CPUs (`ray status`)",
            )
        infos = [self.value(ref) for ref in pending]
        ours = software_versions()
        for info in infos:
            if isinstance(info, WorkerInfo):
                _check_versions(info, ours)
        hosts = sorted({info.host for info in infos})
        log.info("Ray: %d workers on %s", count, ", ".join(hosts))
        return infos

    def run(self, tasks: Iterator[tuple[K, Callable[[Any], Any]]]) -> Iterator[tuple[K, Any]]:
        """Run ``(key, call(actor))`` tasks on the workers; yield ``(key, value)`` as they end.

        Tasks are taken only when a worker has room (:data:`IN_FLIGHT_PER_WORKER`), so
        data that travels is read no faster than the workers use it. A :class:`Failure`
        a worker returns is raised here.
        """
        ray = self.ray
        free = [actor for _ in range(IN_FLIGHT_PER_WORKER) for actor in self.actors]
        running: dict[Any, tuple[K, Any]] = {}
        task = next(tasks, None)
        while task is not None or running:
            if task is not None and free:
                key, call = task
                actor = free.pop(0)
                running[call(actor)] = (key, actor)
                task = next(tasks, None)
                continue
            [done], _ = ray.wait(list(running), num_returns=1)
            key, actor = running.pop(done)
            free.append(actor)
            value = self.value(done)
            if isinstance(value, Failure):
                raise UserError(f"on the Ray worker {value.host}: {value.problem}", value.fix)
            yield key, value

    def value(self, ref: Any) -> Any:
        """A worker's answer; a dead worker (after every retry) becomes one line."""
        ray = self.ray
        try:
            return ray.get(ref)
        except ray.exceptions.RayTaskError as exc:  # trtq's code failed on the worker: a bug
            raise RuntimeError(f"a Ray worker failed: {first_line(exc.cause)}") from exc
        except ray.exceptions.OutOfMemoryError as exc:
            raise UserError(
                f"Ray killed a worker for lack of memory: {first_line(exc)}",
                "lower --max-memory or --batch-size, or give the nodes more memory",
            ) from exc
        except ray.exceptions.RayError as exc:  # died, and died again on every retry
            raise UserError(
                f"a Ray worker died {RETRIES + 1} times: {first_line(exc)}",
                "read its log (`ray logs worker-*.err`, or /tmp/ray/session_latest/logs on its "
                "node); a worker killed for memory needs a lower --max-memory",
            ) from exc

    def stop_workers(self) -> None:
        """Stop the workers, giving their CPUs back (the next :meth:`start` starts anew)."""
        for actor in self.actors:
            self._ray.kill(actor)
        self.actors = []

    def close(self) -> None:
        """Stop the workers; disconnect if the connection was made here."""
        if self._ray is None:
            return
        self.stop_workers()
        if self._connected_here:
            self._ray.shutdown()
            self._connected_here = False
        self._ray = None


def _check_versions(info: WorkerInfo, ours: dict[str, str]) -> None:
    for name, version in ours.items():
        theirs = info.versions.get(name)
        if theirs != version:
            raise UserError(
                f"the Ray worker on {info.host} runs {name} {theirs}, this machine {version}",
                "install the same trtq and onnxruntime on every node",
            )


def _host_port(address: str) -> tuple[str, int | None]:
    """('host', port) of ``ray://host:port`` or ``host:port`` (Ray Client's default 10001)."""
    client = address.startswith("ray://")
    rest = address.removeprefix("ray://")
    host, colon, port = rest.rpartition(":")
    if not colon:
        return (rest, 10001) if client else (rest, None)
    return host.strip("[]"), int(port) if port.isdigit() else None


def _check_reachable(address: str) -> None:
    """Ray waits minutes on an address where nothing answers; a TCP connection says at once."""
    host, port = _host_port(address)
    if not host or port is None:
        raise UserError(f"bad Ray address {address!r}", ADDRESS_FIX)
    try:
        socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as exc:
        raise UserError(
            f"cannot reach the Ray cluster at {address}: {exc.strerror or exc}", _START_FIX
        ) from exc


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
