"""The package layering: no import cycle between inferplane's packages, and a core that knows
no HTTP library.

Every ``import`` under src/inferplane counts, including those inside functions and under
``TYPE_CHECKING``: a cycle hidden in a lazy import is still a cycle of the design.
"""

from __future__ import annotations

import ast
from pathlib import Path

from tests.support.import_graph import cycles

SRC = Path(__file__).resolve().parents[1] / "src" / "inferplane"


def _unit(module: str) -> str:
    """``inferplane.api.app`` → ``api``; ``inferplane.cli`` → ``cli``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def _imports(path: Path) -> set[str]:
    """The absolute ``inferplane.*`` modules one file imports."""
    package = list(path.relative_to(SRC.parent).with_suffix("").parts[:-1])
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            found.add(mod)
            found.update(f"{mod}.{a.name}" for a in node.names)
    return {m for m in found if m.startswith("inferplane.")}


def package_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for path in SRC.rglob("*.py"):
        rel = path.relative_to(SRC.parent).with_suffix("")
        me = _unit(".".join(rel.parts))
        deps = graph.setdefault(me, set())
        for mod in _imports(path):
            other = _unit(mod)
            if other != me and ((SRC / other).is_dir() or (SRC / f"{other}.py").exists()):
                deps.add(other)
    return graph


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle_between_packages() -> None:
    graph = package_graph()
    assert {"api", "batch", "core", "dispatch"} <= graph.keys()
    found = cycles(graph)
    assert not found, f"package import cycles under src/inferplane: {found}"


def test_core_imports_no_http_library() -> None:
    for path in (SRC / "core").rglob("*.py"):
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            names = (
                [a.name for a in node.names] if isinstance(node, ast.Import)
                else [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            )
            for n in names:
                top = n.split(".")[0]
                assert top not in {"aiohttp", "grpc", "httpx", "requests"}, (
                    f"{path.relative_to(SRC)} imports {n}"
                )
                assert not n.startswith(("inferplane.api", "inferplane.epp", "inferplane.batch",
                                         "inferplane.dispatch.upstream")), (
                    f"{path.relative_to(SRC)} imports the front end or transport {n}"
                )


def test_no_package_imports_another_packages_private_names() -> None:
    """A name with a leading underscore is its package's own: another package that needs it
    needs it moved to a shared, public place (`inferplane check --connect` imported
    ``batch.routes._dsn`` and ``ledger.build`` ``config.schema._NAME`` before edge28).
    Covers ``from inferplane.x import _name`` only: an attribute reached through an imported
    module (``import inferplane.x as m; m._name``) is not looked for."""
    found = []
    for path in SRC.rglob("*.py"):
        me = _unit(".".join(path.relative_to(SRC.parent).with_suffix("").parts))
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not (isinstance(node, ast.ImportFrom) and not node.level
                    and (node.module or "").startswith("inferplane")):
                continue
            module = node.module or ""
            if _unit(module) == me:
                continue
            found += [f"{path.relative_to(SRC)}: {module}.{a.name}" for a in node.names
                      if a.name.startswith("_") and not a.name.startswith("__")]
    assert not found, found
