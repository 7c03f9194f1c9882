"""Whether the placement hot path runs compiled (mypyc) or as pure Python, and the import hook
that decides it once per process.

``scripts/compile_native.py`` (run by ``make install`` where mypyc and a C compiler are
present) compiles a few modules with mypyc into ``inferplane/_native/`` (git-ignored, beside
this file): one extension per module, mypyc's shared runtime (``inferplane_native__mypyc``)
and ``manifest.json``, which names every compiled module with the sha256 of the source it was
compiled from, the sha256 of every inferplane source those import (transitively: the compiled
code relies on their types), the size of every extension file, the interpreter's cache tag and
extension suffix, and the C flags
(which must include ``-ffp-contract=off``: `FP_CONTRACT_OFF`). The sources stay where they are;
nothing compiled sits beside them, so Python's own import finds only the ``.py`` files.

`install` (called by ``inferplane/__init__.py``) reads the manifest and puts a finder in front
of ``sys.meta_path`` that serves the compiled modules — only when every listed source hashes as
it did at the compile (the modules of one build call each other natively, and were compiled
against the types of what they import, so one edited file makes the whole build stale), the
interpreter is the one it was built for and its runtime loads. Otherwise every module is
imported from its source and, where a build exists but cannot be used, one warning says why
(logger ``inferplane.compiled``). ``INFERPLANE_PURE=1`` forces pure Python. `status` says which
one runs (``inferplane version``, the start-up lines, the ``inferplane_build_info`` metric).
"""

from __future__ import annotations

import hashlib
import importlib.machinery
import importlib.util
import json
import logging
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from importlib.machinery import ModuleSpec
from pathlib import Path
from types import ModuleType

log = logging.getLogger("inferplane.compiled")

PACKAGE_DIR = Path(__file__).resolve().parent
NATIVE_DIR = PACKAGE_DIR / "_native"
MANIFEST = "manifest.json"
MANIFEST_FORMAT = 1
ENV_PURE = "INFERPLANE_PURE"
#: The C flag every extension must have been compiled with (``scripts/compile_native.py``'s
#: ``FP_FLAGS``): without it GCC may fuse ``a*b + c`` into an FMA, which rounds differently from
#: CPython, so a compiled build could decide differently from pure Python.
FP_CONTRACT_OFF = "-ffp-contract=off"


@dataclass(frozen=True, slots=True)
class BuildStatus:
    """Which build runs: ``mode`` ``"compiled"`` or ``"pure"``; the compiled modules (empty
    when pure); why pure (empty when compiled); ``stale``: a build exists but was not used."""

    mode: str
    modules: tuple[str, ...] = ()
    reason: str = ""
    stale: bool = False

    def describe(self) -> str:
        if self.mode == "compiled":
            return f"compiled (mypyc: {len(self.modules)} modules)"
        return f"pure Python ({self.reason})"


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def check(native_dir: Path = NATIVE_DIR, package_dir: Path = PACKAGE_DIR) -> tuple[
    BuildStatus, dict[str, Path]
]:
    """Whether the build in ``native_dir`` may serve the sources in ``package_dir``: the status
    and, when compiled, module name → extension file (the runtime included)."""
    if os.environ.get(ENV_PURE, "").strip().lower() in ("1", "true", "yes", "on"):
        return BuildStatus("pure", reason=f"{ENV_PURE} is set"), {}
    path = native_dir / MANIFEST
    if not path.is_file():
        return BuildStatus("pure", reason="not compiled: scripts/compile_native.py"), {}

    def stale(why: str) -> tuple[BuildStatus, dict[str, Path]]:
        return BuildStatus("pure", reason=f"compiled build not used: {why}", stale=True), {}

    try:
        m = json.loads(path.read_text("utf-8"))
        if m.get("format") != MANIFEST_FORMAT:
            return stale(f"manifest format {m.get('format')!r}, expected {MANIFEST_FORMAT}")
        if m["cache_tag"] != sys.implementation.cache_tag:
            return stale(f"built for {m['cache_tag']}, running {sys.implementation.cache_tag}")
        suffix = importlib.machinery.EXTENSION_SUFFIXES[0]
        if m["ext_suffix"] != suffix:
            return stale(f"built as *{m['ext_suffix']}, this interpreter loads *{suffix}")
        if FP_CONTRACT_OFF not in m.get("cflags", {}).get("extension", []):
            return stale(f"built without {FP_CONTRACT_OFF} (re-run scripts/compile_native.py)")
        files: dict[str, Path] = {m["runtime"]: native_dir / m["files"][m["runtime"]]}
        changed: list[str] = []
        hashes = {src["path"]: src["sha256"] for src in m["sources"].values()}
        hashes.update(m["depends"])  # what the compiled code was compiled against
        for name in m["sources"]:
            files[name] = native_dir / m["files"][name]
        for rel, sha in hashes.items():
            source = package_dir / rel
            if not source.is_file() or _sha256(source) != sha:
                changed.append(rel)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return stale(f"unreadable manifest {path}: {exc!r}")
    if changed:
        return stale(
            f"{', '.join(changed)} changed after the compile (re-run scripts/compile_native.py)"
        )
    missing = [str(f) for f in files.values() if not f.is_file()]
    if missing:
        return stale(f"missing {', '.join(missing)}")
    sizes = m.get("sizes")  # a truncated extension would kill the process at its import (SIGBUS)
    if not isinstance(sizes, dict):
        return stale("the manifest lists no file sizes (re-run scripts/compile_native.py)")
    partial = [f.name for f in files.values() if f.stat().st_size != sizes.get(f.name)]
    if partial:
        return stale(f"{', '.join(partial)} not the size built (a partial copy?)")
    modules = tuple(sorted(n for n in files if n != m["runtime"]))
    return BuildStatus("compiled", modules=modules), files


class NativeFinder:
    """Serves the listed modules from their compiled extension files (a `sys.meta_path`
    finder); every other name falls through to the usual finders."""

    def __init__(self, files: dict[str, Path]) -> None:
        self.files = files

    def find_spec(
        self, fullname: str, path: Sequence[str] | None = None, target: ModuleType | None = None
    ) -> ModuleSpec | None:
        file = self.files.get(fullname)
        if file is None:
            return None
        loader = importlib.machinery.ExtensionFileLoader(fullname, str(file))
        return importlib.util.spec_from_file_location(fullname, file, loader=loader)


def load(status: BuildStatus, files: dict[str, Path]) -> BuildStatus:
    """Put the finder for ``files`` (`check`'s) in front of `sys.meta_path` and import the
    build's shared runtime and then every compiled module under it: if any fails to load (a
    truncated or corrupt file), the finder goes out again with every inferplane module imported
    meanwhile, so that they are imported again from their sources (pure)."""
    runtime = next(n for n in files if n not in status.modules)
    finder = NativeFinder(files)
    before = set(sys.modules)
    sys.meta_path.insert(0, finder)
    name = runtime
    try:  # a build that cannot load is not used at all (its modules call each other natively)
        for name in (runtime, *status.modules):
            importlib.import_module(name)
    except Exception as exc:
        sys.meta_path.remove(finder)
        for new in sorted(set(sys.modules) - before, reverse=True):
            if new == runtime or new.startswith("inferplane."):
                _forget(new)
        what = "its runtime" if name == runtime else name
        return BuildStatus(
            "pure", reason=f"compiled build not used: {what} fails to load: {exc!r}", stale=True,
        )
    return status


def _forget(name: str) -> None:
    """Drop module ``name`` from `sys.modules` and from its parent package's attributes (where
    ``from parent import child`` would otherwise still find it)."""
    module = sys.modules.pop(name, None)
    parent_name, _, child = name.rpartition(".")
    parent = sys.modules.get(parent_name)
    if module is not None and parent is not None and getattr(parent, child, None) is module:
        delattr(parent, child)


_status: BuildStatus | None = None


def install(native_dir: Path = NATIVE_DIR, package_dir: Path = PACKAGE_DIR) -> BuildStatus:
    """Decide once per process (module docstring); later calls return the first answer."""
    global _status
    if _status is not None:
        return _status
    status, files = check(native_dir, package_dir)
    if status.mode == "compiled":
        status = load(status, files)
    if status.stale:
        log.warning("inferplane: running pure Python: %s", status.reason)
    _status = status
    return status


def status() -> BuildStatus:
    """Which build this process runs (`install`'s answer)."""
    return _status if _status is not None else install()
