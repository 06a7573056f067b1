"""The half of the data plane that runs *inside* each interpreter: an HTTP server on the replica's listening
socket that serves a request from its first byte to its last (accept, parse, decode, validate, call the
model, encode, write), so that the replica's host interpreter never touches it.

The server is stock uvicorn (httptools parser, uvloop) on a thread of this interpreter's own, with a
watchdog thread beside it. What the host needs to know (calls, busy time, the call in progress, statuses,
latencies) is written into a block of int64 counters that this interpreter owns and never frees; the host
reads it without taking any GIL, and writes one word into it: STOP. The replica's stats are read the other
way, from a snapshot the host keeps in its own memory.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import ctypes
import json
import logging
import os
import select
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any

from tenfold.packaging import _signature
from tenfold.runtime import raise_in_thread

from . import batching, codec, routes

# The counter block: one int64 per field, in this interpreter's memory.
STOP = 0  # host -> server: 1 = stop accepting, finish what was accepted, exit
STATE = 1  # server -> host: 0 starting, 1 serving, 2 stopped, 3 failed
REQUESTS = 2  # requests answered
ERRORS = 3  # of them, answered with a status >= 400
BUSY_NS = 4  # time spent answering requests to POST / (the model's and its codec's)
CURRENT_NS = 5  # CLOCK_MONOTONIC ns at which the request in progress started its call, 0 when none
SEQ = 6  # calls started
HEARTBEAT_NS = 7  # the watchdog's last round
CONNECTIONS = 8  # open connections
TIMEOUTS = 9  # calls interrupted past request_timeout_s
STATUSES = (400, 404, 405, 408, 413, 415, 422, 500, 503, 504)
STATUS_BASE = 10  # one counter per status above
LATENCY_BOUNDS_MS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 30000)
LATENCY_BASE = STATUS_BASE + len(STATUSES)  # one counter per bucket, and one past the last bound
SERVER_TID = LATENCY_BASE + len(LATENCY_BOUNDS_MS) + 1  # native thread ids of the server and its watchdog,
WATCHDOG_TID = SERVER_TID + 1  # so that a profiler can tell this interpreter's CPU time from the host's
ACTIVE = WATCHDOG_TID + 1  # open connections with a request in the last ACTIVE_S (idle keep-alive ones are no load)
# Models by their catalog index (an application of one model has index 0). WANTED: a bit per model, MODEL_BITS to
# a word: requests here wait for the model, which this replica has not loaded (the host loads it, and clears the
# bits it saw). USED: a word per model, the CLOCK_MONOTONIC ns of its last request here (the host keeps its models'
# least recently used order by them). HELD: a word per model, the requests here that hold it now.
MODEL_BITS, MODEL_WORDS = 32, 8
MAX_MODELS = MODEL_BITS * MODEL_WORDS
WANTED_BASE = ACTIVE + 1
USED_BASE = WANTED_BASE + MODEL_WORDS
HELD_BASE = USED_BASE + MAX_MODELS
FIELDS = HELD_BASE + MAX_MODELS
ACTIVE_S = 1.0

SERVING, STOPPED, FAILED = 1, 2, 3
_STATUS_INDEX = {status: STATUS_BASE + i for i, status in enumerate(STATUSES)}
_logger = logging.getLogger("tenfold.http")


@dataclass(frozen=True)
class Served:
    """A model as the servers serve it: where it is loaded (None: not in this replica), and its routes' bodies."""

    model_id: str | None
    interface: codec.Interface
    index: int = 0  # its place in the application's catalog (its bit in WANTED and USED)
    manifest: bytes = b"{}"  # the body of GET /{name}/-/manifest (an application of several)
    openapi: bytes = b"{}"  # the body of GET /{name}/-/openapi.json
    #: Why the replica could not load it, and when (time.monotonic_ns()): requests waiting since before are told.
    error: tuple[str, int] | None = None


@dataclass(frozen=True)
class Settings:
    """What an interpreter's server needs, sent by the host when the server starts and each time it changes."""

    models: dict[str, Served]  # by name; an application of one model has one, named ""
    several: bool  # whether requests name a model (an application of several)
    max_request_bytes: int
    request_timeout_s: float | None
    read_timeout_s: float
    keep_alive_s: float
    drain_timeout_s: float
    max_connections: int | None  # per interpreter; past it a request is answered 503
    retry_after_s: float
    manifest: bytes  # the body of GET /-/manifest
    openapi: bytes  # the body of GET /-/openapi.json
    snapshot: int  # host address of the replica's stats snapshot (see dataplane.Snapshot)
    peers: int  # host address of PEERS int64 words: the counter blocks of the replica's servers (0: none)
    load_timeout_s: float = 300.0  # how long a request waits for its model to be loaded
    max_batch_size: int | None = None  # join up to this many of this server's requests to a model in one call
    batch_wait_timeout_s: float = 0.0  # how long a batch waits to fill up


PEERS = 16


_JSON = [(b"content-type", codec.JSON_TYPE.encode())]
_blocks: list[Any] = []  # every block this interpreter handed out: never freed, the host may still read one
_server: dict[str, Any] = {}


def start(fd: int, settings: Settings) -> int:
    """Start serving on listening socket `fd` (shared with the host and the other interpreters); returns the
    address of this server's counter block once it accepts connections. A server of the same data plane that is
    serving already takes `settings` in place (a model update): the requests it has begun end on the model they
    began on, and the next ones go to the new one."""
    current = _server.get("current")
    if current is not None and current.settings.snapshot == settings.snapshot and current.thread.is_alive():
        current.settings = settings  # one store under this interpreter's GIL: each request reads it once
        return ctypes.addressof(current.block)
    stop(settings.drain_timeout_s)  # a parked interpreter taken by a new pool may still serve the old one
    block = (ctypes.c_int64 * FIELDS)()
    _blocks.append(block)
    server = _Server(socket.socket(fileno=os.dup(fd)), settings, block)
    server.start()
    _server["current"] = server
    return ctypes.addressof(block)


def stop(timeout_s: float) -> bool:
    """Stop this interpreter's server (as the host's STOP does) and wait up to `timeout_s` for it to exit."""
    server = _server.pop("current", None)
    if server is None:
        return True
    server.block[STOP] = 1
    server.thread.join(timeout_s + 1.0)
    return not server.thread.is_alive()


def address() -> int:
    """The counter block of the server running in this interpreter (0 when none)."""
    server = _server.get("current")
    return 0 if server is None else ctypes.addressof(server.block)


def requests_on(model_id: str) -> int:
    """Requests of this interpreter's server that began on model `model_id` and are not yet answered (a stream's
    until its last item)."""
    server = _server.get("current")
    return 0 if server is None else server.begun.get(model_id, 0)


def read_snapshot(addr: int) -> bytes:
    """The replica's latest stats (JSON), from the host's seqlocked buffer: [seq, size, bytes...]."""
    header = (ctypes.c_int64 * 2).from_address(addr)
    # The host's thread may be descheduled in the middle of a write on a loaded machine: wait for it a while.
    deadline = time.monotonic() + 0.5
    while True:
        seq = header[0]
        if seq % 2 == 0:
            data = ctypes.string_at(addr + 16, header[1])
            if header[0] == seq:
                return data
        if time.monotonic() > deadline:
            return b'{"error": "the replica\'s figures were being written; ask again"}'
        time.sleep(0.0005)


class _Server:
    """One interpreter's uvicorn server, its watchdog, and the ASGI app that answers every route."""

    def __init__(self, sock: socket.socket, settings: Settings, block: Any) -> None:
        import uvicorn

        from tenfold.packaging.replicated import apply_loaded

        self.settings, self.block, self._apply = settings, block, apply_loaded
        self.begun: dict[str, int] = {}  # model id -> requests begun on it and not yet answered
        self._batchers: dict[str, batching.Batcher] = {}  # model id -> the batcher of requests to it
        self._interrupt_lock = threading.Lock()
        self._interrupted = 0  # SEQ of the call the watchdog raised TimeoutError in
        self._serving_thread = 0
        self.sock = sock
        self.protocol = _protocol(self)
        config = uvicorn.Config(
            self.app, loop="uvloop", http=self.protocol, interface="asgi3", lifespan="off", access_log=False,
            log_level="warning",
            timeout_keep_alive=max(1, round(settings.keep_alive_s)),
            timeout_graceful_shutdown=max(1, round(settings.drain_timeout_s)), server_header=False,
            date_header=False,
        )
        self.uvicorn = uvicorn.Server(config)
        self.uvicorn.capture_signals = contextlib.nullcontext  # type: ignore[method-assign,assignment] # signals are the host's
        self.thread = threading.Thread(target=self._serve, name="tenfold-http", daemon=True)
        self._started = threading.Event()
        self._failure: BaseException | None = None

    def start(self) -> None:
        self.thread.start()
        threading.Thread(target=self._watch, name="tenfold-http-watchdog", daemon=True).start()
        while not self._started.wait(0.05):
            if not self.thread.is_alive():
                break
        if self._failure is not None or not self.uvicorn.started:
            raise RuntimeError(f"the interpreter's HTTP server did not start: {self._failure!r}")

    def _serve(self) -> None:
        import uvloop

        self._serving_thread = threading.get_ident()
        self.block[SERVER_TID] = threading.get_native_id()
        try:
            uvloop.run(self._run())
        except BaseException as exc:  # noqa: BLE001 - reported to the host through STATE
            self._failure = exc
            self.block[STATE] = FAILED
            _logger.exception("the interpreter's HTTP server failed")
        else:
            self.block[STATE] = STOPPED
        finally:
            self._started.set()
            self.sock.close()

    async def _run(self) -> None:
        # uvicorn gets no socket of its own: connections are taken by the acceptor below, one at a time.
        task = asyncio.ensure_future(self.uvicorn.serve(sockets=[]))
        while not self.uvicorn.started and not task.done():
            await asyncio.sleep(0.005)
        if self.uvicorn.started:
            self.acceptor = _Acceptor(self)
            self.block[STATE] = SERVING
        self._started.set()
        await task

    def _watch(self) -> None:
        """Raise TimeoutError in a call past request_timeout_s; stop the server when the host says STOP."""
        block, timeout = self.block, self.settings.request_timeout_s
        block[WATCHDOG_TID] = threading.get_native_id()
        poll_s = min(0.1, timeout / 10) if timeout else 0.1
        while self.thread.is_alive() or not self._started.is_set():
            now = time.monotonic_ns()
            block[HEARTBEAT_NS] = now
            if block[STOP] and not self.uvicorn.should_exit:
                setattr(self.protocol, "draining", True)  # noqa: B010 - a class made at run time
                acceptor = getattr(self, "acceptor", None)
                if acceptor is not None:
                    acceptor.loop.call_soon_threadsafe(acceptor.stop)
                self.uvicorn.should_exit = True
            block[ACTIVE] = self._active_connections()
            started = block[CURRENT_NS]
            if timeout and started and now - started > timeout * 1e9:
                with self._interrupt_lock:
                    seq = block[SEQ]
                    if block[CURRENT_NS] == started and self._interrupted != seq:
                        self._interrupted = seq
                        block[TIMEOUTS] += 1
                        raise_in_thread(self._serving_thread, TimeoutError)
            time.sleep(poll_s)

    def _active_connections(self) -> int:
        now = time.monotonic()
        # list() copies the set in one step under this interpreter's GIL, while the loop thread may change it.
        connections: list[Any] = list(self.uvicorn.server_state.connections)
        return sum(1 for c in connections if now - getattr(c, "last_active", 0.0) < ACTIVE_S
                   or (c.cycle is not None and not c.cycle.response_complete))

    # -- the ASGI app ---------------------------------------------------------------------------

    async def app(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        try:
            await self._respond(self.settings, scope, receive, send)
        finally:
            held = scope.get("tenfold.model")  # the model it held (see _hold)
            if held is not None:
                self.begun[held.model_id] -= 1
                self.block[HELD_BASE + held.index] -= 1

    async def _respond(self, settings: Settings, scope: dict[str, Any], receive: Any, send: Any) -> None:
        t0 = time.perf_counter()
        block = self.block
        try:
            status, headers, body = await self._answer(settings, scope, receive)
        except Exception as exc:  # noqa: BLE001 - every failure is answered, and the server goes on
            if not isinstance(exc, codec.HTTPError):
                _logger.exception("request failed")  # ours, not the caller's nor the model's
            error = routes.classify(exc)
            status, headers, body = error.status, self._error_headers(error), error.body()
        if isinstance(body, _Stream):  # no content-length: uvicorn sends it chunked, as it comes
            await send({"type": "http.response.start", "status": status, "headers": headers})
            await self._send_stream(body, send, receive)
        else:
            headers.append((b"content-length", str(len(body)).encode()))
            await send({"type": "http.response.start", "status": status, "headers": headers})
            await send({"type": "http.response.body", "body": body})
        block[REQUESTS] += 1
        if status >= 400:
            block[ERRORS] += 1
            index = _STATUS_INDEX.get(status)
            if index is not None:
                block[index] += 1
        block[LATENCY_BASE + bisect.bisect_left(LATENCY_BOUNDS_MS, (time.perf_counter() - t0) * 1000.0)] += 1

    @staticmethod
    def _error_headers(error: codec.HTTPError) -> list[tuple[bytes, bytes]]:
        headers = [*_JSON, *((k.lower().encode(), v.encode()) for k, v in error.headers.items())]
        if error.status in (400, 408, 413) or error.kind == "Overloaded":  # the body is not read, or come back later
            headers.append((b"connection", b"close"))
        return headers

    async def _send_stream(self, stream: _Stream, send: Any, receive: Any) -> None:
        """A streaming model's items, each sent as soon as the model yields it; a client that hangs up stops the
        model between two items (its generator is closed), and an error ends the stream with an error chunk."""
        gone = asyncio.ensure_future(receive())  # the body is read: what comes next is the client hanging up
        try:
            chunk: bytes | None = stream.first
            while chunk is not None:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
                await asyncio.sleep(0)  # one turn of the loop: a client gone is seen before the next step
                if gone.done():
                    return
                try:
                    chunk = self._call(stream.model_id, _step, stream.iterator, stream.encode)
                except codec.HTTPError as error:  # the model's, or past request_timeout_s: the status is sent
                    await send({"type": "http.response.body", "body": codec.stream_error(error, stream.events),
                                "more_body": True})
                    break
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            gone.cancel()
            with contextlib.suppress(Exception):  # a generator that fails as it closes has nothing left to say
                self._apply(stream.model_id, _close, stream.iterator)

    async def _answer(self, settings: Settings, scope: dict[str, Any], receive: Any
                      ) -> tuple[int, list, bytes | _Stream]:
        route, by_path = routes.resolve(scope["method"], scope["path"], scope.get("root_path", ""),
                                        settings.models if settings.several else None)
        name = ""
        if settings.several:
            name = routes.pick_model(route, by_path, _header(scope, _MODEL_HEADERS), settings.models)
        if route == routes.PREDICT:
            return 200, *(await self._predict(settings, name, scope, receive))
        if route == routes.MANIFEST:
            return 200, [*_JSON], settings.models[name].manifest if name else settings.manifest
        if route == routes.OPENAPI:
            return 200, [*_JSON], settings.models[name].openapi if name else settings.openapi
        if route == routes.STATS:
            return 200, [*_JSON], read_snapshot(settings.snapshot)
        if self.block[STOP]:
            raise codec.HTTPError("this replica is stopping", status=503, kind="Unavailable",
                                  headers={"Retry-After": "1"})
        return 200, [*_JSON], json.dumps({"status": "ok", "pid": os.getpid()}).encode()

    async def _predict(self, settings: Settings, name: str, scope: dict[str, Any], receive: Any
                       ) -> tuple[list, bytes | _Stream]:
        if not scope.get("tenfold.admitted", True):
            raise routes.overloaded(settings.retry_after_s)
        content_type = content_length = accept = None
        for header, value in scope["headers"]:
            if header == b"content-type":
                content_type = value.decode("latin-1")
            elif header == b"content-length":
                content_length = value.decode("latin-1")
            elif header == b"accept":
                accept = value.decode("latin-1")
        media = routes.media_type(content_type, settings.models[name].interface)
        routes.check_declared_length(content_length, settings.max_request_bytes)
        body = await _read_body(receive, settings.max_request_bytes)
        served = await self._hold(name, scope)  # the model as served now (an update may have come meanwhile)
        model_id, interface = served.model_id, served.interface
        assert model_id is not None
        if interface.streams:
            return self._open_stream(model_id, interface, body, routes.wants_events(accept))
        if settings.max_batch_size is not None:
            return await self._batched(settings, model_id, interface, media, body)
        predict = codec.predict_json if media == codec.JSON_TYPE else codec.predict_arrow
        return [(b"content-type", media.encode())], self._call(model_id, predict, body, interface)

    async def _batched(self, settings: Settings, model_id: str, interface: codec.Interface, media: str, body: bytes
                       ) -> tuple[list, bytes]:
        """The answer to a request joined with this server's other requests to the same model in one call. It is
        decoded and checked alone first, so that a bad one fails alone."""
        batcher = self._batchers.get(model_id)
        if batcher is None:
            batcher = self._batchers[model_id] = self._batcher(settings, model_id, interface)
        if interface.takes_values:
            (items,) = codec.parse_inputs(body, interface.inputs)
            result = await batcher.submit(batching.check_items(interface, items))
            return [*_JSON], codec.encode_value(result)
        arrays = (codec.decode_json if media == codec.JSON_TYPE else codec.decode_arrow)(body, interface.inputs)
        try:
            _signature.check_inputs(interface.inputs, arrays, interface.signature)
        except ValueError as exc:
            raise codec.InvalidInput(str(exc)) from None
        batching.check_rows(arrays)
        outputs = await batcher.submit(arrays)
        if media == codec.ARROW_TYPE:
            return [(b"content-type", media.encode())], codec.encode_arrow(outputs, interface.outputs)
        return [*_JSON], codec.encode_json(outputs)

    def _batcher(self, settings: Settings, model_id: str, interface: codec.Interface) -> batching.Batcher:
        """A batcher of the requests to `model_id`; those of models no longer served go."""
        served = {s.model_id for s in settings.models.values()}
        for old in [m for m in self._batchers if m not in served]:
            del self._batchers[old]

        def run(batch: list[Any]) -> list[Any]:
            if interface.takes_values:
                return self._call(model_id, batching.values_batch, interface, batch)
            joined, rows = batching.join_arrays(batch)
            return batching.split_rows(self._call(model_id, codec.run_arrays, interface.outputs, *joined), rows)

        assert settings.max_batch_size is not None
        return batching.Batcher(run, settings.max_batch_size, settings.batch_wait_timeout_s)

    async def _hold(self, name: str, scope: dict[str, Any]) -> Served:
        """Model `name` as loaded in this interpreter, counted as begun for this request (until `app` ends it) so
        that the host drops it only once the request is answered. A model the replica has not
        loaded is asked for (WANTED), and waited for, while this interpreter serves its other connections."""
        since = time.monotonic_ns()
        deadline = time.monotonic() + self.settings.load_timeout_s
        while True:
            served = self.settings.models[name]
            if served.model_id is not None:
                self.begun[served.model_id] = self.begun.get(served.model_id, 0) + 1
                # Seen again once counted: the host takes a model out of the settings before it counts the
                # requests on it, so a model still here now is dropped only after this request.
                if self.settings.models[name].model_id == served.model_id:
                    scope["tenfold.model"] = served
                    self.block[HELD_BASE + served.index] += 1
                    self.block[USED_BASE + served.index] = time.monotonic_ns()
                    return served
                self.begun[served.model_id] -= 1
                continue
            if served.error is not None and served.error[1] >= since:
                raise codec.HTTPError(f"model {name!r} could not be loaded on this replica: {served.error[0]}",
                                      status=503, kind="ModelUnavailable")
            if time.monotonic() > deadline:
                raise codec.HTTPError(f"model {name!r} was not loaded within {self.settings.load_timeout_s:g} s",
                                      status=503, kind="ModelUnavailable", headers={"Retry-After": "1"})
            word, bit = divmod(served.index, MODEL_BITS)
            self.block[WANTED_BASE + word] |= 1 << bit
            await asyncio.sleep(0.005)

    def _open_stream(self, model_id: str, interface: codec.Interface, body: bytes, events: bool
                     ) -> tuple[list, _Stream]:
        """A streaming model's iterator on this request, and its first item: bad inputs, and a model that fails
        before its first item, are answered with their status."""
        encode = codec.encode_event if events else codec.encode_line
        iterator = self._call(model_id, codec.open_json, body, interface)
        try:
            first = self._call(model_id, _step, iterator, encode)
        except BaseException:
            self._apply(model_id, _close, iterator)
            raise
        media = codec.EVENT_STREAM_TYPE if events else codec.NDJSON_TYPE
        return ([(b"content-type", media.encode()), (b"cache-control", b"no-cache")],
                _Stream(model_id, iterator, first, encode, events))

    def _call(self, model_id: str, fn: Any, *args: Any) -> Any:
        """The model's answer, computed right here on the server's thread: this interpreter does nothing else
        meanwhile, and the other interpreters take the other connections."""
        block = self.block
        with self._interrupt_lock:
            block[SEQ] += 1
            seq = block[SEQ]
            started = block[CURRENT_NS] = time.monotonic_ns()
        try:
            try:
                return self._apply(model_id, fn, *args)
            finally:
                with self._interrupt_lock:
                    block[CURRENT_NS] = 0
                    block[BUSY_NS] += time.monotonic_ns() - started
                    if self._interrupted == seq:  # raised, or still pending as the call returned: spare the rest
                        raise_in_thread(self._serving_thread, None)
        except codec.HTTPError:
            raise
        except TimeoutError as exc:
            if self._interrupted == seq:
                raise routes.classify(routes.timed_out(self.settings.request_timeout_s or 0.0)) from None
            raise routes.model_error(exc) from None
        except Exception as exc:  # noqa: BLE001 - the model's: a 500 with its type, and the server goes on
            _logger.debug("the model raised %s", type(exc).__name__, exc_info=exc)
            raise routes.model_error(exc) from None


#: Serve's proxy takes its multiplexing header with underscores or dashes: so does this server.
_MODEL_HEADERS = (routes.MODEL_HEADER.encode(), routes.MODEL_HEADER.replace("_", "-").encode())


def _header(scope: dict[str, Any], names: tuple[bytes, ...]) -> str | None:
    for header, value in scope["headers"]:
        if header in names:
            return value.decode("latin-1")
    return None


@dataclass
class _Stream:
    """A streaming answer in progress: its model, the model's iterator, its first item (encoded), and how to
    encode."""

    model_id: str
    iterator: Any
    first: bytes | None
    encode: Any
    events: bool


_END = object()


def _step(model: Any, iterator: Any, encode: Any) -> bytes | None:
    """The next item of `iterator`, encoded; None once it is exhausted."""
    item = next(iterator, _END)
    return None if item is _END else encode(item)


def _close(model: Any, iterator: Any) -> None:
    close = getattr(iterator, "close", None)
    if close is not None:
        close()  # GeneratorExit at the generator's yield: its finally blocks run


class _Acceptor:
    """Takes connections from the shared listening socket one at a time, and leaves each to the interpreter
    with the fewest open connections among those free to take it.

    Every interpreter's loop is woken by a new connection. An interpreter running a call is not: it takes
    none meanwhile. Among the others, one that holds more active connections (a request in the last second,
    or accepted and not yet asked) than an idle peer leaves the connection to that peer, looking again every
    millisecond for up to MAX_DEFER_S (and then takes it if the peer has not), so that keep-alive connections,
    which stay with the interpreter that accepted them, spread evenly, and no interpreter sits idle while
    another has several clients."""

    DEFER_S = 0.001
    # Why more than one look: on a loaded machine the idle peer's thread may not run within a millisecond, and
    # a connection it misses stays with the busier interpreter for as long as the client keeps it open.
    MAX_DEFER_S = 0.005

    def __init__(self, server: _Server) -> None:
        import functools

        self.server, self.sock = server, server.sock
        self.loop = asyncio.get_running_loop()
        u = server.uvicorn
        protocol: Any = u.config.http_protocol_class
        self.factory = functools.partial(protocol, config=u.config, server_state=u.server_state,
                                         app_state=u.lifespan.state)
        self.peers = (ctypes.c_int64 * PEERS).from_address(server.settings.peers)
        self.own = ctypes.addressof(server.block)
        self.stopped = False
        self.deferred_since = 0.0  # when this interpreter first left the waiting connection to a peer
        self.loop.add_reader(self.sock.fileno(), self._ready)

    def stop(self) -> None:
        if not self.stopped:
            self.stopped = True
            self.loop.remove_reader(self.sock.fileno())

    def _resume(self) -> None:
        if not self.stopped and not self.server.uvicorn.should_exit:
            if not select.select([self.sock], [], [], 0)[0]:
                self.deferred_since = 0.0  # a peer took the connection: the next one starts a deferral afresh
            self.loop.add_reader(self.sock.fileno(), self._ready)

    def _ready(self) -> None:
        if self.server.uvicorn.should_exit:
            self.stop()
            return
        now = time.monotonic()
        if self._defer() and (not self.deferred_since or now - self.deferred_since < self.MAX_DEFER_S):
            self.deferred_since = self.deferred_since or now
            self.loop.remove_reader(self.sock.fileno())
            self.loop.call_later(self.DEFER_S, self._resume)
            return
        self.deferred_since = 0.0
        try:
            conn, _ = self.sock.accept()
        except (BlockingIOError, InterruptedError):
            return  # another interpreter took it
        except OSError:
            _logger.exception("accepting a connection failed")
            return
        # Counted at once: the protocol is made on a later turn of the loop, and a second connection waiting
        # now must see this one.
        self.server.block[ACTIVE] += 1
        conn.setblocking(False)
        if conn.family in (socket.AF_INET, socket.AF_INET6):
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.loop.create_task(self.loop.connect_accepted_socket(self.factory, conn))

    def _defer(self) -> bool:
        mine = self.server.block[ACTIVE]
        for address in self.peers:
            if address and address != self.own:
                peer = (ctypes.c_int64 * FIELDS).from_address(address)
                if peer[STATE] == SERVING and not peer[STOP] and not peer[CURRENT_NS] and peer[ACTIVE] < mine:
                    return True
        return False


async def _read_body(receive: Any, limit: int) -> bytes:
    chunks, size, more = [], 0, True
    while more:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise codec.MalformedRequest("the client went away before sending the whole body")
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise routes.too_large(limit)
        chunks.append(chunk)
        more = message.get("more_body", False)
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


# -- the connection protocol: uvicorn's, with a read deadline and a gentler drain ----------------------


def _protocol(server: _Server) -> type:
    """uvicorn's httptools protocol, plus: a request's headers and body must arrive within read_timeout_s
    (else 408 and the connection closes, so a slow client never holds the interpreter); open connections are
    counted into the block; and when draining, idle keep-alive connections get a moment for one last request,
    answered with `Connection: close`, rather than being closed under a client that is about to send."""
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    settings, block = server.settings, server.block
    timeout_body = codec.HTTPError(
        f"the request did not arrive within {settings.read_timeout_s:g} s", status=408, kind="RequestTimeout").body()
    timeout_response = (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\nconnection: close\r\n"
                        b"content-length: " + str(len(timeout_body)).encode() + b"\r\n\r\n" + timeout_body)

    class Protocol(HttpToolsProtocol):
        draining = False
        _read_timer: Any = None

        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            self.last_active = time.monotonic()
            block[CONNECTIONS] += 1  # (ACTIVE was counted at accept; the watchdog recounts it)
            # Past this interpreter's share of max_ongoing_requests + max_queued_requests, a connection's request
            # is answered 503 with Retry-After, and the connection closed.
            self.admitted = settings.max_connections is None or block[CONNECTIONS] <= settings.max_connections

        def connection_lost(self, exc: Exception | None) -> None:
            block[CONNECTIONS] -= 1
            self._stop_read_timer()
            super().connection_lost(exc)

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self.scope["tenfold.admitted"] = self.admitted  # type: ignore[typeddict-unknown-key]
            self.last_active = time.monotonic()
            self._read_timer = self.loop.call_later(settings.read_timeout_s, self._read_timed_out)

        def on_headers_complete(self) -> None:
            super().on_headers_complete()
            if Protocol.draining and self.cycle is not None:
                self.cycle.keep_alive = False

        def on_message_complete(self) -> None:
            self._stop_read_timer()
            super().on_message_complete()

        def _stop_read_timer(self) -> None:
            if self._read_timer is not None:
                self._read_timer.cancel()
                self._read_timer = None

        def _read_timed_out(self) -> None:
            self._read_timer = None
            if self.transport.is_closing():
                return
            if self.cycle is None or self.cycle.response_complete or not self.cycle.response_started:
                self.transport.write(timeout_response)
                block[REQUESTS] += 1
                block[ERRORS] += 1
                block[_STATUS_INDEX[408]] += 1
            self.transport.close()

        def shutdown(self) -> None:
            if self.cycle is None or self.cycle.response_complete:
                # Idle: a request may be on its way; it is answered, with Connection: close, if it comes soon.
                self.loop.call_later(0.5, self._close_if_idle)
            else:
                self.cycle.keep_alive = False

        def _close_if_idle(self) -> None:
            if (self.cycle is None or self.cycle.response_complete) and not self.transport.is_closing():
                self.transport.close()

    return Protocol


