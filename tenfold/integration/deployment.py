"""The Serve deployment: one replica, one InterpreterPool, one model replicated into every interpreter.

Every method is `async`: Serve runs sync methods on short-lived worker threads, and a thread that
entered an interpreter must never exit (pitfall 5 in docs/runtime-pitfalls.md). Work reaches the interpreters
only through the pool, which enqueues it for each interpreter's own long-lived owner thread. A JSON
request is decoded, run and encoded inside an interpreter (`ReplicatedModel.apply`), so the replica's
one host thread, which serves every interpreter, only moves bytes.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import logging
import os
import time
from collections.abc import AsyncGenerator, AsyncIterator, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import ray
from ray import serve
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from tenfold.packaging import ModelStream
from tenfold.packaging.replicated import prepare_interpreter
from tenfold.runtime import (
    InterpreterLost,
    InterpreterPool,
    MemoryInUse,
    PoolStats,
    bound_free_heap,
    release_and_measure,
    remote_traceback,
)

from . import archive_cache, batching, catalog, codec, logs, openapi, policy, routes, updates
from ._server import Served
from .archive_cache import ArchiveLocator
from .catalog import Catalog
from .config import AppArgs, ModelsUpdate, ModelUpdate
from .dataplane import DataPlane
from .metrics import ReplicaMetrics
from .routes import RequestTimeout

_logger = logging.getLogger("ray.serve")
#: The status counted for a request whose caller gave up on it (nginx's "client closed request").
_CANCELLED = 499


class TenfoldModel:
    """Serves one torch.package archive, or several by name, from `interpreters` interpreters of this replica's
    process.

    Callers: `handle.remote(*inputs)` takes the model's positional inputs as Python values (tensors, arrays or
    nested lists for tensor inputs) and returns its result; HTTP `POST /` takes JSON (or Arrow IPC for tensor
    models, see `tenfold.integration.codec`); `GET /-/manifest` returns the manifest, `GET /-/openapi.json` the
    OpenAPI document of `POST /`, and `GET /-/stats` the interpreters' figures. An application of several archives
    (a `Catalog`) serves each at `/{name}`, or at `/` for requests that name it in Serve's multiplexing header
    (`handle.options(multiplexed_model_id=name)` for handles), and loads it on the first request for it.
    """

    def __init__(self, archive: ArchiveLocator | Catalog, args: dict[str, Any], workdir: str | None = None) -> None:
        started = time.perf_counter()
        logs.install()
        bound_free_heap()  # the host's malloc too (pitfall 16): bodies pass through it on Serve's route
        self._args = AppArgs.model_validate(args)
        self._catalog = archive if isinstance(archive, Catalog) else None
        self._workdir = workdir
        self._updates = 0
        self._refused: dict[str, Any] | None = None  # the last update this replica refused, and why
        self._retiring: list[updates.ModelVersion] = []  # versions replaced or unloaded, dropped once unused
        self._updating = asyncio.Lock()
        self._leases: collections.Counter[str] = collections.Counter()  # model id -> requests holding it
        self._batchers: dict[str, Any] = {}  # model id -> Serve's batcher of requests to it
        self._held: dict[str, catalog.Held] = {}  # several archives: those loaded, by name
        self._wanted: set[str] = set()  # several archives: those loading for requests on http_port
        # several archives: held by a model's load, unload or update (each waits for the one in progress)
        self._model_locks: collections.defaultdict[str, asyncio.Lock] = collections.defaultdict(asyncio.Lock)
        self._used_at: dict[str, float] = {}  # several archives: when each was last asked for, on Serve's route
        self._port_used_at: dict[str, float] = {}  # ... and on http_port
        self._closing = False
        try:
            self._loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()  # Serve's, for user code
        except RuntimeError:  # built outside a replica
            self._loop = None
        window = self._args.autoscaling.look_back_period_s if self._args.autoscaling else 10.0
        pool_args: dict[str, Any] = dict(
            backend=self._args.backend, threads_per_interpreter=self._args.threads_per_interpreter,
            utilization_window_s=window, replace_lost=self._args.replace_lost_interpreters,
            initializer=prepare_interpreter)  # torch imported while this thread gets the archive
        self._deployed: ArchiveLocator | None = None
        if isinstance(archive, Catalog):
            self._bound = {entry.name: entry for entry in archive}  # as the builder bound them (args' archives)
            if pending := _user_config():  # Serve calls reconfigure with it next: the models it names, checked now
                archive = self._catalog = self._start_with_updates(archive, ModelsUpdate.model_validate(pending))
            self._pool = InterpreterPool(self._args.replica_interpreters, **pool_args)
            self._version: updates.ModelVersion | None = None
            loaded = f"{len(archive)} models, each loaded on its first request"
            # Serve's multiplexing: its router prefers the replicas that hold a model, and it unloads the least
            # recently used one past max_models_per_replica. It takes a plain function (it keeps its cache on it).
            async def load(name: str) -> catalog.Held:
                return await self._load_held(name)

            self._multiplexed = serve.multiplexed(max_num_models_per_replica=self._args.max_models_per_replica or -1
                                                  )(load)
        else:
            self._deployed = archive
            self._version = self._start_with(archive, pool_args)
            loaded = f"archive from {self._version.archive.origin}"
        _logger.info("tenfold replica ready in %.2f s: %d interpreters, %s", time.perf_counter() - started,
                     self._pool.size, loaded)
        self._metrics = ReplicaMetrics()
        self._ping: asyncio.Future | None = None
        self._heaps: dict[int, int] = {}  # each interpreter's heap in use at the last ping
        self._memory: dict[str, Any] = {}  # what the last ping measured (see _memory_body)
        self._losses: dict[int, int] = {}  # losses counted per place
        self._lost_bytes = 0
        self._recycling: str | None = None
        self._calls_at_last_check = -1
        self._dataplane: DataPlane | None = None
        if self._args.http_port is not None:
            try:
                several = self._catalog is not None
                self._dataplane = DataPlane(
                    self._pool, self._served_models(), self._args, owner=serve.get_replica_context().app_name,
                    **self._documents(), stats=self._stats_body,
                    metrics=self._metrics, window_s=window, wanted=self._port_wants if several else None,
                    used=self._port_used if several else None,
                )
            except BaseException:
                self._close()
                raise
            _logger.info("tenfold replica serves port %d from its %d interpreters", self._dataplane.port,
                         self._pool.size)

    def _start_with(self, archive: ArchiveLocator, pool_args: dict[str, Any]) -> updates.ModelVersion:
        """Start the pool and load the application's one archive (or the one its user_config names) into it."""
        started = time.perf_counter()
        # Serve calls reconfigure(user_config) right after this: a replica started with one loads its archive now,
        # not the application's first. One that fails to is refused (Serve reports its error).
        pending = _user_config()
        if pending:
            archive = updates.locate(ModelUpdate.model_validate(pending), workdir=self._workdir, deployed=archive)
        # The interpreters start (one core each) while this thread maps or fetches the archive.
        with ThreadPoolExecutor(1, thread_name_prefix="tenfold-start") as starter:
            starting = starter.submit(InterpreterPool, self._args.replica_interpreters, **pool_args)
            try:
                # A user_config's archive that is not the file pinned is the update's error, not a changed file.
                resolved_archive = (updates.resolve if pending else archive_cache.resolve)(archive)
            except BaseException:
                with contextlib.suppress(Exception):
                    starting.result().shutdown(wait=True)
                raise
            resolved = time.perf_counter()
            try:
                self._pool = starting.result()
            except BaseException:
                archive_cache.release(resolved_archive)
                raise
        pooled = time.perf_counter()
        try:
            if pending:  # checked here as the builder checks the application's archive (it releases it on failure)
                version = updates.load_version(self._pool, archive, self._args, resolved=resolved_archive)
            else:
                # Verified against the digest bound at deploy time by resolve(): not hashed again.
                version = updates.replicate_version(self._pool, archive, resolved_archive)
        except BaseException:
            self._pool.shutdown(wait=True)
            raise
        _logger.info("tenfold replica: archive from %s in %.2f s, %d interpreters with torch in %.2f s, model "
                     "loaded in %.2f s", version.archive.origin, resolved - started, self._pool.size,
                     pooled - started, time.perf_counter() - pooled)
        return version

    def _start_with_updates(self, models: Catalog, update: ModelsUpdate) -> Catalog:
        """Serve the archives a user_config names for models of `models` (each checked, as an update is; a replica
        that cannot is refused, and Serve reports why). None is loaded yet."""
        for name, model in update.archives.items():
            entry = models.entry(name)
            locator = updates.locate(model, workdir=self._workdir, deployed=entry.locator)
            if locator.sha256 != entry.locator.sha256:
                # Mapped again by the model's first request.
                models = models.replaced(name, locator, updates.check_version(locator, self._args))
        return models

    # -- the versions served -------------------------------------------------------------------

    async def _serving(self, name: str = "") -> updates.ModelVersion:
        """The version serving model `name` ("" in an application of one archive), loaded first if it is not.
        Take a `_lease` on it before the next await."""
        if self._catalog is None:
            assert self._version is not None
            return self._version
        held = await self._multiplexed(name)
        self._used_at[name] = time.time()
        return held.version  # the one serving now (an update swaps it)

    @contextlib.contextmanager
    def _lease(self, version: updates.ModelVersion) -> Iterator[None]:
        """Keep `version` from being dropped while a request holds it (from its route to its answer)."""
        key = version.model.model_id
        self._leases[key] += 1
        try:
            yield
        finally:
            self._leases[key] -= 1
            if not self._leases[key]:
                del self._leases[key]

    def _still_used(self, model_id: str) -> int:
        """Requests that hold model `model_id`: on Serve's route and handles, and on http_port."""
        return self._leases.get(model_id, 0) + (0 if self._dataplane is None else
                                                self._dataplane.requests_on(model_id))

    def _holding(self, name: str, version: updates.ModelVersion) -> int:
        """Requests that hold model `name`, as `version`, now (read without asking the interpreters, which may be
        busy: this runs on the event loop)."""
        port = 0
        if self._dataplane is not None and self._catalog is not None:
            port = self._dataplane.holding(self._catalog.entry(name).index)
        return self._leases.get(version.model.model_id, 0) + port

    def _versions(self) -> list[updates.ModelVersion]:
        """The versions this replica serves now."""
        if self._catalog is not None:
            return [held.version for held in list(self._held.values())]
        return [v for v in [self._version] if v]

    def _retire(self, version: updates.ModelVersion) -> None:
        """Drop `version` once no request holds it (see `updates.retire`)."""
        self._retiring.append(version)

        def done(v: updates.ModelVersion) -> None:
            self._retiring.remove(v)
            self._batchers.pop(v.model.model_id, None)

        updates.retire(version, still_used=self._still_used, grace_s=self._args.graceful_shutdown_timeout_s,
                       done=done)

    def _served(self, version: updates.ModelVersion) -> Served:
        """How the servers on http_port serve an application's one model, as `version`."""
        return Served(version.model.model_id, version.interface)

    def _served_models(self) -> dict[str, Served]:
        if self._catalog is None:
            assert self._version is not None
            return {"": self._served(self._version)}
        return {e.name: self._declared(e) for e in self._catalog}

    def _declared(self, entry: catalog.Entry, version: updates.ModelVersion | None = None,
                  error: tuple[str, int] | None = None) -> Served:
        """How the servers on http_port serve model `entry` of several: loaded as `version`, or not loaded."""
        return Served(None if version is None else version.model.model_id, codec.Interface.of(entry.manifest),
                      entry.index, codec.json.dumps(entry.body()).encode(),
                      codec.json.dumps(openapi.document(entry.manifest, title=entry.name, sha256=entry.locator.sha256)
                                       ).encode(), error)

    # -- several archives: loaded on first use, the least recently used unloaded -----------------

    async def _load_held(self, name: str) -> catalog.Held:
        """Load model `name` into every interpreter (Serve's multiplexing calls this for a model it does not hold,
        one at a time). A model that cannot be loaded is a 503 that says why; the next request tries again."""
        async with self._model_locks[name]:  # an update of the model waits, and is waited for
            return await self._load_held_now(name)

    async def _load_held_now(self, name: str) -> catalog.Held:
        assert self._catalog is not None
        entry = self._catalog.entry(name)
        t0 = time.perf_counter()
        try:
            version = await asyncio.to_thread(self._load_entry, entry)
        except Exception as exc:  # noqa: BLE001 - said to the caller, and to those waiting on http_port
            reason = f"{type(exc).__name__}: {exc}"
            _logger.error("tenfold replica could not load model %r from %s: %s", name, entry.locator.describe(),
                          reason)
            if self._dataplane is not None:
                await asyncio.to_thread(self._dataplane.serve, name,
                                        self._declared(entry, error=(reason, time.monotonic_ns())))
            raise codec.HTTPError(f"model {name!r} could not be loaded on this replica: {reason}", status=503,
                                  kind="ModelUnavailable") from exc

        async def unload() -> None:
            await self._unload(name, held)

        held = self._held[name] = catalog.Held(version, unload)
        _logger.info("tenfold replica loaded model %r (%s) into %d interpreters in %.2f s (%d of %s held)", name,
                     entry.locator.describe(), self._pool.size, time.perf_counter() - t0, len(self._held),
                     self._args.max_models_per_replica or len(self._catalog))
        return held

    def _load_entry(self, entry: catalog.Entry) -> updates.ModelVersion:
        """Model `entry`, loaded into every interpreter at once (on a worker thread); http_port serves it once
        this returns."""
        version = updates.replicate_version(self._pool, entry.locator, archive_cache.resolve(entry.locator))
        if self._dataplane is not None:
            try:
                self._dataplane.serve(entry.name, self._declared(entry, version))
            except BaseException:
                updates.drop(version)
                raise
        return version

    async def _unload(self, name: str, held: catalog.Held) -> None:
        """Serve unloads model `name` (the least recently used, past max_models_per_replica): no new request
        gets it, and it is dropped from every interpreter once the requests on it end."""
        if self._held.get(name) is held:
            del self._held[name]
        if self._closing:
            return
        assert self._catalog is not None
        async with self._model_locks[name]:  # an update of it in progress ends first (on the version it swaps in)
            if self._dataplane is not None and name not in self._held:  # (not loaded again meanwhile)
                await asyncio.to_thread(self._dataplane.serve, name, self._declared(self._catalog.entry(name)))
            _logger.info("tenfold replica unloads model %r (%s): the least recently used of %d", name,
                         held.version.locator.describe(), (self._args.max_models_per_replica or 0) + 1)
            self._retire(held.version)

    def _port_wants(self, name: str) -> None:
        """Requests on http_port wait for model `name`, which this replica does not hold (the data plane's
        watcher thread calls this): load it."""
        if self._loop is not None and not self._closing:
            asyncio.run_coroutine_threadsafe(self._want(name), self._loop)

    async def _want(self, name: str) -> None:
        if name in self._held or name in self._wanted:
            return
        self._wanted.add(name)
        try:
            await self._serving(name)
        except Exception:  # noqa: BLE001 - logged, and told to the requests waiting (see _load_held)
            pass
        finally:
            self._wanted.discard(name)

    def _port_used(self, used: dict[str, float]) -> None:
        """Requests on http_port used these models lately, last at these times (the data plane's watcher thread
        calls this, a quarter second late at most): they count as used then for Serve's multiplexing too."""
        if self._loop is not None and not self._closing:
            asyncio.run_coroutine_threadsafe(self._port_touched(used), self._loop)

    async def _port_touched(self, used: dict[str, float]) -> None:
        for name, at in used.items():
            self._port_used_at[name] = max(at, self._port_used_at.get(name, 0.0))
        # Serve's multiplexing keeps the order in which models were last asked for, and can only move one to the
        # end: every model held is asked for again, in the order of its last use on either route. (Held: each
        # comes back at once, loading nothing.)
        for name in sorted(self._held, key=self._last_used):
            await self._multiplexed(name)

    def _last_used(self, name: str) -> float:
        """When model `name` was last used, on Serve's route and handles or on http_port (time.time())."""
        return max(self._used_at.get(name, 0.0), self._port_used_at.get(name, 0.0))

    # -- updates without a restart ---------------------------------------------------------------

    async def reconfigure(self, config: dict[str, Any] | None) -> None:
        """Serve's `user_config` (see `ModelUpdate`; for several archives `ModelsUpdate`, see `_update_models`):
        serve the archive it names, loaded into this replica's running interpreters, one at a time while the others
        serve. Calls begun on the old version end on it.

        An update that fails its checks (a digest that does not match, a corrupt archive, a model that does not
        load, batching it cannot do) leaves the old version serving: it is logged as an error and reported by
        `/-/manifest` and `/-/stats`. It is not raised: Serve would stop this replica for it, and start one that
        fails the same way."""
        if config and self._catalog is not None:
            await self._update_models(config)
            return
        if not config or self._version is None or self._deployed is None:
            return  # no user_config: the application's archive
        async with self._updating:
            try:
                locator = updates.locate(ModelUpdate.model_validate(config), workdir=self._workdir,
                                         deployed=self._deployed)
            except ValueError as exc:
                self._refuse(str(config.get("archive")), None, exc)
                return
            if locator.sha256 == self._version.locator.sha256:
                return  # served already (a replica started with it, or an update of another field)
            t0 = time.perf_counter()
            try:
                version = await asyncio.to_thread(self._load, locator)
            except Exception as exc:  # noqa: BLE001 - refused: the old version goes on serving
                self._refuse(locator.source.describe(), locator.sha256, exc)
                return
            old, self._version = self._version, version  # one store on the event loop: the next request is on it
            self._updates += 1
            self._refused = None
            self._retire(old)
            _logger.info("tenfold replica now serves %s (%s), loaded in place in %.2f s; the previous version (%s) "
                         "is dropped once its calls end", locator.describe(), version.manifest.name,
                         time.perf_counter() - t0, old.locator.describe())

    def _load(self, locator: ArchiveLocator) -> updates.ModelVersion:
        """The new version, loaded and checked (on a worker thread); http_port serves it once this returns."""
        version = updates.load_version(self._pool, locator, self._args, rolling=True)
        if self._dataplane is not None:
            try:
                self._dataplane.serve("", self._served(version), **self._documents(version))
            except BaseException:
                updates.drop(version)
                raise
        return version

    async def _update_models(self, config: dict[str, Any]) -> None:
        """The user_config of an application of several archives (`ModelsUpdate`): each model it names serves that
        archive from now on, and every other model its archive of `args` (as a replica started with this config
        does). A model held is loaded again into the running interpreters, one at a time while the others serve,
        and its calls begun on the old version end on it; a model not held is checked, and loads the new archive
        on its first request. A model whose update fails its checks keeps its archive."""
        assert self._catalog is not None
        async with self._updating:
            try:
                update = ModelsUpdate.model_validate(config)
                for name in update.archives:
                    self._catalog.entry(name)  # ModelNotFound, naming those served
            except (ValueError, LookupError) as exc:
                self._refuse("user_config", None, exc)
                return
            self._refused = None  # this config's refusals, if any, are said next
            for name in self._catalog.names:
                async with self._model_locks[name]:
                    await self._update_model(name, update.archives.get(name))

    async def _update_model(self, name: str, model: ModelUpdate | None) -> None:
        """Model `name` serves the archive of `model`, or with None its archive of `args`."""
        assert self._catalog is not None
        entry = self._catalog.entry(name)
        if model is None:
            locator = self._bound[name].locator
        else:
            try:
                locator = updates.locate(model, workdir=self._workdir, deployed=self._bound[name].locator)
            except ValueError as exc:
                self._refuse(model.archive, None, exc, name)
                return
        if locator.sha256 == entry.locator.sha256:
            return  # served already
        t0 = time.perf_counter()
        held = self._held.get(name)
        version: updates.ModelVersion | None = None
        try:
            if held is None:
                # Mapped again by the model's first request.
                manifest = await asyncio.to_thread(updates.check_version, locator, self._args)
            else:
                version = await asyncio.to_thread(updates.load_version, self._pool, locator, self._args,
                                                  rolling=True)
                manifest = version.manifest
        except Exception as exc:  # noqa: BLE001 - refused: the model keeps its archive
            self._refuse(locator.source.describe(), locator.sha256, exc, name)
            return
        updated = self._catalog.replaced(name, locator, manifest)
        if self._dataplane is not None:  # first: once Serve's route serves the new archive, http_port does too
            await asyncio.to_thread(self._dataplane.serve, name, self._declared(updated.entry(name), version),
                                    **self._documents(models=updated))
        # One step on the event loop: the next request, and /-/manifest, are on the new archive.
        self._catalog = updated
        self._updates += 1
        if version is not None and held is not None:
            # Unloaded meanwhile (Serve's unload waits for this update): it drops the new version, as it should.
            previous, held.version = held.version, version
            self._retire(previous)
        _logger.info("tenfold replica: model %r now serves %s (%s)%s in %.2f s; %s is dropped once its calls end",
                     name, locator.describe(), manifest.name, "" if version is None else ", loaded in place",
                     time.perf_counter() - t0, entry.locator.describe())

    def _refuse(self, archive: str, sha256: str | None, exc: BaseException, model: str | None = None) -> None:
        self._refused = {"archive": archive, "sha256": sha256, "error": f"{type(exc).__name__}: {exc}",
                         "at": time.time()}
        if model is not None:
            self._refused["model"] = model
        _logger.error("tenfold replica: %s", self._refused_message())

    # -- callers -------------------------------------------------------------------------------

    async def __call__(self, *inputs: Any, **named: Any) -> Any:
        """HTTP requests (a starlette Request) and handle calls (the model's inputs, by position or by name)."""
        if len(inputs) == 1 and not named and isinstance(inputs[0], Request):
            return await self._http(inputs[0])
        t0 = time.perf_counter()
        status: int | None = 200
        try:
            version = await self._serving(self._handle_model())
            if version.interface.streams:
                # An async generator: Serve iterates it for `handle.options(stream=True)`, and tells any other
                # caller to ask for a stream. It counts itself as it ends.
                stream = self._handle_stream(version, self._positional(version, inputs, named))
                status = None
                return stream
            with self._lease(version):
                return await self._infer(version, self._positional(version, inputs, named))
        except BaseException as exc:
            status = _CANCELLED if isinstance(exc, asyncio.CancelledError) else routes.classify(exc).status
            raise
        finally:
            if status is not None:
                self._metrics.observe_request("handle", time.perf_counter() - t0, status)

    def _handle_model(self) -> str:
        """The model a handle call is for: "" in an application of one archive, else the one it names with
        `handle.options(multiplexed_model_id=...)`."""
        if self._catalog is None:
            return ""
        name = serve.get_multiplexed_model_id()
        if not name:
            raise codec.ModelNotFound(f"this application serves several models: call handle.options("
                                      f"multiplexed_model_id=NAME) for one of {', '.join(self._catalog.names)}")
        return self._catalog.entry(name).name

    async def manifest(self) -> dict[str, Any]:
        """The archive's manifest, its sha256 and source, and this replica's interpreters (of several archives:
        the one named by multiplexed_model_id, else every one's)."""
        if self._catalog is not None and serve.get_multiplexed_model_id():
            return self._catalog.entry(serve.get_multiplexed_model_id()).body()
        return self._manifest_body()

    async def stats(self) -> dict[str, Any]:
        """This replica's figures (calls, errors, busy time, queue depth, utilization), http_port's included."""
        return self._stats_body()

    def _documents(self, version: updates.ModelVersion | None = None, *, models: Catalog | None = None
                   ) -> dict[str, bytes]:
        """The bodies of GET /-/manifest and /-/openapi.json as http_port serves them: of what is served, or of
        `version` or `models` (being swapped in)."""
        return {"manifest": codec.json.dumps(self._manifest_body(version, models=models)).encode(),
                "openapi": codec.json.dumps(self._openapi(version, models=models)).encode()}

    def _manifest_body(self, version: updates.ModelVersion | None = None, *, models: Catalog | None = None
                       ) -> dict[str, Any]:
        """GET /-/manifest: of what is served, or of `version` or `models` (being swapped in: an update more)."""
        replica = {"interpreters": self._pool.size, "backend": self._pool.backend, "pid": os.getpid(),
                   "node_id": ray.get_runtime_context().get_node_id()}
        if self._catalog is not None:
            described = models if models is not None else self._catalog
            return {**described.body(), **replica,
                    "max_models_per_replica": self._args.max_models_per_replica or len(described),
                    "updates": self._updates + (models is not None),
                    "refused_update": self._refused}
        v = version or self._version
        assert v is not None
        return {
            "manifest": v.manifest.model_dump(mode="json"),
            "sha256": v.locator.sha256,
            "source": v.locator.source.describe(),
            "archive_from": v.archive.origin,
            **replica,
            "serving_since": v.since,
            # In place, since this replica started (a version being swapped in counts: its body is sent as it is).
            "updates": self._updates + (version is not None),
            "refused_update": self._refused,
        }

    def _stats_body(self) -> dict[str, Any]:
        body = {**self._pool_stats().as_dict(), "pid": os.getpid()}
        if self._catalog is not None:
            body["models"] = {name: self._model_stats(name, held.version) for name, held in list(self._held.items())}
        if self._dataplane is not None:
            connections = self._dataplane.connections()
            body["http_port"] = {"port": self._dataplane.port, "connections_open": connections["open"],
                                 "connections_active": connections["active"],
                                 "model_calls": self._dataplane.model_calls()}
        if self._memory:
            # Measured at the last health check, between calls: what a soak judges leaks by.
            body["memory_in_use"] = self._memory
        warnings = [m for m in (*(v.watch.message for v in self._versions()), self._refused_message())
                    if m is not None]
        if warnings:
            body["warnings"] = warnings
        return body

    def _model_stats(self, name: str, v: updates.ModelVersion) -> dict[str, Any]:
        return {"sha256": v.locator.sha256, "archive_from": v.archive.origin, "loaded_at": v.since,
                "used_at": self._last_used(name), "requests": self._holding(name, v)}

    def _refused_message(self) -> str | None:
        if self._refused is None:
            return None
        if self._catalog is not None:
            name = self._refused.get("model")
            serving = "every model keeps its archive" if name is None else \
                f"model {name!r} goes on serving {self._catalog.entry(name).locator.describe()}"
        else:
            assert self._version is not None
            serving = f"{self._version.locator.describe()} goes on serving"
        return f"the update to {self._refused['archive']} was refused, and {serving}: {self._refused['error']}"

    def _pool_stats(self) -> PoolStats:
        stats = self._pool.stats()
        return stats if self._dataplane is None else self._dataplane.merge(stats)

    def _openapi(self, version: updates.ModelVersion | None = None, *, models: Catalog | None = None
                 ) -> dict[str, Any]:
        if self._catalog is not None:
            models = models if models is not None else self._catalog
            return models.openapi(title=self._args.name or catalog.DEFAULT_NAME)
        v = version or self._version
        assert v is not None
        return openapi.document(v.manifest, title=self._args.name or v.manifest.name, sha256=v.locator.sha256)

    def _health(self) -> dict[str, Any]:
        stats = self._pool_stats()
        return {"status": "ok", "interpreters": stats.size, "healthy": stats.healthy, "pid": os.getpid()}

    async def threads(self) -> dict[str, Any]:
        """This replica's pid and the native ids of the threads its interpreters serve http_port on: what a
        profiler needs to split the process's CPU time between the host and the interpreters."""
        return {"pid": os.getpid(), "interpreter_threads": [] if self._dataplane is None else
                self._dataplane.threads()}

    # -- Serve hooks ---------------------------------------------------------------------------

    async def record_autoscaling_stats(self) -> dict[str, float]:
        """What `tenfold.integration.policy` scales on: utilization, pending calls, live interpreters."""
        stats = self._pool_stats()
        self._metrics.observe_pool(stats)
        return {
            policy.UTILIZATION: float(stats.utilization),
            policy.QUEUE_DEPTH: float(stats.queue_depth),
            policy.INTERPRETERS: float(stats.healthy),
        }

    async def check_health(self) -> None:
        """Fails when no interpreter is in service, when the HTTP servers on http_port are no longer watched, or
        when the interpreters neither answer a ping nor make progress."""
        if self._dataplane is not None:
            self._dataplane.check()
        for version in self._versions():
            version.watch.poll()  # one stat() of a local archive: was it packaged again at its path?
        stats = self._pool_stats()
        self._metrics.observe_pool(stats)
        if stats.healthy == 0:
            raise RuntimeError(f"none of the {stats.size} interpreters of this replica is in service")
        if (reason := self._recycle_reason(stats)) is not None:
            if self._recycling is None:
                _logger.warning("tenfold replica recycles: %s; its health check fails from now on, so that Serve "
                                "drains it and starts a fresh process", reason)
            self._recycling = reason
        if self._recycling is not None:
            raise RuntimeError(f"this replica recycles: {self._recycling}")
        progressed = stats.calls != self._calls_at_last_check
        self._calls_at_last_check = stats.calls
        if self._ping is None or self._ping.done():
            if self._ping is not None and not self._ping.cancelled():
                self._ping.exception()  # read, so that one that failed after a check stopped waiting is not logged
            # A worker thread of the event loop waits for the answers; the pings themselves run on the
            # interpreters' owner threads, queued behind any calls already there.
            self._ping = asyncio.ensure_future(asyncio.to_thread(self._ping_and_release))
        try:
            await asyncio.wait_for(asyncio.shield(self._ping), timeout=self._args.health_check_timeout_s / 2)
        except asyncio.TimeoutError:
            if not progressed:
                raise RuntimeError(
                    f"the interpreters answered no ping within {self._args.health_check_timeout_s / 2:g} s "
                    "and completed no call since the last check"
                ) from None

    def _ping_and_release(self) -> None:
        """Ping every interpreter, give back the memory that large requests left free in each malloc, the
        interpreters' and the host's, and note each interpreter's heap (what it would take with it if lost)."""
        futures = {}
        for i in self._pool.stats().interpreters:
            if not i.lost:
                with contextlib.suppress(InterpreterLost):
                    futures[i.index] = self._pool.submit_to(i.index, release_and_measure)
        measured: dict[int, MemoryInUse] = {}
        for index, future in futures.items():
            with contextlib.suppress(InterpreterLost):  # lost meanwhile: the next check counts it
                measured[index] = future.result()
                self._heaps[index] = measured[index].heap_bytes
        host = release_and_measure()
        self._memory = {
            "measured_at": time.time(),
            "host": dataclasses.asdict(host),
            "interpreters": {str(i): dataclasses.asdict(m) for i, m in measured.items()},
            "interpreter_heap_bytes": sum(m.heap_bytes for m in measured.values()),
            "interpreter_python_blocks": sum(m.python_blocks for m in measured.values()),
        }

    def _recycle_reason(self, stats: PoolStats) -> str | None:
        """Why this replica should be replaced by a fresh process, if it should: a lost interpreter it cannot
        replace, or lost interpreters holding more than max_lost_memory_mb."""
        for i in stats.interpreters:
            losses = i.replaced + i.lost
            new = losses - self._losses.get(i.index, 0)
            if new > 0:  # each loss here took about the heap this place had at the last ping
                self._lost_bytes += new * self._heaps.pop(i.index, 0)
                self._losses[i.index] = losses
            if i.lost and i.replace_error and self._args.replace_lost_interpreters:
                return f"interpreter {i.index} was lost and cannot be replaced ({i.replace_error})"
        limit = self._args.max_lost_memory_mb
        if limit is not None and self._lost_bytes > limit * 2**20:
            return (f"its lost interpreters hold about {self._lost_bytes / 2**20:.0f} MB that can never be returned, "
                    f"more than max_lost_memory_mb ({limit:g})")
        return None

    def __del__(self) -> None:
        # Serve calls this on a graceful stop (scale-down, delete, shutdown): stop accepting on http_port and
        # drain the requests accepted there, drain the calls in flight, then park the interpreters.
        self._close()

    def _close(self) -> None:
        self._closing = True
        dataplane = getattr(self, "_dataplane", None)
        if dataplane is not None:
            if not dataplane.stop():
                _logger.warning("the HTTP servers on port %d did not all finish within http_drain_timeout_s",
                                dataplane.port)
        versions = [*getattr(self, "_retiring", []), *(self._versions() if hasattr(self, "_held") else [])]
        for version in versions:
            with contextlib.suppress(Exception):
                version.model.close()
        pool = getattr(self, "_pool", None)
        if pool is not None:
            pool.shutdown(wait=True)
        for version in versions:
            archive_cache.release(version.archive)

    # -- inference -----------------------------------------------------------------------------

    def _positional(self, version: updates.ModelVersion, inputs: tuple[Any, ...], named: dict[str, Any]
                    ) -> list[Any]:
        """The model's inputs in order, from a handle call's positional and named arguments."""
        if not named:
            return list(inputs)
        names = [s.name for s in version.manifest.inputs]
        twice = [n for n in names[:len(inputs)] if n in named]
        if twice:
            raise codec.InvalidInput(f"input {twice[0]!r} is given twice, by position and by name")
        rest = names[len(inputs):]
        missing, extra = [n for n in rest if n not in named], sorted(set(named) - set(rest))
        if missing or extra:
            raise codec.InvalidInput(f"inputs by name must be exactly {names}; missing {missing}, unexpected {extra}")
        return [*inputs, *(named[n] for n in rest)]

    async def _handle_stream(self, version: updates.ModelVersion, inputs: list[Any]) -> AsyncIterator[Any]:
        """The items of a streaming model's call, as Python values, each as soon as the model yields it."""
        t0 = time.perf_counter()
        status = 200
        try:
            with self._lease(version):
                try:
                    stream = version.model.stream(*inputs)
                except ValueError as exc:  # the inputs do not fit the model's signature
                    raise codec.InvalidInput(str(exc)) from None
            async for item in self._items(version, stream):
                yield item
        except BaseException as exc:
            status = (_CANCELLED if isinstance(exc, asyncio.CancelledError | GeneratorExit) else
                      routes.classify(exc).status)
            raise
        finally:
            self._metrics.observe_request("handle", time.perf_counter() - t0, status)

    async def _items(self, version: updates.ModelVersion, stream: ModelStream) -> AsyncGenerator[Any, None]:
        """Pull `stream`'s items from its interpreter one at a time; request_timeout_s bounds the wait for each.
        Closed (in its interpreter) however this ends; a pull still running when the caller goes is interrupted,
        so that the interpreter is free at once."""
        pending = None
        try:
            while True:
                pending = stream.next()
                done, item = await self._outcome(asyncio.wrap_future(pending), pending, version)
                pending = None
                if done:
                    return
                yield item
        finally:
            if pending is not None and not pending.done():
                asyncio.get_running_loop().run_in_executor(None, self._interrupt, version, pending)
            stream.close()

    async def _infer(self, version: updates.ModelVersion, inputs: list[Any]) -> Any:
        model = version.model
        batcher = self._batcher(version)
        if batcher is None:
            try:
                future = model.submit(*inputs)
            except ValueError as exc:  # the inputs do not fit the model's signature
                raise codec.InvalidInput(str(exc)) from None
            return await self._outcome(asyncio.wrap_future(future), future, version)
        try:
            model.check_inputs(inputs)
        except ValueError as exc:
            raise codec.InvalidInput(str(exc)) from None
        if version.interface.takes_values:  # one list in, a list out: checked at deploy and at each update
            return await self._infer_in_batch(version, batcher, inputs[0])
        batching.check_rows(inputs)
        # A batch is shared by several requests: one caller's deadline cannot stop it.
        return await self._outcome(asyncio.ensure_future(batcher(inputs)), None, version)

    def _batcher(self, version: updates.ModelVersion) -> Any:
        """Serve's batcher of the requests to `version`, if batching is on (one per version: each joins what its
        model takes, Python values or tensors)."""
        if self._args.max_batch_size is None or version.interface.streams:
            return None
        key = version.model.model_id
        batcher = self._batchers.get(key)
        if batcher is None:
            run = self._run_value_batch if version.interface.takes_values else self._run_batch

            async def run_batch(batch: list[Any]) -> list[Any]:
                return await run(version, batch)

            batcher = self._batchers[key] = serve.batch(
                max_batch_size=self._args.max_batch_size,
                batch_wait_timeout_s=self._args.batch_wait_timeout_s,
                max_concurrent_batches=self._args.replica_interpreters,
            )(run_batch)
        return batcher

    async def _outcome(self, call: asyncio.Future, future: Any, version: updates.ModelVersion) -> Any:
        """The result of `call`, or RequestTimeout past request_timeout_s (then `future`, the interpreter's
        call behind it if it serves this request alone, is interrupted). A cancelled request (its caller gone)
        leaves its call to run to its end."""
        timeout = self._args.request_timeout_s
        try:
            # Shielded, with or without a timeout: cancelling `call` would cancel `future`, which the pool then
            # fails to settle (concurrent.futures logs "exception calling callback" with an InvalidStateError).
            # Past the timeout the call is stopped by an interrupt below instead.
            return await asyncio.wait_for(asyncio.shield(call), timeout)
        except asyncio.CancelledError:
            # shield() stops watching `call` once cancelled: an exception it ends with would be logged by asyncio
            # as "Future exception was never retrieved".
            call.add_done_callback(_forget)
            raise
        except asyncio.TimeoutError:
            if timeout is None:  # raised by the call itself
                raise
            call.add_done_callback(_forget)
            if future is not None:
                # Off the event loop: the interrupt waits up to interrupt_grace_s for the interpreter.
                asyncio.get_running_loop().run_in_executor(None, self._interrupt, version, future)
            raise routes.timed_out(timeout) from None

    def _interrupt(self, version: updates.ModelVersion, future: Any) -> None:
        """Free the interpreter of a timed-out call: cancelled if queued, TimeoutError raised in it if
        running, the interpreter declared lost if it does not return (stuck in native code)."""
        try:
            version.model.interrupt(future, grace_s=self._args.interrupt_grace_s)
        except Exception:  # noqa: BLE001 - the caller has its 504 already; this must not go unseen
            _logger.exception("interrupting a timed-out call failed")
        self._metrics.observe_pool(self._pool.stats())

    async def _infer_in_batch(self, version: updates.ModelVersion, batcher: Any, items: Any) -> list[Any]:
        """A request's list of items, run in one call with the items of other requests; its results come back
        as one list, in order. Each request is checked here first, so that a bad one fails alone."""
        items = batching.check_items(version.interface, items)
        # A batch is shared by several requests: one caller's deadline cannot stop it.
        result = await self._outcome(asyncio.ensure_future(batcher(items)), None, version)
        if isinstance(result, batching.Failed):
            raise result.error
        return result

    async def _run_value_batch(self, version: updates.ModelVersion, batch: list[list[Any]]) -> list[Any]:
        """One model call on the items of several requests, joined in order, in an interpreter; the results split
        back (see `batching.run_values`)."""
        return await asyncio.wrap_future(version.model.apply(batching.values_batch, version.interface, batch))

    async def _run_batch(self, version: updates.ModelVersion, batch: list[list[Any]]) -> list[Any]:
        """One model call for several requests: inputs joined along dimension 0, outputs split back.

        Arrays (from HTTP) are joined with numpy and come back as numpy arrays, so that no tensor crosses
        into this process; tensors (from handle calls, which brought torch here) are joined as tensors."""
        if any(_is_tensor(v) for request in batch for v in request):
            rows = [int(request[0].shape[0]) for request in batch]
            joined = [_join_tensors([request[i] for request in batch]) for i in range(len(batch[0]))]
            result = await asyncio.wrap_future(version.model.submit(*joined))
        else:
            joined, rows = batching.join_arrays(batch)
            result = await asyncio.wrap_future(version.model.apply(codec.run_arrays, version.interface.outputs,
                                                                   *joined))
        return batching.split_rows(result, rows)

    # -- HTTP ----------------------------------------------------------------------------------

    async def _http(self, request: Request) -> Response:
        t0 = time.perf_counter()
        try:
            response = await self._route(request)
        except asyncio.CancelledError:  # the client hung up: no one to answer, nothing to log
            self._metrics.observe_request("http", time.perf_counter() - t0, _CANCELLED)
            raise
        except Exception as exc:
            error = routes.classify(exc)
            if error.status >= 500 and not isinstance(exc, codec.HTTPError | RequestTimeout) and \
                    remote_traceback(exc) is None:
                _logger.exception("request failed")  # ours, not the caller's nor the model's
            response = Response(error.body(), status_code=error.status, media_type=codec.JSON_TYPE,
                                headers=error.headers)
        self._metrics.observe_request("http", time.perf_counter() - t0, response.status_code)
        return response

    async def _route(self, request: Request) -> Response:
        models = self._catalog.names if self._catalog is not None else None
        route, name = routes.resolve(request.method, request.scope.get("path", "/"),
                                     request.scope.get("root_path", ""), models)
        if models is not None:
            name = routes.pick_model(route, name, serve.get_multiplexed_model_id() or None, models)
        if route == routes.PREDICT:
            version = await self._serving(name)
            with self._lease(version):  # from here to the answer: an update or an unload meanwhile waits for it
                return await self._predict(version, request)
        if name:  # of several archives: a model's own routes
            entry = self._catalog.entry(name) if self._catalog is not None else None
            assert entry is not None
            body = entry.body() if route == routes.MANIFEST else \
                openapi.document(entry.manifest, title=name, sha256=entry.locator.sha256)
        elif route == routes.OPENAPI:
            body = self._openapi()
        elif route == routes.MANIFEST:
            body = self._manifest_body()
        elif route == routes.STATS:
            body = self._stats_body()
        else:
            body = self._health()
        return Response(codec.json.dumps(body).encode(), media_type=codec.JSON_TYPE)

    async def _predict(self, version: updates.ModelVersion, request: Request) -> Response:
        interface = version.interface
        media = routes.media_type(request.headers.get("content-type"), interface)
        body = await _read_body(request, self._args.max_request_bytes)
        if interface.streams:
            return await self._stream_response(version, request, body)
        batcher = self._batcher(version)
        if batcher is not None and interface.takes_values:  # JSON only (media_type refuses Arrow for values)
            return Response(codec.encode_value(await self._infer(version, codec.parse_inputs(body, interface.inputs))),
                            media_type=codec.JSON_TYPE)
        if batcher is None:
            # Decoding, the call and encoding all happen in an interpreter: the host only moves bytes.
            predict = codec.predict_json if media == codec.JSON_TYPE else codec.predict_arrow
            future = version.model.apply(predict, body, interface)
            answer = await self._outcome(asyncio.wrap_future(future), future, version)
            return Response(answer, media_type=media)
        if media == codec.ARROW_TYPE:
            inputs = codec.decode_arrow(body, interface.inputs)
        else:
            inputs = codec.decode_json(body, interface.inputs)
        outputs = codec.as_arrays(await self._infer(version, list(inputs)), interface.outputs)
        if media == codec.ARROW_TYPE:
            return Response(codec.encode_arrow(outputs, interface.outputs), media_type=codec.ARROW_TYPE)
        return Response(codec.encode_json(outputs), media_type=codec.JSON_TYPE)

    async def _stream_response(self, version: updates.ModelVersion, request: Request, body: bytes) -> Response:
        """A streaming model's answer: newline-delimited JSON, or server-sent events when the client accepts
        them. The first item is awaited before the status is sent, so that bad inputs and a model that fails at
        once get their 4xx or 5xx; an error past it ends the stream with an error line or event."""
        events = routes.wants_events(request.headers.get("accept"))
        # Decoding, validation, the model's steps and each item's encoding all happen in one interpreter.
        stream = version.model.open_stream(codec.open_json, body, version.interface,
                                           encode=codec.encode_event if events else codec.encode_line)
        items = self._items(version, stream)
        try:
            first = await anext(items, None)
        except BaseException:
            await items.aclose()
            raise
        media = codec.EVENT_STREAM_TYPE if events else codec.NDJSON_TYPE
        return StreamingResponse(_chunks(first, items, events, request), media_type=media,
                                 headers={"cache-control": "no-cache"})


async def _chunks(first: bytes | None, items: AsyncGenerator[bytes, None], events: bool,
                  request: Request) -> AsyncIterator[bytes]:
    """A stream's body: its first item, then the others as they come, then an error chunk if it failed. A client
    that hangs up stops it at once, also while an item is awaited: the pull in progress is cancelled, and
    `items` interrupts it and closes the generator in its interpreter."""
    gone = asyncio.ensure_future(_disconnected(request))
    step: asyncio.Future | None = None
    try:
        if first is None:
            return
        yield first
        while True:
            step = asyncio.ensure_future(anext(items))
            await asyncio.wait((step, gone), return_when=asyncio.FIRST_COMPLETED)
            if not step.done():
                step.cancel()
                with contextlib.suppress(BaseException):
                    await step
                return
            try:
                chunk = step.result()
            except StopAsyncIteration:
                return
            yield chunk
    except Exception as exc:  # noqa: BLE001 - the status is sent: the error becomes the stream's last chunk
        error = routes.classify(exc)
        if error.status >= 500 and not isinstance(exc, codec.HTTPError | RequestTimeout) and \
                remote_traceback(exc) is None:
            _logger.exception("a stream failed")  # ours, not the caller's nor the model's
        yield codec.stream_error(error, events)
    finally:
        gone.cancel()
        if step is not None and not step.done():  # this was cancelled (Serve's caller went) while an item was awaited
            step.cancel()
            with contextlib.suppress(BaseException):
                await step
        await items.aclose()


async def _disconnected(request: Request) -> None:
    """Returns once the client has hung up (Serve delivers http.disconnect as an ASGI message)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _user_config() -> Any:
    """The user_config this replica was started with (Serve calls reconfigure with it once __init__ returns)."""
    try:
        config = getattr(serve.get_replica_context(), "_deployment_config", None)
    except Exception:  # noqa: BLE001 - not in a replica (a test building the class): none
        return None
    return getattr(config, "user_config", None)


async def _read_body(request: Request, limit: int) -> bytes:
    """The body, refused with 413 as soon as it is known to exceed `limit` bytes (never buffered past it)."""
    routes.check_declared_length(request.headers.get("content-length"), limit)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise routes.too_large(limit)
        chunks.append(chunk)
    return b"".join(chunks)


def _forget(future: asyncio.Future) -> None:
    if not future.cancelled():
        future.exception()  # read, so that asyncio does not log it as never retrieved


def _is_tensor(value: Any) -> bool:
    return type(value).__module__.startswith("torch") and hasattr(value, "detach")


def _join_tensors(values: Sequence[Any]) -> Any:
    import torch

    tensors = [v if _is_tensor(v) else torch.as_tensor(v) for v in values]
    return tensors[0] if len(tensors) == 1 else torch.cat(tensors)
