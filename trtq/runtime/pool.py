"""A bounded pool of execution contexts: at most N, shared by every thread that calls an engine.

Every TensorRT execution context holds the engine's activation memory, so contexts must
not grow with the number of threads a server happens to run: request threads come and
go, and contexts kept per thread would accumulate until the GPU runs out. Instead a
call borrows a context for its duration and returns it when it ends (so a thread that
exits holds nothing). Contexts are made on demand, up to ``size``; a caller who finds
all of them busy waits for one, at most ``timeout`` seconds, then gets
:class:`ContextsBusyError`, one line saying how to size the pool, rather than waiting
forever (a thread that holds ``engine.context()`` and calls the engine again inside it
would otherwise deadlock when the pool has one context).

The most recently returned context is handed out first: its buffers are the warmest
and already sized for recent shapes.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Generic, TypeVar

from trtq.errors import UserError

T = TypeVar("T")

#: The default ``max_contexts`` never exceeds this: a GPU runs a few engine calls at once
#: (each fills it in turn), so more contexts only hold more memory.
MAX_DEFAULT_CONTEXTS = 8
#: Share of the GPU's free memory (at load) the default pool may fill with activation memory;
#: the rest stays free for buffers, other engines and the caller's own arrays.
FREE_MEMORY_SHARE = 0.5
#: Seconds a call waits for a free context by default.
DEFAULT_CONTEXT_TIMEOUT = 60.0


class ContextsBusyError(UserError):
    """Every context of an engine stayed busy for longer than its timeout."""


def default_pool_size(activation_bytes: int, free_bytes: int) -> int:
    """How many contexts fit in :data:`FREE_MEMORY_SHARE` of free memory, in 1..8."""
    if activation_bytes <= 0:
        return MAX_DEFAULT_CONTEXTS
    fitting = int(free_bytes * FREE_MEMORY_SHARE) // activation_bytes
    return max(1, min(MAX_DEFAULT_CONTEXTS, fitting))


def check_pool_settings(max_contexts: object, timeout: object) -> None:
    """One line for a ``max_contexts`` or ``context_timeout`` that cannot work."""
    if max_contexts is not None and (
        not isinstance(max_contexts, int) or isinstance(max_contexts, bool) or max_contexts < 1
    ):
        raise UserError(
            f"max_contexts must be a whole number >= 1, not {max_contexts!r}",
            "pass e.g. max_contexts=4 (--max-contexts 4), or None for the default",
        )
    if timeout is not None and (
        not isinstance(timeout, int | float) or isinstance(timeout, bool) or not timeout >= 0
    ):
        raise UserError(
            f"context_timeout must be a number of seconds >= 0, not {timeout!r}",
            "pass e.g. context_timeout=30, or None to wait as long as it takes",
        )


class Pool(Generic[T]):
    """At most ``size`` items made by ``make`` on demand, each lent to one caller at a time.

    ``describe`` names the pool's owner in :class:`ContextsBusyError` messages.
    """

    def __init__(
        self, make: Callable[[], T], size: int, timeout: float | None, describe: str
    ) -> None:
        self.size = size
        self.timeout = timeout
        self._make = make
        self._describe = describe
        self._ready = threading.Condition()
        self._free: list[T] = []
        self._made: list[T] = []
        self._making = 0  # items being made right now (they count against size)
        self._closed = False

    @property
    def created(self) -> int:
        """How many items exist (lent or free)."""
        with self._ready:
            return len(self._made)

    def acquire(self) -> T:
        """A free item, a new one while fewer than ``size`` exist, or the next one returned."""
        deadline = None if self.timeout is None else time.monotonic() + self.timeout
        with self._ready:
            while True:
                self._check_open()
                if self._free:
                    return self._free.pop()
                if len(self._made) + self._making < self.size:
                    self._making += 1
                    break
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise self._busy()
                self._ready.wait(left)
        try:
            item = self._make()
        except BaseException:
            with self._ready:
                self._making -= 1
                self._ready.notify()  # another waiter may try to make one
            raise
        with self._ready:
            self._making -= 1
            self._made.append(item)
        return item

    def release(self, item: T) -> None:
        """Back to the pool (dropped after :meth:`close`, which freed it already)."""
        with self._ready:
            if not self._closed:
                self._free.append(item)
                self._ready.notify()

    def close(self) -> list[T]:
        """Every item made, for the owner to free; waiting callers get an error."""
        with self._ready:
            self._closed = True
            made, self._made, self._free = self._made, [], []
            self._ready.notify_all()
        return made

    def _check_open(self) -> None:
        if self._closed:
            raise UserError("this engine was closed", f"load {self._describe} again")

    def _busy(self) -> ContextsBusyError:
        count = f"{self.size} execution context{'s' if self.size != 1 else ''}"
        return ContextsBusyError(
            f"all {count} of {self._describe} stayed busy for {self.timeout:g} s",
            "allow more (trtq.load(..., max_contexts=N), --max-contexts N) or wait longer "
            "(context_timeout=); end `with engine.context()` blocks and call .wait() on every "
            "infer_async handle, which hold a context until then",
        )
