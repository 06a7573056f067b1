"""Model versions of a replica, and updates without a restart.

A replica serves one `ModelVersion` at a time: an archive's bytes, the model replicated from them into every
interpreter, and what its routes need. A deployment's `user_config` (`ModelUpdate`) names the archive to serve;
when a `serve deploy` changes only that, Serve calls the replica's `reconfigure`, which loads the new version into
the same interpreters (one at a time, while the others serve), checks it as the builder checks an archive, and
then swaps it in. Calls begun on the old version end on it; it is dropped once none is left (or after
`graceful_shutdown_timeout_s`), and its weights' memory goes with it.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass
from typing import Any

from tenfold.packaging import PinMismatch

from . import archive_cache, codec
from .archive_cache import ArchiveLocator, Resolved
from .config import AppArgs, ModelUpdate, check_model
from .sources import ArchiveSource

_logger = logging.getLogger("ray.serve")
_DRAIN_POLL_S = 0.1


@dataclass(frozen=True)
class ModelVersion:
    """What a replica serves: the archive (where it is, and its bytes) and the model loaded from it."""

    locator: ArchiveLocator
    archive: Resolved
    model: Any  # ReplicatedModel
    interface: codec.Interface
    watch: archive_cache.ChangeWatch
    since: float  # time.time() when it began serving

    @property
    def manifest(self) -> Any:
        return self.model.manifest


def serve_version(locator: ArchiveLocator, archive: Resolved, model: Any) -> ModelVersion:
    """A version made of an archive already resolved and its model already replicated."""
    return ModelVersion(locator, archive, model, codec.Interface.of(model.manifest),
                        archive_cache.ChangeWatch(locator, archive), time.time())


def replicate_version(pool: Any, locator: ArchiveLocator, archive: Resolved) -> ModelVersion:
    """`archive` (resolved: its digest checked) loaded into every interpreter of `pool` at once; released if that
    fails."""
    from tenfold.packaging import replicate

    try:
        model = replicate(pool, archive.buffer)
    except BaseException:
        archive_cache.release(archive)
        raise
    return serve_version(locator, archive, model)


def locate(update: ModelUpdate, *, workdir: str | None, deployed: ArchiveLocator) -> ArchiveLocator:
    """Where `update`'s archive is: a relative path is taken from `workdir` (where the application was built),
    and a local file that a node cannot read comes from the node that deployed the application, as its own
    archive does."""
    source = ArchiveSource.parse(update.archive, endpoint_url=update.endpoint_url)
    if source.is_local and source.relative is not None and workdir is not None:
        source = ArchiveSource.parse(os.path.join(workdir, update.archive))
    return ArchiveLocator(source, update.sha256, 0, None, deployed.node_id if source.is_local else None)


def load_version(pool: Any, locator: ArchiveLocator, args: AppArgs, *, rolling: bool = False,
                 resolved: Resolved | None = None) -> ModelVersion:
    """Resolve (unless `resolved` is given), check and replicate the archive at `locator` into `pool`: the checks
    of a deploy (its digest, its files' digests, its requirements, the batching `args` ask for), then the load,
    one interpreter at a time if `rolling`. Raises what failed, naming the archive; nothing is kept then."""
    from tenfold.packaging import replicate

    archive = resolved if resolved is not None else resolve(locator)
    try:
        _check(archive, locator, args)
        model = replicate(pool, archive.buffer, rolling=rolling)
    except BaseException:
        archive_cache.release(archive)
        raise
    return serve_version(locator, archive, model)


def check_version(locator: ArchiveLocator, args: AppArgs) -> Any:
    """The manifest of the archive at `locator`, checked as `load_version` checks it, loading nothing (the
    archive is released again). Raises what failed, naming the archive."""
    archive = resolve(locator)
    try:
        return _check(archive, locator, args)
    finally:
        archive_cache.release(archive)


def _check(archive: Resolved, locator: ArchiveLocator, args: AppArgs) -> Any:
    from tenfold.packaging import Archive

    manifest = Archive(archive.buffer, locator.source.describe()).verify()
    check_model(args, manifest)
    return manifest


def resolve(locator: ArchiveLocator) -> Resolved:
    """`archive_cache.resolve`, with a pin that the file does not match said as the update's."""
    try:
        return archive_cache.resolve(locator)
    except archive_cache.ArchiveChanged as exc:  # the file at the path is not the pinned one
        raise PinMismatch(locator.source.describe(), f"its sha256 is {exc.actual}, but user_config pins "
                          f"{locator.sha256}; give the digest of the archive to roll out (tenfold package prints "
                          "it)") from None


def retire(version: ModelVersion, *, still_used: Any, grace_s: float, done: Any) -> None:
    """Drop `version` once nothing uses it any longer (its calls and streams, and `still_used(model_id)` requests
    of the replica's HTTP servers), or after `grace_s`; then release its archive and call `done(version)`. Returns
    at once: a thread of its own waits."""

    def wait_and_drop() -> None:
        deadline = time.monotonic() + grace_s
        left = _in_use(version, still_used)
        while left and time.monotonic() < deadline:
            time.sleep(_DRAIN_POLL_S)
            left = _in_use(version, still_used)
        if left:
            _logger.warning("dropping model version %s with %d calls still on it after %.0f s "
                            "(graceful_shutdown_timeout_s): they fail", version.locator.describe(), left, grace_s)
        try:
            drop(version)
        finally:
            done(version)

    threading.Thread(target=wait_and_drop, name="tenfold-retire", daemon=True).start()


def _in_use(version: ModelVersion, still_used: Any) -> int:
    try:
        return version.model.in_use + still_used(version.model.model_id)
    except Exception:  # noqa: BLE001 - the pool is shut down (the replica stops): nothing can use it any more
        return 0


def drop(version: ModelVersion) -> None:
    """Drop `version`'s model from every interpreter and release its archive."""
    try:
        version.model.close()
    finally:
        archive_cache.release(version.archive)
        # Its bytes go now, whatever else still refers to the version (Serve freezes the objects a replica made
        # as it started, so a reference cycle among them would keep them for good).
        version.archive.buffer = version.archive.owned = None
