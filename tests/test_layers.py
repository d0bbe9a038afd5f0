"""The layers of src/nimbus, read from the source: who may import whom, no import circle,
no module over 600 lines.

```
nimbus.exceptions                          0  the tree of errors
nimbus.core, records, settings, aio        1  agent core; typed records; configuration
nimbus.ports, nimbus.testing               2  what the service needs; test models' fakes
nimbus.service                             3  runs, schedulers, executor, stream shaping
nimbus.adapters.{store,llm,tools}          4  one implementation per database / provider
nimbus.adapters.bus                        5  signals between processes
nimbus.adapters.api                        6  the HTTP API
nimbus.bench                               7  `nimbus bench`
nimbus.adapters.cli, nimbus.__main__       8  the command line
```
A package may import its own rank or a lower one, never a higher one. ``nimbus.service``
imports only the core, records, ports and exceptions (as the core imports no adapter:
tests/core/test_imports.py).
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src"
MAX_LINES = 600
RANKS = {
    "nimbus.exceptions": 0,
    "nimbus.core": 1,
    "nimbus.records": 1,
    "nimbus.settings": 1,
    "nimbus.aio": 1,
    "nimbus.ports": 2,
    "nimbus.testing": 2,
    "nimbus.service": 3,
    "nimbus.adapters.store": 4,
    "nimbus.adapters.llm": 4,
    "nimbus.adapters.tools": 4,
    "nimbus.adapters.bus": 5,
    "nimbus.adapters.api": 6,
    "nimbus.bench": 7,
    "nimbus.adapters.cli": 8,
    "nimbus.__main__": 8,
}
SERVICE_MAY_IMPORT = ("nimbus.core", "nimbus.records", "nimbus.ports", "nimbus.exceptions")


def modules() -> dict[str, Path]:
    """Every module of the package by dotted name."""
    found = {}
    for path in SRC.rglob("*.py"):
        parts = path.with_suffix("").relative_to(SRC).parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def imports(path: Path, *, top_level_only: bool = False) -> Iterator[str]:
    """The nimbus modules ``path`` imports: all of them, or (``top_level_only``) those
    imported when it is loaded (not inside functions or ``if TYPE_CHECKING:``)."""
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    for node in nodes:
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module.startswith("nimbus"):
                yield node.module
                for alias in node.names:  # ``from nimbus.service import checkpoints``
                    yield f"{node.module}.{alias.name}"
        elif isinstance(node, ast.Import):
            yield from (a.name for a in node.names if a.name.startswith("nimbus"))


def layer(module: str) -> str | None:
    """The layer of RANKS that ``module`` belongs to (the longest prefix)."""
    best = None
    for name in RANKS:
        if (module == name or module.startswith(name + ".")) and len(name) > len(best or ""):
            best = name
    return best


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    """Each import of a package of a higher rank than the importer's."""
    bad = []
    for module, targets in graph.items():
        own = layer(module)
        for target in targets:
            theirs = layer(target)
            if own and theirs and RANKS[theirs] > RANKS[own]:
                bad.append(f"{module} ({own}) imports {target} ({theirs})")
    return sorted(bad)


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Import circles among modules (depth-first search for back edges)."""
    found: list[list[str]] = []
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []

    def visit(module: str) -> None:
        state[module] = 1
        stack.append(module)
        for target in sorted(graph.get(module, ())):
            if state.get(target) == 1:
                found.append([*stack[stack.index(target) :], target])
            elif target not in state:
                visit(target)
        stack.pop()
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module)
    return found


def graph(*, top_level_only: bool = False) -> dict[str, set[str]]:
    known = modules()
    out: dict[str, set[str]] = {}
    for module, path in known.items():
        targets = {t for t in imports(path, top_level_only=top_level_only) if t in known}
        # a package's __init__ is loaded before its modules: not an edge of a circle
        out[module] = {t for t in targets if t != module and not module.startswith(t + ".")}
    return out


def test_every_module_has_a_layer() -> None:
    assert [m for m in modules() if m not in ("nimbus", "nimbus.adapters") and not layer(m)] == []


def test_no_package_imports_one_above_it() -> None:
    assert upward_imports(graph()) == []


def test_the_service_imports_only_the_core_records_and_ports() -> None:
    bad = [
        f"{module} imports {target}"
        for module, targets in graph().items()
        if module.startswith("nimbus.service")
        for target in targets
        if not target.startswith(("nimbus.service", *SERVICE_MAY_IMPORT))
    ]
    assert bad == []


def test_no_import_circle() -> None:
    assert circles(graph(top_level_only=True)) == []


def test_no_module_is_over_600_lines() -> None:
    long = {
        m: n for m, p in modules().items() if (n := len(p.read_text().splitlines())) > MAX_LINES
    }
    assert long == {}


def test_the_checks_see_a_violation() -> None:
    """Guard against vacuous checks: an upward import and a circle are found."""
    made_up = {
        "nimbus.core.a": {"nimbus.adapters.api.app"},
        "nimbus.service.x": {"nimbus.service.y"},
        "nimbus.service.y": {"nimbus.service.x"},
    }
    assert upward_imports(made_up) == [
        "nimbus.core.a (nimbus.core) imports nimbus.adapters.api.app (nimbus.adapters.api)"
    ]
    assert circles(made_up) == [["nimbus.service.x", "nimbus.service.y", "nimbus.service.x"]]
    assert len(graph()["nimbus.service.executor"]) > 3  # the real graph has edges
