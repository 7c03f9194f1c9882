"""The twin's rooms: no import cycle between modules under ``src/inferplane/twin`` and imports
that point one way between rooms (see ``inferplane/twin/__init__.py``).

Every import statement counts, wherever it is: module level, inside a function (a lazy import)
or under ``if TYPE_CHECKING:`` — a cycle hidden in any of them is still a cycle of files.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.support.import_graph import cycles

SRC = Path(__file__).resolve().parents[1] / "src"
TWIN = SRC / "inferplane" / "twin"
PKG = "inferplane.twin"

# room -> the rooms it may import from
ALLOWED = {
    "traces": set[str](),
    "engine": set[str](),
    "emulator": {"engine"},
    "simulator": {"engine", "traces"},
}


def _module_name(path: Path, src: Path) -> str:
    parts = list(path.relative_to(src).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules(root: Path, src: Path) -> dict[str, Path]:
    return {_module_name(p, src): p for p in sorted(root.rglob("*.py"))}


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The modules in ``known`` that ``path`` (module ``name``) imports, anywhere in the file."""
    is_pkg = path.name == "__init__.py"
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text("utf-8"), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")
                base = base[: len(base) - node.level + (1 if is_pkg else 0)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            # ``from pkg import sub`` imports the submodule ``pkg.sub`` when there is one
            targets = [mod] + [f"{mod}.{a.name}" for a in node.names]
        else:
            continue
        for t in targets:
            # importing ``a.b.c`` runs ``a.b`` and ``a`` too; the deepest known one is the edge
            while t and t not in known:
                t = t.rpartition(".")[0]
            if t and t != name:
                out.add(t)
    return out


def _graph(root: Path = TWIN, src: Path = SRC) -> dict[str, set[str]]:
    mods = _modules(root, src)
    known = set(mods)
    return {m: _imports(m, p, known) for m, p in mods.items()}


def _room(module: str) -> str | None:
    rest = module.removeprefix(PKG + ".")
    return rest.split(".")[0] if rest != module else None


def test_no_import_cycles_under_twin() -> None:
    found = cycles(_graph())
    assert found == [], f"import cycles between twin modules: {found}"


def test_rooms_import_one_way() -> None:
    assert {p.name for p in TWIN.iterdir() if (p / "__init__.py").exists()} == set(ALLOWED)
    wrong = []
    for mod, deps in _graph().items():
        room = _room(mod)
        for dep in deps:
            other = _room(dep)
            if room and other and other != room and other not in ALLOWED[room]:
                wrong.append(f"{mod} -> {dep}")
    assert wrong == [], f"imports against the rooms' direction: {sorted(wrong)}"


def test_sim_package_is_gone() -> None:
    assert not (SRC / "inferplane" / "sim").exists()


# -- the checker itself must be able to fail -------------------------------------------------
def _write(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text, "utf-8")


@pytest.mark.parametrize(
    ("a_text", "expected"),
    [
        ("from inferplane.twin.x import b\n", [["inferplane.twin.x.a", "inferplane.twin.x.b"]]),
        ("from . import b\n", [["inferplane.twin.x.a", "inferplane.twin.x.b"]]),
        (
            "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .b import f\n",
            [["inferplane.twin.x.a", "inferplane.twin.x.b"]],
        ),
        (
            "def g():\n    import inferplane.twin.x.b\n",
            [["inferplane.twin.x.a", "inferplane.twin.x.b"]],
        ),
        ("import os\n", []),
    ],
)
def test_cycle_checker_finds_cycles(tmp_path: Path, a_text: str, expected: list[list[str]]) -> None:
    root = tmp_path / "inferplane" / "twin"
    _write(
        root,
        {
            "__init__.py": "",
            "x/__init__.py": "",
            "x/a.py": a_text,
            "x/b.py": "from inferplane.twin.x.a import f\n",
        },
    )
    assert cycles(_graph(root, tmp_path)) == expected
