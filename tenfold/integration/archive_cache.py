"""Where a replica gets its archive's bytes, shared by every replica of a node, with no process kept for it.

- A local file is mapped read-only where the replica's node can read it: the page cache holds one copy per
  node, whatever the number of replicas and interpreters mapping it. A replica starts only if the file still
  has the digest bound at deploy (`ArchiveChanged` otherwise); one that runs while the path is packaged again
  keeps serving its mapping of the deployed version and says so (`ChangeWatch`).
- A local file on a node that cannot read its path (another machine), and a remote archive (s3://,
  http(s)://), go through the Ray object store, used as a cache: the first replica of a node that needs it
  takes it from its source, verifies its digest, puts it in the object store and publishes the reference in
  Ray's key-value store; the other replicas (of this node, or of nodes that have none yet) map that one
  object, zero copy. A remote archive's source is its URI; a local file's is the node that deployed it,
  where a task of the replica reads it (so the path must stay readable there, and that node need host no
  replica). The object belongs to the replica that put it, so it goes when that replica goes: deleting or
  redeploying an application releases its archives, and an object lost with its replica or node is taken
  again from the source by the next replica that needs it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from dataclasses import dataclass
from typing import Any

from tenfold.packaging import PinMismatch

from .sources import ArchiveSource, ArchiveUnavailable, fetch, fetch_with_digest

logger = logging.getLogger("ray.serve")

KV_NAMESPACE = "tenfold"
#: How long a replica waits for another replica of its node that claimed the fetch of an archive before
#: fetching it itself.
CLAIM_WAIT_S = 120.0
#: How long a reference published by another replica may take to resolve before it counts as lost.
GET_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class ArchiveLocator:
    """What the builder binds into the deployment: where the archive is, and the digest it must have."""

    source: ArchiveSource
    sha256: str
    size: int
    #: A local file as the builder verified it (size, mtime_ns, inode, device): a replica that finds it so
    #: maps it without hashing it again.
    stamp: tuple[int, int, int, int] | None = None
    #: The Ray node the builder read a local file on, where replicas of nodes that cannot read the path have
    #: it read for them (None when the application was built before Ray started: then the head node).
    node_id: str | None = None

    def describe(self) -> str:
        return f"{self.source.describe()} (sha256 {self.sha256[:12]}...)"


def file_stamp(path: str) -> tuple[int, int, int, int] | None:
    """What tells that a file is the one seen before: its size, modification time, inode and device (None if
    it cannot be read)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_size, st.st_mtime_ns, st.st_ino, st.st_dev)


class ArchiveChanged(PinMismatch):
    """The local file an application was deployed with now holds another archive (it was packaged again to the
    same path): a replica starts only with the deployed digest."""

    def __init__(self, locator: ArchiveLocator, actual: str) -> None:
        super().__init__(locator.source.describe(), changed_message(locator, actual))
        self.actual = actual

    def __reduce__(self) -> tuple[type[PinMismatch], tuple[str, str]]:  # as a PinMismatch, with this message
        return (PinMismatch, (self.archive, str(self).removeprefix(f"{self.archive}: ")))


def changed_message(locator: ArchiveLocator, actual: str) -> str:
    """What a replica says when its archive's path holds another file than the one deployed, and what to do."""
    return (f"this file changed since the application was deployed: it was sha256 {locator.sha256}, it is now "
            f"sha256 {actual}. Replicas start only with the deployed version, and those running keep serving it. "
            f"To roll out the new file, redeploy with its digest in the application's args (sha256: {actual}): "
            "serve deploy and serve run rebuild an application only when its config changes. To roll it out "
            f"without a restart, give it in the deployment's user_config instead (archive: ..., sha256: {actual}). "
            "To go on with the deployed version, put its file back, or deploy the new one from another path")


@dataclass
class Resolved:
    """An archive's bytes as a replica holds them while it serves."""

    buffer: Any  # a read-only memoryview (a mapped file, or a fetched archive) or a numpy view of an object
    #: "file", "object store" (another replica's copy), or where this replica took it from before putting it in the
    #: object store: "source" (a remote archive's URI) or "deploying node" (a local file read there)
    origin: str
    owned: Any = None  # [ObjectRef] this replica put and published (released when the replica goes)
    key: str | None = None  # where it is published in the key-value store
    published: bytes | None = None  # what was published there
    stamp: tuple[int, int, int, int] | None = None  # a local file's, when it was mapped (see ChangeWatch)


def _key(sha256: str, node_id: str) -> str:
    return f"archives/{sha256}/{node_id}"


def resolve(locator: ArchiveLocator, *, timeout_s: float = 60.0) -> Resolved:
    """The archive's bytes for this replica: see the module docstring. Raises ArchiveUnavailable (naming
    the source) when no replica holds it and the source cannot give it; PinMismatch when the source
    gives other bytes than the digest bound at deploy time."""
    if locator.source.is_local:
        mapped = _map_file(locator, timeout_s)
        if mapped is not None:
            return mapped
    import ray
    from ray.experimental import internal_kv

    node = ray.get_runtime_context().get_node_id()
    key = _key(locator.sha256, node)
    deadline = time.monotonic() + CLAIM_WAIT_S
    while True:
        found = _published(locator.sha256, node)
        if found is not None:
            return found
        # Claim this node's fetch (the put fails if another replica of the node claimed it first).
        if internal_kv._internal_kv_put(key, b"", overwrite=False, namespace=KV_NAMESPACE) is False:
            break
        if time.monotonic() > deadline:
            logger.warning("a replica of this node claimed %s and published nothing in %.0f s; fetching it here",
                           locator.describe(), CLAIM_WAIT_S)
            break
        time.sleep(0.25)
    started = time.perf_counter()
    try:
        if locator.source.is_local:
            view, origin = _read_on_deploying_node(locator, timeout_s), "deploying node"
        else:
            view, origin = fetch(locator.source, sha256=locator.sha256, timeout_s=timeout_s), "source"
    except BaseException:
        _unpublish(key, b"")
        raise
    import numpy as np

    ref = ray.put(np.frombuffer(view, dtype=np.uint8))
    del view  # a local file's copy pulled from the deploying node goes now: this node keeps its own
    # Pickling a reference pins its object for the life of this process, which owns it anyway.
    published = ray.cloudpickle.dumps({"owner": _this_actor(), "refs": [ref]})
    internal_kv._internal_kv_put(key, published, overwrite=True, namespace=KV_NAMESPACE)
    buffer = ray.get(ref)
    logger.info("archive %s taken from %s into this node's object store in %.2f s", locator.describe(),
                "the node that deployed it" if origin == "deploying node" else "its source",
                time.perf_counter() - started)
    return Resolved(buffer, origin, owned=[ref], key=key, published=published)


def _map_file(locator: ArchiveLocator, timeout_s: float) -> Resolved | None:
    """A local archive mapped from this node's file; None where the file is not the deployed one's (missing,
    or another file at the path) on a node other than the one that deployed it: that node gives it."""
    path = locator.source.location
    stamp = file_stamp(path)
    if locator.stamp is not None and stamp == locator.stamp:
        from tenfold.packaging import open_source

        # Verified at deploy and unchanged.
        return Resolved(open_source(path)[0], "file", stamp=stamp)
    deployer = _deploying_node(locator)
    elsewhere = deployer is not None and deployer != this_node()
    if stamp is None and elsewhere:
        logger.info("this node cannot read %s; it comes from the node that deployed it (%s) through the object "
                    "store", locator.describe(), deployer)
        return None
    try:
        view, actual = fetch_with_digest(locator.source, sha256=None, timeout_s=timeout_s)
    except ArchiveUnavailable:
        if elsewhere:
            return None
        raise
    if actual != locator.sha256:
        del view
        if elsewhere:
            logger.warning("this node has another file at %s (sha256 %s); the deployed one comes from the node that "
                           "deployed it (%s) through the object store", path, actual, deployer)
            return None
        raise ArchiveChanged(locator, actual)
    return Resolved(view, "file", stamp=stamp)


def this_node() -> str | None:
    """The Ray node this process runs on, if Ray is up."""
    import ray

    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None


def _deploying_node(locator: ArchiveLocator) -> str | None:
    """The node that read a local archive at deploy: the builder's, else the head node (None outside Ray)."""
    import ray

    if locator.node_id is not None or not ray.is_initialized():
        return locator.node_id
    return next((n["NodeID"] for n in ray.nodes() if n.get("Alive") and HEAD_RESOURCE in n.get("Resources", {})),
                None)


HEAD_RESOURCE = "node:__internal_head__"


def _read_here(locator: ArchiveLocator) -> Any:
    """A local archive's bytes, read where this runs (a task on the deploying node), if they have its digest."""
    import numpy as np

    view, actual = fetch_with_digest(locator.source, sha256=None)
    if actual != locator.sha256:
        raise ArchiveChanged(locator, actual)
    return np.frombuffer(view, dtype=np.uint8)


def _read_on_deploying_node(locator: ArchiveLocator, timeout_s: float) -> Any:
    """A local archive that this node cannot read, read by a task on the node that deployed it and pulled here."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    node = _deploying_node(locator)
    here = f"this node ({this_node()})"
    fix = ("A local path is read where the application is deployed, and replicas on other nodes get it from there "
           "through the object store: keep the file on that node, or put the archive where every node can read it "
           "(a shared filesystem), or serve it from s3:// or http(s)://")
    alive = {n["NodeID"] for n in ray.nodes() if n.get("Alive")}
    if node is None or node not in alive:
        raise ArchiveUnavailable(locator.source, f"{here} cannot read the file, and the node that deployed it "
                                                 f"({node or 'unknown'}) is gone. {fix}")
    task = ray.remote(num_cpus=0, max_retries=0)(_read_here).options(
        scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False), name="tenfold-read-archive")
    try:
        return ray.get(task.remote(locator), timeout=max(timeout_s, GET_TIMEOUT_S))
    except ray.exceptions.RayTaskError as exc:
        cause = exc.cause
        if isinstance(cause, PinMismatch):
            raise cause from None
        reason = str(cause).removeprefix(f"cannot fetch archive {locator.source.describe()}: ")
        raise ArchiveUnavailable(locator.source, f"{here} cannot read the file, nor can the node that deployed it "
                                                 f"({node}): {reason}. {fix}") from None
    except ray.exceptions.RayError as exc:
        reason = f"{type(exc).__name__}: {exc}"
        raise ArchiveUnavailable(locator.source, f"{here} cannot read the file, and the node that deployed it "
                                                 f"({node}) did not give it: {reason}. {fix}") from None


def _published(sha256: str, node: str) -> Resolved | None:
    """The object another replica published for this archive, this node's first; None if there is none
    that resolves (entries whose owner is gone are removed)."""
    import ray
    from ray.experimental import internal_kv

    keys = internal_kv._internal_kv_list(f"archives/{sha256}/", namespace=KV_NAMESPACE) or []
    keys = sorted((k.decode() if isinstance(k, bytes) else k for k in keys), key=lambda k: not k.endswith(node))
    for key in keys:
        data = internal_kv._internal_kv_get(key, namespace=KV_NAMESPACE)
        if not data:
            continue  # claimed, not yet published
        try:
            entry = ray.cloudpickle.loads(data)
            if not _alive(entry["owner"]):
                # Its object may linger while others still map it, but nobody owns it: a new copy is fetched.
                raise ValueError(f"its owner {entry['owner'][0]} is gone")
            buffer = ray.get(entry["refs"][0], timeout=GET_TIMEOUT_S)
        except (ray.exceptions.RayError, ValueError, TypeError, KeyError) as exc:
            logger.warning("the object store copy published at %s is gone (%s: %s); it is removed", key,
                           type(exc).__name__, exc)
            _unpublish(key, data)
            continue
        return Resolved(buffer, "object store")
    return None


def _this_actor() -> tuple[str, str] | None:
    """(name, namespace) of the named actor this runs in (a Serve replica), or None."""
    import ray

    context = ray.get_runtime_context()
    try:
        name = context.get_actor_name()
    except Exception:  # noqa: BLE001 - not in an actor
        name = None
    if not name:
        return None
    # Serve registers its replicas in its own namespace, not in the job's the context reports.
    return name, ("serve" if name.startswith("SERVE_REPLICA::") else context.namespace)


def _alive(owner: tuple[str, str] | None) -> bool:
    """Whether the named actor `owner` still exists (an entry published outside an actor counts as alive)."""
    if owner is None:
        return True
    import ray

    try:
        ray.get_actor(owner[0], namespace=owner[1])
    except ValueError:
        return False
    return True


def _unpublish(key: str, expected: bytes) -> None:
    """Remove `key` if it still holds `expected` (not a newer entry another replica wrote meanwhile)."""
    from ray.experimental import internal_kv

    with contextlib.suppress(Exception):
        if internal_kv._internal_kv_get(key, namespace=KV_NAMESPACE) == expected:
            internal_kv._internal_kv_del(key, namespace=KV_NAMESPACE)


def release(resolved: Resolved) -> None:
    """Withdraw what this replica published (on a graceful stop); its object goes with the replica."""
    if resolved.key is not None and resolved.published is not None:
        _unpublish(resolved.key, resolved.published)


class ChangeWatch:
    """Tells a replica that the local file it serves from was replaced at its path (packaged again): the replica
    keeps its mapping of the deployed version, which a replaced file (a new inode) leaves intact, but says so, in
    its log once and in its stats, with the new digest and how to roll it out.

    `poll()` costs one stat(); a changed file is hashed once, on a thread of its own."""

    def __init__(self, locator: ArchiveLocator, resolved: Resolved) -> None:
        self._locator, self._seen = locator, resolved.stamp
        self._lock = threading.Lock()
        self._hashing: threading.Thread | None = None
        self.message: str | None = None  # set once the file at the path holds another archive

    def poll(self) -> str | None:
        """The message about a changed file, if the file at the path is another archive (None while it is the
        deployed one, or not yet known)."""
        if not self._locator.source.is_local or self._seen is None:
            return None
        stamp = file_stamp(self._locator.source.location)
        with self._lock:
            if stamp is None or stamp == self._seen or (self._hashing is not None and self._hashing.is_alive()):
                return self.message
            self._seen = stamp
            self._hashing = threading.Thread(target=self._hash, name="tenfold-archive-watch", daemon=True)
            self._hashing.start()
        return self.message

    def _hash(self) -> None:
        try:
            _, actual = fetch_with_digest(self._locator.source, sha256=None)
        except (ArchiveUnavailable, OSError) as exc:
            logger.warning("the archive %s changed and cannot be read (%s); this replica serves the deployed "
                           "version", self._locator.describe(), exc)
            return
        message = None if actual == self._locator.sha256 else str(ArchiveChanged(self._locator, actual))
        if message is not None and message != self.message:
            logger.warning("%s", message)
        self.message = message


def published_digests() -> list[str]:
    """Digests of the archives replicas have published in the object store (for status and tests)."""
    from ray.experimental import internal_kv

    keys = internal_kv._internal_kv_list("archives/", namespace=KV_NAMESPACE) or []
    return sorted({(k.decode() if isinstance(k, bytes) else k).split("/")[1] for k in keys})


__all__ = ["ArchiveChanged", "ArchiveLocator", "ArchiveUnavailable", "ChangeWatch", "Resolved", "published_digests",
           "release", "resolve"]
