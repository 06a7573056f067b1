"""Which modules go into an archive (interned) and which come from the serving environment (extern), and
the requirements that externs put on that environment.

By default only the user's own code is interned: the standard library and every module that comes from
an installed distribution (its files lie in the distribution's install location, as `importlib.metadata`
knows it) are extern. An editable install of the user's own project is the user's code: its files lie in
the project, not in site-packages, so it is interned.

torch.package externs every module the interned source names, wherever the import statement is. Only some
of those are needed to serve: what the pickled model refers to, what the interned modules import when they
are imported, and what the model's call imported when it ran on the example inputs. A distribution imported
only in code that never ran on that path (a factory that looks up where its weights' files are, a branch the
example did not take) is not required of the serving environment: it is taken from there if it is there.
"""

from __future__ import annotations

import ast
import builtins
import contextlib
import functools
import importlib.metadata
import importlib.util
import os
import re
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

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


# -- which externs the archive needs at load and call -------------------------------------------------

# Methods pickle runs when it rebuilds an object: their imports happen at load, like a module's own.
_RUN_AT_LOAD = {"__setstate__", "__new__"}


@contextlib.contextmanager
def recording_imports() -> Iterator[dict[str, set[str]]]:
    """Records the import statements run meanwhile: the importing module's name -> the modules it imported
    (absolute names; `from X import a` counts as X and X.a, since a may be a submodule)."""
    seen: dict[str, set[str]] = {}
    original = builtins.__import__

    def record(name: str, globals: Mapping[str, Any] | None = None, locals: Any = None,
               fromlist: Sequence[str] | None = (), level: int = 0) -> Any:
        module = original(name, globals, locals, fromlist, level)
        importer = (globals or {}).get("__name__")
        if isinstance(importer, str):
            package = (globals or {}).get("__package__") or importer.rpartition(".")[0]
            try:
                absolute = importlib.util.resolve_name("." * level + name, package) if level else name
            except (ImportError, ValueError):
                return module
            names = seen.setdefault(_demangle(importer), set())
            names.add(absolute)
            names.update(f"{absolute}.{a}" for a in fromlist or () if a != "*")
        return module

    builtins.__import__ = record
    try:
        yield seen
    finally:
        if builtins.__import__ is record:  # whoever replaced it meanwhile keeps theirs
            builtins.__import__ = original


def _demangle(name: str) -> str:
    # Modules of an archive being repackaged carry their importer's mangle: "<torch_package_0>.pkg.mod".
    return name.split(">.", 1)[1] if name.startswith("<torch_package_") and ">." in name else name


class _EagerImports(ast.NodeVisitor):
    """The (module, name) pairs a module's source imports when the module itself is imported: everything
    outside function bodies (but in the methods pickle runs at load), except under `if TYPE_CHECKING:`."""

    def __init__(self, package: str) -> None:
        self.package = package
        self.pairs: list[tuple[str, str | None]] = []

    def visit_Import(self, node: ast.Import) -> None:
        self.pairs.extend((alias.name, None) for alias in node.names)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        base = node.module or ""
        if node.level:
            bits = self.package.rsplit(".", node.level - 1)
            base = f"{bits[0]}.{base}" if base else bits[0]
        self.pairs.extend((base, None if alias.name == "*" else alias.name) for alias in node.names)

    def visit_Call(self, node: ast.Call) -> None:
        func = node.func
        if isinstance(func, ast.Name) and func.id == "__import__" and node.args:
            first = node.args[0]
            if isinstance(first, ast.Constant) and isinstance(first.value, str):
                self.pairs.append((first.value, None))
        self.generic_visit(node)

    def visit_FunctionDef(self, node: ast.FunctionDef | ast.AsyncFunctionDef) -> None:
        if node.name in _RUN_AT_LOAD:
            self.generic_visit(node)

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_Lambda(self, node: ast.Lambda) -> None:
        pass

    def visit_If(self, node: ast.If) -> None:
        test = node.test
        if (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
                isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"):
            for stmt in node.orelse:
                self.visit(stmt)
            return
        self.generic_visit(node)


def eager_imports(source: str, module: str, *, is_package: bool) -> list[tuple[str, str | None]]:
    """What `module`'s `source` imports as the module is imported, as (module, name) pairs: `import X` is
    (X, None), `from X import a` is (X, a)."""
    visitor = _EagerImports(module if is_package else module.rpartition(".")[0])
    visitor.visit(ast.parse(source))
    return visitor.pairs


def needed_modules(graph: Any, *, ran: Mapping[str, set[str]], always: Callable[[str], bool]) -> set[str]:
    """The modules of torch.package's dependency `graph` that loading and calling the model needs: those the
    pickles refer to, then their parent packages and, from every needed interned module, what it imports as it is
    imported and what it imported while the model ran (`ran`, from `recording_imports`). `always` names
    modules needed whatever the code does (the caller's own extern patterns)."""
    nodes = graph.nodes
    stack = [dep for name, node in nodes.items() if node.get("is_pickle") for dep in graph.successors(name)]
    stack += [name for name in nodes if always(name)]
    needed: set[str] = set()
    while stack:
        name = stack.pop()
        if name in needed or name not in graph:
            continue
        needed.add(name)
        node = nodes[name]
        parts = name.split(".")
        stack.extend(".".join(parts[:i]) for i in range(1, len(parts)))  # its packages are imported first
        deps = set(graph.successors(name))
        source = node.get("source")
        if not deps:
            continue
        if not isinstance(source, str):  # nothing to tell its imports apart by: all of them
            stack.extend(deps)
            continue
        try:
            pairs = eager_imports(source, name, is_package=bool(node.get("is_package")))
        except SyntaxError:
            stack.extend(deps)
            continue
        # torch.package records `from X import a` as X.a when a is a submodule, else as X.
        eager = {f"{m}.{a}" if f"{m}.{a}" in deps else m for m, a in pairs if a is not None} | {
            m for m, a in pairs if a is None}
        imported = ran.get(name, set())
        stack.extend(d for d in deps if d in eager or d in imported
                     or any(i.startswith(d + ".") for i in imported))
    return needed


def installed_version(distribution: str) -> str | None:
    """The version of `distribution` installed here, or None."""
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def _normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()
