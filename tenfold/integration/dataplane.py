"""The data plane: a replica's routes served on `http_port` from inside its interpreters.

Every interpreter runs an HTTP server (`tenfold.integration._server`) on the node's one listening socket for
the port (`tenfold.integration.listener`), and serves each request it accepts from its first byte to its
last. The replica's host interpreter plays gunicorn's arbiter: it starts the servers, watches them (the
counters each writes into its block), replaces an interpreter whose server died or is stuck, and stops them;
it never handles a request.
"""

from __future__ import annotations

import collections
import ctypes
import dataclasses
import json
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from tenfold.runtime import InterpreterPool, PoolStats

from . import _server, listener
from .config import AppArgs

_logger = logging.getLogger("ray.serve")
_WATCH_S = 0.25
_SNAPSHOT_S = 0.5
_WANTS_S = 0.02  # how often the servers' requests for a model not loaded are looked for
_SNAPSHOT_BYTES = 1 << 16


class Snapshot:
    """JSON in host memory that the interpreters read without calling the host: [seq, size, bytes...],
    written under a sequence lock (odd while a write is in progress)."""

    def __init__(self, size: int = _SNAPSHOT_BYTES) -> None:
        self._buffer = ctypes.create_string_buffer(16 + size)
        self._header = (ctypes.c_int64 * 2).from_buffer(self._buffer)
        self._size = size
        self.write(b"{}")

    @property
    def address(self) -> int:
        return ctypes.addressof(self._buffer)

    def write(self, data: bytes) -> None:
        if len(data) > self._size:
            data = json.dumps({"error": f"the stats are over {self._size} bytes"}).encode()
        self._header[0] += 1
        ctypes.memmove(self.address + 16, data, len(data))
        self._header[1] = len(data)
        self._header[0] += 1


class _Watched:
    """The host's view of one interpreter's server: its counter block and a window of busy-time samples."""

    def __init__(self, address: int, replaced: int, window_s: float) -> None:
        self.block = (ctypes.c_int64 * _server.FIELDS).from_address(address)
        self.replaced = replaced
        self.window_s = window_s
        self.samples: collections.deque[tuple[int, int]] = collections.deque()
        self.reported = [0] * _server.FIELDS  # what the metrics were last given
        self.used = [0] * _server.MAX_MODELS  # each model's last request, as the host last read it

    def busy_ns(self, now: int) -> int:
        started = self.block[_server.CURRENT_NS]
        return self.block[_server.BUSY_NS] + (now - started if started else 0)

    def sample(self, now: int) -> None:
        self.samples.append((now, self.busy_ns(now)))
        while len(self.samples) > 2 and now - self.samples[1][0] >= self.window_s * 1e9:
            self.samples.popleft()

    def utilization(self, now: int) -> float:
        if not self.samples:
            return 0.0
        then, busy_then = self.samples[0]
        span = now - then
        return 0.0 if span <= 0 else max(0.0, min(1.0, (self.busy_ns(now) - busy_then) / span))


class DataPlane:
    """The HTTP servers of one replica's interpreters on `args.http_port`, started here."""

    def __init__(self, pool: InterpreterPool, models: dict[str, _server.Served], args: AppArgs, *, owner: str,
                 manifest: bytes, openapi: bytes, stats: Callable[[], dict[str, Any]], metrics: Any | None = None,
                 window_s: float = 10.0, wanted: Callable[[str], None] | None = None,
                 used: Callable[[dict[str, float]], None] | None = None) -> None:
        if args.http_port is None:
            raise ValueError("the data plane needs http_port")
        self._pool, self._args, self._stats, self._metrics = pool, args, stats, metrics
        self._window_s = window_s
        self._lock = threading.Lock()
        self._settings_lock = threading.Lock()  # one change of the servers' settings at a time
        self._watched: dict[int, _Watched] = {}
        self._stopping = threading.Event()
        self._names = {served.index: name for name, served in models.items()}
        self._wanted, self._used = wanted, used
        self.snapshot = Snapshot()
        self._peers = (ctypes.c_int64 * _server.PEERS)()  # the servers' blocks, for their acceptors to compare
        self.listener = listener.listen(args.http_host, args.http_port, owner)
        self.port = int(self.listener.socket.getsockname()[1])  # kept: the socket is closed by stop()
        per_interpreter = None
        if args.max_queued_requests >= 0:
            per_interpreter = -(-(args.replica_max_ongoing_requests + args.max_queued_requests) // pool.size)
        self.settings = _server.Settings(
            models=dict(models), several=args.serves_several, max_request_bytes=args.max_request_bytes,
            request_timeout_s=args.request_timeout_s, read_timeout_s=args.http_read_timeout_s,
            keep_alive_s=args.http_keep_alive_s, drain_timeout_s=args.http_drain_timeout_s,
            max_connections=per_interpreter, retry_after_s=args.retry_after_s, manifest=manifest, openapi=openapi,
            snapshot=self.snapshot.address, peers=ctypes.addressof(self._peers),
            max_batch_size=args.max_batch_size, batch_wait_timeout_s=args.batch_wait_timeout_s,
        )
        try:
            # A setup: an interpreter that replaces a lost one starts its server before it is put in service.
            self._setup = pool.add_setup(_server.start, self.listener.fileno(), self.settings)
            self._refresh(pool.stats())
        except BaseException:
            self.listener.close()
            raise
        self._watcher = threading.Thread(target=self._watch, name="tenfold-dataplane", daemon=True)
        self._watcher.start()

    # -- what the replica reads ----------------------------------------------------------------

    def merge(self, stats: PoolStats) -> PoolStats:
        """The pool's figures with the servers' added in: their requests as calls, their busy time, the
        request in progress as queue depth, and utilization as the share of time an interpreter is busy
        with either."""
        now = time.monotonic_ns()
        with self._lock:
            watched = dict(self._watched)
        merged = []
        for i in stats.interpreters:
            w = watched.get(i.index)
            if w is None or i.lost:
                merged.append(i)
                continue
            b = w.block
            merged.append(dataclasses.replace(
                i, calls=i.calls + b[_server.REQUESTS], errors=i.errors + b[_server.ERRORS],
                busy_s=i.busy_s + w.busy_ns(now) / 1e9, queue_depth=i.queue_depth + bool(b[_server.CURRENT_NS]),
                utilization=min(1.0, i.utilization + w.utilization(now)),
            ))
        return PoolStats(backend=stats.backend, interpreters=merged)

    def connections(self) -> dict[str, list[int]]:
        """Per serving interpreter: its open connections, and those that carried a request in the last second
        or carry one now (`active`: idle keep-alive connections are no load)."""
        with self._lock:
            blocks = [w.block for _, w in sorted(self._watched.items())]
        return {"open": [b[_server.CONNECTIONS] for b in blocks], "active": [b[_server.ACTIVE] for b in blocks]}

    def model_calls(self) -> int:
        """Calls the servers made to their models (a batch of requests is one, as each step of a stream)."""
        with self._lock:
            blocks = [w.block for w in self._watched.values()]
        return sum(b[_server.SEQ] for b in blocks)

    def threads(self) -> list[int]:
        """Native ids of the threads the servers run on (to tell the interpreters' CPU time from the host's)."""
        with self._lock:
            blocks = [w.block for w in self._watched.values()]
        return [b[f] for b in blocks for f in (_server.SERVER_TID, _server.WATCHDOG_TID) if b[f]]

    def check(self) -> None:
        """Raise when the servers are no longer watched (a health check fails on it)."""
        if not self._watcher.is_alive() and not self._stopping.is_set():
            raise RuntimeError(f"the watcher of the HTTP servers on port {self._args.http_port} stopped")

    def serve(self, name: str, served: _server.Served, *, manifest: bytes | None = None,
              openapi: bytes | None = None) -> None:
        """Serve model `name` as `served` says from now on (a model loaded, unloaded, updated, or one the replica
        could not load), and the application's manifest and OpenAPI bodies, if given: each server takes the new
        settings between two requests (those it has begun end on the model they began on; see `requests_on`),
        and a replacement interpreter starts with them. Returns once every server has them."""
        with self._settings_lock:
            changes: dict[str, Any] = {"models": {**self.settings.models, name: served}}
            if manifest is not None:
                changes["manifest"] = manifest
            if openapi is not None:
                changes["openapi"] = openapi
            settings = dataclasses.replace(self.settings, **changes)
            token = self._pool.add_setup(_server.start, self.listener.fileno(), settings)
            self._pool.remove_setup(self._setup)
            self._setup, self.settings = token, settings

    def holding(self, index: int) -> int:
        """Requests on the port that hold the model at catalog index `index` now, in all interpreters (read from
        their blocks: no interpreter is asked)."""
        with self._lock:
            blocks = [w.block for w in self._watched.values()]
        return sum(b[_server.HELD_BASE + index] for b in blocks)

    def requests_on(self, model_id: str) -> int:
        """Requests on the port that began on model `model_id` and are not yet answered, in all interpreters."""
        return sum(self._pool.broadcast(_server.requests_on, model_id))

    # -- watching ------------------------------------------------------------------------------

    def _refresh(self, stats: PoolStats) -> None:
        """Find the block of every interpreter whose server is new (at start, or in a replacement)."""
        for i in stats.interpreters:
            known = self._watched.get(i.index)
            if i.lost or (known is not None and known.replaced == i.replaced):
                continue
            address = self._pool.submit_to(i.index, _server.address).result(timeout=30)
            if address:
                with self._lock:
                    self._watched[i.index] = _Watched(address, i.replaced, self._window_s)
                self._peers[i.index] = address

    def _watch(self) -> None:
        last_snapshot = 0.0
        while not self._wait_watching_models(_WATCH_S):
            try:
                now = time.monotonic_ns()
                stats = self._pool.stats()  # one snapshot for both: reading it computes every utilization
                self._check_servers(now, stats)
                self._refresh(stats)
                if self._used is not None and (used := self._take_used()):
                    self._used(used)
                if time.monotonic() - last_snapshot >= _SNAPSHOT_S:
                    last_snapshot = time.monotonic()
                    self.snapshot.write(json.dumps(self._stats()).encode())
                    self._report()
            except Exception:  # noqa: BLE001 - the watcher must outlive any one bad round
                if not self._stopping.is_set():
                    _logger.exception("watching the interpreters' HTTP servers failed")

    def _wait_watching_models(self, timeout_s: float) -> bool:
        """Wait `timeout_s`, or until the data plane stops (True), passing on the models the servers ask for
        meanwhile: a request waits for its model while the replica loads it."""
        if self._wanted is None:
            return self._stopping.wait(timeout_s)
        deadline = time.monotonic() + timeout_s
        while not self._stopping.wait(max(0.0, min(_WANTS_S, deadline - time.monotonic()))):
            try:
                for name in self._take_wanted():
                    self._wanted(name)
            except Exception:  # noqa: BLE001 - the watcher must outlive any one bad look
                _logger.exception("passing on the models the interpreters' HTTP servers wait for failed")
            if time.monotonic() >= deadline:
                return False
        return True

    def _take_wanted(self) -> set[str]:
        """The models the servers' requests wait for, their bits cleared as they are read (a server sets a bit
        again at its next look while its request waits)."""
        with self._lock:
            blocks = [w.block for w in self._watched.values()]
        names: set[str] = set()
        for block in blocks:
            for word in range(_server.MODEL_WORDS):
                bits = block[_server.WANTED_BASE + word]
                if bits:
                    block[_server.WANTED_BASE + word] = 0
                    names.update(self._names[i] for i in range(word * _server.MODEL_BITS, (word + 1) *
                                 _server.MODEL_BITS) if bits >> (i % _server.MODEL_BITS) & 1 and i in self._names)
        return names

    def _take_used(self) -> dict[str, float]:
        """The models requested on the port since the last look, with the time of each one's last request
        (time.time())."""
        with self._lock:
            watched = list(self._watched.values())
        last: dict[str, int] = {}
        for w in watched:
            for index, name in self._names.items():
                ns = w.block[_server.USED_BASE + index]
                if ns > w.used[index]:
                    w.used[index] = ns
                    last[name] = max(ns, last.get(name, 0))
        ago = time.time() - time.monotonic_ns() / 1e9  # the servers' clock is CLOCK_MONOTONIC
        return {name: ago + ns / 1e9 for name, ns in last.items()}

    def _check_servers(self, now: int, stats: PoolStats) -> None:
        args = self._args
        stuck_ns = ((args.request_timeout_s or 0) + args.interrupt_grace_s + 1.0) * 1e9
        lost = {i.index for i in stats.interpreters if i.lost}
        with self._lock:
            watched = list(self._watched.items())
        for index, w in watched:
            block = w.block
            if index in lost:  # by an interrupt, or retired below: its server leaves the set
                block[_server.STOP] = 1
                self._peers[index] = 0
                with self._lock:
                    self._watched.pop(index, None)
                continue
            w.sample(now)
            started = block[_server.CURRENT_NS]
            if block[_server.STATE] == _server.FAILED:
                self._retire(index, "its HTTP server failed")
            elif args.request_timeout_s is not None and started and now - started > stuck_ns:
                self._retire(index, f"its HTTP server's call did not stop within {args.interrupt_grace_s:g} s of "
                                    f"request_timeout_s ({args.request_timeout_s:g} s)")

    def _retire(self, index: int, reason: str) -> None:
        _logger.warning("taking interpreter %d out of service: %s", index, reason)
        self._pool.retire(index, f"interpreter {index}: {reason}")

    def _report(self) -> None:
        if self._metrics is None:
            return
        with self._lock:
            watched = list(self._watched.values())
        for w in watched:
            now = list(w.block)
            delta = [a - b for a, b in zip(now, w.reported)]
            w.reported = now
            self._metrics.observe_http_port(
                requests=delta[_server.REQUESTS],
                statuses={s: delta[_server.STATUS_BASE + i] for i, s in enumerate(_server.STATUSES)},
                latency_buckets=delta[_server.LATENCY_BASE:_server.SERVER_TID],
            )

    # -- stopping ------------------------------------------------------------------------------

    def stop(self) -> bool:
        """Stop accepting, let every server finish the requests it has accepted (up to http_drain_timeout_s),
        then close this replica's copy of the socket. Returns whether all servers exited in time."""
        if self._stopping.is_set():
            return True
        self._stopping.set()
        self._pool.remove_setup(self._setup)
        with self._lock:
            blocks = [w.block for w in self._watched.values()]
        for block in blocks:
            block[_server.STOP] = 1
        deadline = time.monotonic() + self._args.http_drain_timeout_s + 2.0
        while time.monotonic() < deadline and any(b[_server.STATE] == _server.SERVING for b in blocks):
            time.sleep(0.02)
        done = all(b[_server.STATE] != _server.SERVING for b in blocks)
        self._watcher.join(2.0)
        self.listener.close()
        return done
