"""Where a replica gets its archive's bytes, shared by every replica of a node, with no process kept for it.

- A local file (a path every node can read) is mapped read-only: the page cache holds one copy per node,
  whatever the number of replicas and interpreters mapping it.
- A remote archive (s3://, http(s)://) goes through the Ray object store, used as a cache: the first
  replica of a node that needs it fetches it from its source, verifies its digest, puts it in the object
  store and publishes the reference in Ray's key-value store; the other replicas (of this node, or of
  nodes that have none yet) map that one object, zero copy. The object belongs to the replica that put
  it, so it goes when that replica goes: deleting or redeploying an application releases its archives,
  and an object lost with its replica or node is fetched again from the source by the next replica
  that needs it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from dataclasses import dataclass
from typing import Any

from .sources import ArchiveSource, ArchiveUnavailable, fetch

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


@dataclass
class Resolved:
    """An archive's bytes as a replica holds them while it serves."""

    buffer: Any  # a read-only memoryview (a mapped file, or a fetched archive) or a numpy view of an object
    origin: str  # "file", "object store", or "source" (fetched and put in the object store by this replica)
    owned: Any = None  # [ObjectRef] this replica put and published (released when the replica goes)
    key: str | None = None  # where it is published in the key-value store
    published: bytes | None = None  # what was published there


def _key(sha256: str, node_id: str) -> str:
    return f"archives/{sha256}/{node_id}"


def resolve(locator: ArchiveLocator, *, timeout_s: float = 60.0) -> Resolved:
    """The archive's bytes for this replica: see the module docstring. Raises ArchiveUnavailable (naming
    the source) when no replica holds it and the source cannot give it; PinMismatch when the source
    gives other bytes than the digest bound at deploy time."""
    if locator.source.is_local:
        if locator.stamp is not None and file_stamp(locator.source.location) == locator.stamp:
            from tenfold.packaging import open_source

            return Resolved(open_source(locator.source.location)[0], "file")  # verified at deploy, unchanged
        return Resolved(fetch(locator.source, sha256=locator.sha256, timeout_s=timeout_s), "file")
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
    try:
        view = fetch(locator.source, sha256=locator.sha256, timeout_s=timeout_s)
    except BaseException:
        _unpublish(key, b"")
        raise
    import numpy as np

    ref = ray.put(np.frombuffer(view, dtype=np.uint8))
    del view
    # Pickling a reference pins its object for the life of this process, which owns it anyway.
    published = ray.cloudpickle.dumps({"owner": _this_actor(), "refs": [ref]})
    internal_kv._internal_kv_put(key, published, overwrite=True, namespace=KV_NAMESPACE)
    buffer = ray.get(ref)
    logger.info("archive %s fetched from its source into the object store", locator.describe())
    return Resolved(buffer, "source", owned=[ref], key=key, published=published)


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


def published_digests() -> list[str]:
    """Digests of the archives replicas have published in the object store (for status and tests)."""
    from ray.experimental import internal_kv

    keys = internal_kv._internal_kv_list("archives/", namespace=KV_NAMESPACE) or []
    return sorted({(k.decode() if isinstance(k, bytes) else k).split("/")[1] for k in keys})


__all__ = ["ArchiveLocator", "ArchiveUnavailable", "Resolved", "published_digests", "release", "resolve"]
