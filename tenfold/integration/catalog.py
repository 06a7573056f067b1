"""Several models in one application: the archives it serves by name, and what a replica holds of them.

The builder reads and checks every archive of `AppArgs.archives` once, as it does one `archive`, and binds a
`Catalog`: each model's name, where its archive is (with its digest) and its manifest. A replica starts with
none of them loaded. The first request for a model loads it into every interpreter of the replica, through Serve's
multiplexing (`serve.multiplexed`): Serve's router then prefers the replicas that hold a model for requests that
name it by header or handle option, and past `max_models_per_replica` the least recently used model is unloaded
(`Held.__del__`), once the calls on it have ended. A deployment's `user_config` (`ModelsUpdate`) changes the
archive of the models it names, in each replica's catalog and in the versions it holds.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any

from . import openapi, routes
from .archive_cache import ArchiveLocator

#: The deployment's name in an application of several archives, when `AppArgs.name` gives none.
DEFAULT_NAME = "models"


@dataclass(frozen=True)
class Entry:
    """One model of a catalog, as the builder read it."""

    name: str
    index: int  # its place in the catalog (the interpreters' servers ask for a model by it)
    locator: ArchiveLocator
    manifest: Any  # tenfold.packaging.Manifest

    def body(self) -> dict[str, Any]:
        """What GET /{name}/-/manifest answers: the model's manifest, its archive's sha256 and source."""
        return {"name": self.name, "manifest": self.manifest.model_dump(mode="json"),
                "sha256": self.locator.sha256, "source": self.locator.source.describe()}


class Catalog:
    """The models an application serves, by name, in the order they were given."""

    def __init__(self, entries: dict[str, Entry]) -> None:
        self._entries = entries

    @classmethod
    def of(cls, models: dict[str, tuple[ArchiveLocator, Any]]) -> Catalog:
        """A catalog of {name: (locator, manifest)}."""
        return cls({name: Entry(name, i, locator, manifest) for i, (name, (locator, manifest))
                    in enumerate(models.items())})

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[Entry]:
        return iter(self._entries.values())

    def __len__(self) -> int:
        return len(self._entries)

    def entry(self, name: str) -> Entry:
        """The model `name`; ModelNotFound (404, a LookupError) naming those served for any other."""
        entry = self._entries.get(name)
        if entry is None:
            raise routes.model_not_found(name, self._entries)
        return entry

    def replaced(self, name: str, locator: ArchiveLocator, manifest: Any) -> Catalog:
        """This catalog with model `name` served from the archive at `locator` (an update)."""
        return Catalog({**self._entries, name: Entry(name, self.entry(name).index, locator, manifest)})

    def body(self) -> dict[str, Any]:
        """What GET /-/manifest answers: every model's manifest, sha256 and source."""
        return {"models": {e.name: e.body() for e in self}}

    def openapi(self, title: str) -> dict[str, Any]:
        """The OpenAPI document of every model's routes (/{name})."""
        return openapi.document_of_several({e.name: (e.manifest, e.locator.sha256) for e in self}, title=title)


class Held:
    """A loaded model as Serve's multiplexing caches it: the version serving it (an update swaps it), and what
    unloads it."""

    def __init__(self, version: Any, unload: Callable[[], Awaitable[None]]) -> None:
        self.version = version
        # An instance attribute, not a method: Serve awaits an async __del__ as it unloads a model (the least
        # recently used, past max_models_per_replica), and the garbage collector, which looks for __del__ only on
        # the class, finds none to call.
        self.__del__ = unload
