"""DESIGN.md's dependency rules, checked over the real import graph (every ``import`` statement in
every module, including those inside functions and under TYPE_CHECKING).

- the services (launcher, heartbeat, monitor, worker) never import one another;
- the library (shared/runherd) never imports a service, nor the wiring, the CLI and the web view (app, cli,
  views, ui);
- the worker never reaches the store, directly or through another module;
- only runherd.store imports asyncpg, only runherd.broker imports aio_pika;
- the rules (runherd.rules) reach neither driver, directly or through another module.

The checker takes the source roots as arguments, so the last tests run it on a copy of the tree with
one forbidden import added and see it caught.
"""

from __future__ import annotations

import ast
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SERVICES = ("runherd.launcher", "runherd.heartbeat", "runherd.monitor", "runherd.worker")
TOP = ("runherd.app", "runherd.cli", "runherd.views", "runherd.ui")


def _module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(module: str, path: Path) -> set[str]:
    """Every module name an import statement of ``path`` names (absolute, relative ones resolved)."""
    is_package = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")
                base = base[: len(base) - node.level + (1 if is_package else 0)]
                prefix = ".".join([*base, node.module] if node.module else base)
            else:
                prefix = node.module or ""
            found.add(prefix)
            # `from runherd import store` imports the module runherd.store.
            found.update(f"{prefix}.{alias.name}" for alias in node.names)
    return found


def import_graph(roots: list[Path]) -> dict[str, set[str]]:
    """module -> the names it imports, for every module of the ``runherd`` portions under ``roots``."""
    graph: dict[str, set[str]] = {}
    for root in roots:
        for path in sorted((root / "runherd").rglob("*.py")):
            name = _module_name(root, path)
            graph[name] = _imports(name, path)
    return graph


def _within(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def _reach(graph: dict[str, set[str]], start: str) -> dict[str, str]:
    """Every name reachable from ``start``, each with the module that imported it (for the message)."""
    seen: dict[str, str] = {}
    todo = [start]
    while todo:
        module = todo.pop()
        for name in graph.get(module, ()):
            if name not in seen:
                seen[name] = module
                if name in graph:
                    todo.append(name)
    return seen


def violations(roots: list[Path]) -> list[str]:
    graph = import_graph(roots)
    library = {m for root in roots if root.name == "shared" for m in graph if m in _portion(root)}
    found: list[str] = []
    for module, names in graph.items():
        own = next((s for s in SERVICES if _within(module, s)), None)
        for name in names:
            other = next((s for s in SERVICES if _within(name, s)), None)
            if own and other and other != own:
                found.append(f"{module} imports {name}: services never import one another")
            if module in library and (other or any(_within(name, t) for t in TOP)):
                found.append(f"{module} imports {name}: the library never imports a service, app, cli, views or ui")
            if _within(name, "asyncpg") and not _within(module, "runherd.store"):
                found.append(f"{module} imports {name}: only runherd.store imports asyncpg")
            if _within(name, "aio_pika") and not _within(module, "runherd.broker"):
                found.append(f"{module} imports {name}: only runherd.broker imports aio_pika")
        if _within(module, "runherd.worker"):
            for name, via in _reach(graph, module).items():
                if _within(name, "runherd.store") or _within(name, "asyncpg"):
                    found.append(f"{module} reaches {name} (through {via}): the worker never imports the store")
        if _within(module, "runherd.rules"):
            for name, via in _reach(graph, module).items():
                if _within(name, "asyncpg") or _within(name, "aio_pika"):
                    found.append(f"{module} reaches {name} (through {via}): the rules import neither driver")
    return sorted(set(found))


def _portion(root: Path) -> set[str]:
    return {_module_name(root, p) for p in (root / "runherd").rglob("*.py")}


def test_the_tree_keeps_the_dependency_rules() -> None:
    assert violations([ROOT / "shared", ROOT / "services"]) == []


def test_the_graph_sees_every_service_and_the_drivers() -> None:
    """A checker that sees nothing passes everything: make sure it sees the real edges."""
    graph = import_graph([ROOT / "shared", ROOT / "services"])
    assert {"runherd.worker.main", "runherd.monitor.service", "runherd.store.store", "runherd.broker"} <= set(graph)
    assert "asyncpg" in graph["runherd.store.store"]
    assert "aio_pika" in graph["runherd.broker"]


def _copy(tmp_path: Path) -> list[Path]:
    roots = []
    for part in ("shared", "services"):
        shutil.copytree(ROOT / part / "runherd", tmp_path / part / "runherd", ignore=shutil.ignore_patterns("*.pyc"))
        roots.append(tmp_path / part)
    return roots


@pytest.mark.parametrize(
    ("file", "line", "expected"),
    [
        ("services/runherd/monitor/service.py", "from runherd.launcher import service", "services never import"),
        ("services/runherd/worker/steps.py", "from ..monitor import actions", "services never import"),
        ("shared/runherd/plan.py", "import runherd.cli", "the library never imports"),
        ("shared/runherd/contract.py", "from runherd.heartbeat.service import x", "the library never imports"),
        ("services/runherd/worker/steps.py", "from runherd.store import Store", "the worker never imports the store"),
        ("shared/runherd/plan.py", "from runherd.store import retries", "the worker never imports the store"),
        ("services/runherd/launcher/service.py", "import asyncpg", "only runherd.store imports asyncpg"),
        ("shared/runherd/outbox.py", "from aio_pika import Message", "only runherd.broker imports aio_pika"),
        ("shared/runherd/rules/events.py", "from runherd.broker import Broker", "the rules import neither"),
    ],
)
def test_a_forbidden_import_is_caught(tmp_path: Path, file: str, line: str, expected: str) -> None:
    roots = _copy(tmp_path)
    target = tmp_path / file
    # Inside a function, where a reviewer would miss it most easily.
    target.write_text(target.read_text() + f"\n\ndef _sneaky() -> None:\n    {line}\n")
    found = violations(roots)
    assert any(expected in v for v in found), found
