"""Utilization figures of a pool (what autoscaling reads every few seconds), and what an interpreter holds."""

from __future__ import annotations

import collections
import threading
import time
from dataclasses import dataclass, field


@dataclass(frozen=True)
class InterpreterStats:
    """One interpreter's figures. `utilization` is busy time / wall time over the recent window."""

    index: int
    calls: int
    errors: int
    busy_s: float
    queue_depth: int
    utilization: float
    lost: bool = False
    replaced: int = 0  # interpreters started in this place after the one before was lost
    replace_error: str | None = None  # why this lost place could not get another interpreter


@dataclass(frozen=True)
class MemoryInUse:
    """What one interpreter (or the host) holds at a moment: the bytes its malloc has in use, and the memory
    blocks its Python has allocated (`sys.getallocatedblocks`). Between calls nothing of a call is alive, so a
    leak shows as growth of one or the other from one measure to the next; the process's RSS also counts what
    the allocators keep free, which hides small leaks."""

    heap_bytes: int
    python_blocks: int


def release_and_measure() -> MemoryInUse:
    """Give back the free memory of the calling interpreter's malloc (`release_free_heap`), and say what it
    holds. Run it in each interpreter between calls (`InterpreterPool.submit_to`), and in the host."""
    import sys

    from ._glibc import release_free_heap

    return MemoryInUse(release_free_heap(), sys.getallocatedblocks())


@dataclass(frozen=True)
class PoolStats:
    """A pool's figures: one entry per interpreter, and totals (utilization is their mean)."""

    backend: str
    interpreters: list[InterpreterStats] = field(default_factory=list)

    @property
    def size(self) -> int:
        return len(self.interpreters)

    @property
    def calls(self) -> int:
        return sum(i.calls for i in self.interpreters)

    @property
    def errors(self) -> int:
        return sum(i.errors for i in self.interpreters)

    @property
    def busy_s(self) -> float:
        return sum(i.busy_s for i in self.interpreters)

    @property
    def queue_depth(self) -> int:
        return sum(i.queue_depth for i in self.interpreters)

    @property
    def utilization(self) -> float:
        live = [i.utilization for i in self.interpreters if not i.lost]
        return sum(live) / len(live) if live else 0.0

    @property
    def healthy(self) -> int:
        return sum(not i.lost for i in self.interpreters)

    @property
    def replaced(self) -> int:
        return sum(i.replaced for i in self.interpreters)

    def as_dict(self) -> dict:
        return {
            "backend": self.backend,
            "size": self.size,
            "healthy": self.healthy,
            "replaced": self.replaced,
            "calls": self.calls,
            "errors": self.errors,
            "busy_s": self.busy_s,
            "queue_depth": self.queue_depth,
            "utilization": self.utilization,
            "interpreters": [i.__dict__ for i in self.interpreters],
        }


class BusyMeter:
    """Busy time of one worker, kept in fixed buckets so that reading it costs O(window / bucket)."""

    def __init__(self, window_s: float = 10.0, bucket_s: float = 0.25) -> None:
        self.window_s = window_s
        self._bucket_s = bucket_s
        self._buckets: collections.deque[list[float]] = collections.deque()  # [bucket number, busy s]
        self._lock = threading.Lock()
        self._created = time.monotonic()
        self._since: float | None = None
        self.busy_s = 0.0

    def begin(self, now: float) -> None:
        with self._lock:
            self._since = now

    def end(self, now: float) -> None:
        with self._lock:
            since, self._since = self._since, None
            if since is None:
                return
            self.busy_s += now - since
            self._add(since, now)
            self._trim(now)

    def _add(self, start: float, stop: float) -> None:
        b = self._bucket_s
        while start < stop:
            number = int(start // b)
            edge = min(stop, (number + 1) * b)
            if self._buckets and self._buckets[-1][0] == number:
                self._buckets[-1][1] += edge - start
            else:
                self._buckets.append([number, edge - start])
            start = edge

    def _trim(self, now: float) -> None:
        oldest = int((now - self.window_s) // self._bucket_s)
        while self._buckets and self._buckets[0][0] < oldest:
            self._buckets.popleft()

    def utilization(self, now: float | None = None) -> float:
        now = time.monotonic() if now is None else now
        with self._lock:
            self._trim(now)
            low = now - self.window_s
            busy = sum(v for n, v in self._buckets if (n + 1) * self._bucket_s > low)
            if self._since is not None:
                busy += now - max(self._since, low)
        span = min(self.window_s, max(now - self._created, 1e-9))
        return max(0.0, min(1.0, busy / span))
