"""Archives in the Ray object store, owned by one long-lived actor so they outlive whoever deployed them.

An object lives as long as its owner, and the owner of a `ray.put` is the process that called it: the
`serve run` CLI, a notebook, or the controller's build task, any of which may be gone long before a
replica restarts or scales up. So the builder hands the archive to a detached actor that puts it
again (and so owns it) and keeps a reference per digest. Replicas resolve that one object; a numpy
`uint8` array comes back from `ray.get` as a read-only view of the node's shared memory (no copy).
"""

from __future__ import annotations

import numpy as np
import ray

STORE_NAME = "tenfold_archives"
STORE_NAMESPACE = "tenfold"


@ray.remote(num_cpus=0, max_restarts=0)
class _ArchiveStore:
    def __init__(self) -> None:
        self._refs: dict[str, ray.ObjectRef] = {}

    def keep(self, digest: str, data: np.ndarray) -> list[ray.ObjectRef]:
        # A list, so that the caller gets the reference itself, not the value.
        if digest not in self._refs:
            self._refs[digest] = ray.put(data)
        return [self._refs[digest]]

    def release(self, digest: str) -> bool:
        return self._refs.pop(digest, None) is not None

    def digests(self) -> list[str]:
        return sorted(self._refs)


def _store() -> ray.actor.ActorHandle:
    return _ArchiveStore.options(  # type: ignore[attr-defined]  # ray.remote makes it an ActorClass
        name=STORE_NAME, namespace=STORE_NAMESPACE, lifetime="detached", get_if_exists=True
    ).remote()


def put_archive(data: bytes | memoryview, digest: str) -> ray.ObjectRef:
    """Put the archive bytes in the object store (once per digest) and return the shared reference."""
    array = np.frombuffer(data, dtype=np.uint8)
    return ray.get(_store().keep.remote(digest, array))[0]


def release_archive(digest: str) -> bool:
    """Drop the store's reference to an archive (replicas still holding it keep it alive)."""
    return ray.get(_store().release.remote(digest))


def stored_digests() -> list[str]:
    """Digests of the archives the store holds."""
    return ray.get(_store().digests.remote())
