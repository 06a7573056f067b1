"""Which modules go into an archive (interned) and which come from the serving environment (extern), and
the requirements that externs put on that environment.

By default only the user's own code is interned: the standard library and every module that comes from
an installed distribution (its files lie in the distribution's install location, as `importlib.metadata`
knows it) are extern. An editable install of the user's own project is the user's code: its files lie in
the project, not in site-packages, so it is interned.
"""

from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
import os
import re
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

Origin = Literal["stdlib", "installed", "user", "unknown"]

# Distributions whose version is not recorded as a requirement: the interpreter itself provides them.
_NOT_REQUIREMENTS = {"pip", "setuptools"}


@dataclass(frozen=True)
class Requirement:
    """An installed distribution an archive's extern modules come from, pinned to the version packaged with."""

    distribution: str
    version: str

    def __str__(self) -> str:
        return f"{self.distribution}=={self.version}"

    @classmethod
    def parse(cls, text: str) -> Requirement:
        name, sep, version = text.partition("==")
        if not sep or not name.strip() or not version.strip():
            raise ValueError(f"a requirement is NAME==VERSION, got {text!r}")
        return cls(name.strip(), version.strip())


@functools.cache
def _site_dirs() -> frozenset[Path]:
    """Where installed distributions live: site-packages (and the user's), as pip installs into them."""
    import site
    import sysconfig

    dirs = {sysconfig.get_paths()[k] for k in ("purelib", "platlib")}
    dirs.update(site.getsitepackages() if hasattr(site, "getsitepackages") else [])
    if site.ENABLE_USER_SITE and site.getusersitepackages():
        dirs.add(site.getusersitepackages())
    return frozenset(Path(d).resolve() for d in dirs)


@functools.cache
def _distributions_by_top_level() -> dict[str, tuple[str, ...]]:
    return {top: tuple(dict.fromkeys(dists)) for top, dists in importlib.metadata.packages_distributions().items()}


def _locations(top: str) -> list[Path]:
    module = sys.modules.get(top)
    if module is not None:
        paths = list(getattr(module, "__path__", []) or [])
        file = getattr(module, "__file__", None)
    else:
        try:
            spec = importlib.util.find_spec(top)
        except (ImportError, ValueError):
            spec = None
        if spec is None:
            return []
        paths = list(spec.submodule_search_locations or [])
        file = spec.origin if spec.has_location else None
    if file:
        paths.append(os.path.dirname(file))
    return [Path(p).resolve() for p in paths if p]


def _within(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def origin(top: str) -> Origin:
    """Where the top-level module `top` comes from."""
    if top in sys.stdlib_module_names or top in sys.builtin_module_names:
        return "stdlib"
    locations = _locations(top)
    if not locations:
        return "unknown"
    for dist_name in _distributions_by_top_level().get(top, ()):
        try:
            root = Path(str(importlib.metadata.distribution(dist_name).locate_file(""))).resolve()
        except importlib.metadata.PackageNotFoundError:
            continue
        # Metadata found elsewhere (an egg-info left in a project by an editable build) is the user's code.
        if root in _site_dirs() and all(_within(p, root) for p in locations):
            return "installed"
    return "user"


def requirements(modules: Iterable[str]) -> list[Requirement]:
    """The installed distributions (with their versions here) that the extern `modules` come from."""
    found: dict[str, Requirement] = {}
    for top in sorted({m.split(".")[0] for m in modules}):
        if origin(top) != "installed":
            continue
        for dist_name in _distributions_by_top_level().get(top, ()):
            try:
                dist = importlib.metadata.distribution(dist_name)
            except importlib.metadata.PackageNotFoundError:
                continue
            name = dist.metadata["Name"] or dist_name
            if _normalize(name) not in _NOT_REQUIREMENTS:
                found.setdefault(_normalize(name), Requirement(name, dist.version))
    return sorted(found.values(), key=lambda r: _normalize(r.distribution))


def installed_version(distribution: str) -> str | None:
    """The version of `distribution` installed here, or None."""
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def _normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()
