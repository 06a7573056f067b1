"""The house rules: one import direction between the rooms, no circles, one glibc setting."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from support import ROOT

import tenfold.runtime

PACKAGE = ROOT / "tenfold"
#: A room may import rooms of a lower rank, never a higher one: runtime <- packaging <- integration <- cli/bench.
#: The command dispatches to the benchmarks, so within the top floor cli may import bench, never the reverse.
RANK = {"runtime": 0, "packaging": 1, "integration": 2, "bench": 3, "cli": 4, "__main__": 5}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    """Every tenfold module `path` imports, at any depth of its code (lazy imports included)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "tenfold"}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "tenfold":
                continue
            for alias in node.names:  # `from . import codec` imports the module codec, not the package
                sub = f"{target}.{alias.name}"
                found.add(sub if _is_module(sub) else target)
    found.discard(name)
    return found


def _is_module(name: str) -> bool:
    path = ROOT.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def _room(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "tenfold"


def _graph() -> dict[str, set[str]]:
    return {_module_name(p): _imports(p) for p in PACKAGE.rglob("*.py")}


def test_every_import_points_down_the_rooms() -> None:
    wrong = []
    for module, imported in _graph().items():
        room = _room(module)
        if room not in RANK:
            continue
        for target in imported:
            other = _room(target)
            if other in RANK and other != room and RANK[other] >= RANK[room]:
                wrong.append(f"{module} imports {target}")
    assert not wrong, "imports against runtime <- packaging <- integration <- cli/bench:\n" + "\n".join(sorted(wrong))


def test_no_module_imports_itself_through_others() -> None:
    graph = _graph()
    # Importing a package runs its __init__, which re-exports its modules: an edge into a package is an
    # edge into everything its __init__ imports.
    cycles = []
    state: dict[str, int] = {}

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in sorted(graph.get(module, ())):
            if state.get(target) == 1:
                cycle = path[path.index(target):] + [target]
                # A package's own modules importing its __init__ for a sibling name is not a circle.
                if not all(_is_init_edge(a, b) for a, b in zip(cycle, cycle[1:])):
                    cycles.append(" -> ".join(cycle))
            elif target in graph and state.get(target) is None:
                visit(target, path + [target])
        state[module] = 2

    for module in sorted(graph):
        if state.get(module) is None:
            visit(module, [module])
    assert not cycles, "import circles:\n" + "\n".join(cycles)


def _is_init_edge(a: str, b: str) -> bool:
    return a.startswith(b + ".") or b.startswith(a + ".")


def test_the_library_rooms_hold_no_benchmark_or_command_code() -> None:
    for room in ("runtime", "packaging", "integration"):
        names = {p.stem for p in (PACKAGE / room).glob("*.py")}
        assert not {n for n in names if "bench" in n or "cli" in n or "soak" in n}, room


def test_dev_sets_the_glibc_tunables_the_runtime_asks_for() -> None:
    dev = (ROOT / "dev").read_text()
    (value,) = re.findall(r'GLIBC_TUNABLES="\$\{GLIBC_TUNABLES:-([^}]*)\}"', dev)
    assert value == tenfold.runtime.GLIBC_TUNABLES
    readme = (ROOT / "README.md").read_text()
    assert all(v == tenfold.runtime.GLIBC_TUNABLES for v in re.findall(r"GLIBC_TUNABLES=([\w.=]+)", readme))


def test_no_file_in_the_package_cites_an_issue_number() -> None:
    cited = [str(p.relative_to(ROOT)) for p in PACKAGE.rglob("*.py") if re.search(r"\b[Ii]ssue \d+", p.read_text())]
    assert not cited
