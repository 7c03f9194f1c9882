#!/usr/bin/env python3
"""Compile the placement hot path with mypyc (optional; ``make install`` runs it).

    .venv/bin/python scripts/compile_native.py [--package-dir DIR] [--config-file F] [--force]
                                                [--clean] [--strict]

Compiles `MODULES` (paths under the package) with mypyc — shipped with mypy, a dev dependency —
and the C compiler into one build: an extension per module and mypyc's shared runtime
(``inferplane_native__mypyc``). The build is made from a copy of the package's sources in a
temporary directory and then replaces ``<package-dir>/_native/`` (default: this checkout's
``src/inferplane``, git-ignored; an installed package's directory in site-packages works too:
the Dockerfile) with the extensions and
``manifest.json`` (the sha256 of each compiled source and of every inferplane source they import,
transitively — the compiled code relies on their types —, the interpreter's cache tag and
extension suffix, the C flags and the machine). Every extension is compiled with `FP_FLAGS`
(``-ffp-contract=off``): GCC's default in GNU C mode fuses ``a*b + c`` into one FMA instruction
wherever the target has one (every aarch64 build, x86-64 with ``-march=haswell``/``native``),
which rounds differently from CPython's separate multiply and add and so could change a
decision; a build without it is stale. `inferplane.compiled` uses that build only while every
listed source still hashes the same; the sources themselves are untouched.

When mypyc or a C compiler is missing, or the compile fails, it prints one line saying so,
removes any previous build and exits 0 (``--strict``: 1): inferplane then runs as pure Python.
A build that is current (same sources, interpreter and mypyc) is kept unless ``--force``.
``--clean`` only removes the build. ``INFERPLANE_PURE=1`` at run time ignores a build.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import fcntl
import hashlib
import importlib.machinery
import io
import json
import os
import platform
import shutil
import sys
import sysconfig
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
#: The compiled modules, relative to the package directory (docs/placement.md, "Compiled").
MODULES = (
    "placement/fused.py",
    "placement/fused_filters.py",
    "placement/fused_pick.py",
    "placement/latency_terms.py",
    "placement/scored.py",
    "fleet/prefix_index.py",
    "physics/roofline.py",
    "telemetry/notes.py",
    "telemetry/records.py",
)
#: Added after mypyc's own flags to every extension: no contraction of ``a*b + c`` into an FMA,
#: so compiled float arithmetic rounds exactly like CPython's (``inferplane.compiled`` treats a
#: build whose manifest lacks it as stale).
FP_FLAGS = ("-ffp-contract=off",)
GROUP = "inferplane_native"
#: The build in the making, beside ``_native`` (renamed onto it when complete), and the lock file
#: that makes one run at a time build and swap in one package directory.
STAGE_PREFIX = "_native."
LOCK = "_native.lock"
RUNTIME = f"{GROUP}__mypyc"


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _module_name(rel: str) -> str:
    return "inferplane." + rel.removesuffix(".py").replace("/", ".")


def _imports(path: Path) -> set[str]:
    """The ``inferplane`` modules a source imports (any import statement, typing-only ones
    too)."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text("utf-8"))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.split(".")[0] == "inferplane")
        elif (isinstance(node, ast.ImportFrom) and node.module and node.level == 0
              and node.module.split(".")[0] == "inferplane"):
            out.add(node.module)
            out.update(f"{node.module}.{a.name}" for a in node.names)
    return out


def dependencies(package_dir: Path, modules: tuple[str, ...]) -> list[str]:
    """The package's sources (paths under it) that `modules` import, transitively, the
    packages' ``__init__.py`` included and `modules` themselves excluded: compiled code was
    compiled against their types, so a change there makes the build stale too."""
    seen: set[str] = set()
    todo = [package_dir / m for m in modules]
    while todo:
        path = todo.pop()
        for name in _imports(path):
            parts = name.split(".")[1:]
            for k in range(len(parts) + 1):  # the module, or a package's __init__
                for cand in (package_dir.joinpath(*parts[:k]).with_suffix(".py") if k else None,
                             package_dir.joinpath(*parts[:k], "__init__.py")):
                    if cand is None or not cand.is_file():
                        continue
                    rel = cand.relative_to(package_dir).as_posix()
                    if rel not in seen:
                        seen.add(rel)
                        todo.append(cand)
    return sorted(seen - set(modules))


def with_fp_flags(exts: Iterable[Any]) -> list[str]:
    """Append `FP_FLAGS` to each extension's ``extra_compile_args`` (after mypyc's, so they win
    over any ``-ffp-contract`` before them, ``CFLAGS`` included) and return the first one's."""
    args: list[str] = []
    for ext in exts:
        ext.extra_compile_args = [*(ext.extra_compile_args or []), *FP_FLAGS]
        args = args or list(ext.extra_compile_args)
    return args


def copy_sources(package_dir: Path, dest: Path) -> Path:
    """Copy the package's sources (no build, no bytecode) to ``<dest>/inferplane`` and return
    `dest`, the directory mypy runs in. mypy takes its working directory as the user's code:
    the package's own parent would do in a checkout (``src/``), but an installed package's is
    site-packages, where ``typing_extensions.py`` and the rest then shadow the library stubs
    and the compile fails (the Dockerfile's)."""
    shutil.copytree(package_dir, dest / "inferplane",
                    ignore=shutil.ignore_patterns("_native", f"{STAGE_PREFIX}*", "__pycache__",
                                                  "*.pyc", "*.so"))
    return dest


def build(package_dir: Path, verbose: bool, config: Path | None) -> tuple[Path, list[str]]:
    """Compile into a fresh directory beside the package's ``_native`` and return it, with
    the modules compiled."""
    try:
        import mypy.version
        from mypyc.build import mypycify
        from setuptools import Distribution
    except ImportError as exc:
        raise RuntimeError(
            f"mypyc cannot run: {exc.name or exc} is not installed "
            "(pip install 'mypy[mypyc]': mypy, and setuptools which mypyc needs)"
        ) from None
    cc = os.environ.get("CC", "cc").split()[0]
    if shutil.which(cc) is None and shutil.which("gcc") is None:
        raise RuntimeError(f"no C compiler ({cc!r} and 'gcc' not on PATH)")
    sources = {_module_name(m): package_dir / m for m in MODULES}
    before = {name: _sha256(p) for name, p in sources.items()}
    deps = {rel: _sha256(package_dir / rel) for rel in dependencies(package_dir, MODULES)}
    suffix = importlib.machinery.EXTENSION_SUFFIXES[0]
    work = Path(tempfile.mkdtemp(prefix="inferplane-native-"))
    try:
        tree = copy_sources(package_dir, work / "src")
        old = Path.cwd()
        os.chdir(tree)  # mypy names modules from the paths: inferplane.placement.fused
        out = io.StringIO()
        try:
            redirect = contextlib.nullcontext() if verbose else contextlib.redirect_stdout(out)
            with redirect, (contextlib.nullcontext() if verbose
                            else contextlib.redirect_stderr(out)):
                options = ["--cache-dir", str(work / "mypy-cache")]
                if config is not None:
                    options += ["--config-file", str(config)]
                exts = mypycify(
                    [*(str(Path("inferplane") / m) for m in MODULES), *options],
                    opt_level="3",
                    target_dir=str(work / "c"),
                    group_name=GROUP,
                )
                ext_args = with_fp_flags(exts)
                dist = Distribution({"name": "inferplane-native", "ext_modules": exts})
                cmd = dist.get_command_obj("build_ext")
                cmd.build_lib = str(work / "lib")  # type: ignore[attr-defined]
                cmd.build_temp = str(work / "tmp")  # type: ignore[attr-defined]
                cmd.parallel = os.cpu_count() or 1  # type: ignore[attr-defined]
                dist.run_command("build_ext")
        except (Exception, SystemExit) as exc:
            tail = out.getvalue().strip().splitlines()[-3:]
            raise RuntimeError(f"{exc!r}: {' | '.join(tail)}") from None
        finally:
            os.chdir(old)
        lib = work / "lib"
        files = {RUNTIME: f"{RUNTIME}{suffix}"}
        built = {RUNTIME: lib / files[RUNTIME]}
        for name, rel in zip(sources, MODULES, strict=True):
            files[name] = f"{name}{suffix}"
            built[name] = lib / "inferplane" / (rel.removesuffix(".py") + suffix)
        missing = [str(p) for p in built.values() if not p.is_file()]
        if missing:
            raise RuntimeError(f"the compile did not produce {', '.join(missing)}")
        after = {name: _sha256(p) for name, p in sources.items()}
        if after != before or deps != {rel: _sha256(package_dir / rel) for rel in deps}:
            raise RuntimeError("a source changed during the compile; run it again")
        stage = Path(tempfile.mkdtemp(prefix=STAGE_PREFIX, dir=package_dir))
        try:  # a stage never stays behind a failure
            for name, path in built.items():
                shutil.copy2(path, stage / files[name])
            manifest = {
                "format": 1,
                "cache_tag": sys.implementation.cache_tag,
                "ext_suffix": suffix,
                "mypy": mypy.version.__version__,
                "machine": platform.machine(),
                "cflags": {
                    "extension": ext_args,
                    "CFLAGS": os.environ.get("CFLAGS", ""),
                    "sysconfig": sysconfig.get_config_var("CFLAGS") or "",
                },
                "built_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "runtime": RUNTIME,
                "files": files,
                "sizes": {f: (stage / f).stat().st_size for f in files.values()},
                "sources": {
                    name: {"path": rel, "sha256": before[name]}
                    for name, rel in zip(sources, MODULES, strict=True)
                },
                "depends": deps,
            }
            (stage / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n", "utf-8")
        except BaseException:
            shutil.rmtree(stage, ignore_errors=True)
            raise
        return stage, list(sources)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def current(package_dir: Path) -> bool:
    """Whether ``<package_dir>/_native`` already holds a build of these sources, of `MODULES`,
    by this interpreter and this mypyc."""
    try:
        import mypy.version

        m = json.loads((package_dir / "_native" / "manifest.json").read_text("utf-8"))
        return (
            m["cache_tag"] == sys.implementation.cache_tag
            and all(f in m["cflags"]["extension"] for f in FP_FLAGS)
            and m["mypy"] == mypy.version.__version__
            and [s["path"] for s in m["sources"].values()] == list(MODULES)
            and all(_sha256(package_dir / s["path"]) == s["sha256"]
                    for s in m["sources"].values())
            and m["depends"] == {rel: _sha256(package_dir / rel)
                                 for rel in dependencies(package_dir, MODULES)}
            and all((package_dir / "_native" / f).is_file() for f in m["files"].values())
        )
    except (ImportError, OSError, ValueError, KeyError, TypeError):
        return False


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--package-dir", type=Path, default=ROOT / "src" / "inferplane",
                    help="the inferplane package to compile (default: this checkout's)")
    ap.add_argument("--config-file", type=Path, default=ROOT / "pyproject.toml",
                    help="mypy's configuration (default: this checkout's pyproject.toml)")
    ap.add_argument("--clean", action="store_true", help="only remove the build")
    ap.add_argument("--force", action="store_true", help="compile even when the build is current")
    ap.add_argument("--strict", action="store_true", help="exit 1 when it cannot compile")
    ap.add_argument("-v", "--verbose", action="store_true", help="show mypyc's and cc's output")
    args = ap.parse_args(argv)
    package_dir: Path = args.package_dir.resolve()
    with locked(package_dir):
        return _run(args, package_dir)


@contextlib.contextmanager
def locked(package_dir: Path) -> Iterator[None]:
    """Hold ``<package_dir>/_native.lock`` exclusively (waiting for another run: two ``make
    install`` at once in one checkout take turns), and remove any stage a killed run left."""
    with open(package_dir / LOCK, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        for old in package_dir.glob(f"{STAGE_PREFIX}*"):
            if old.is_dir():
                shutil.rmtree(old, ignore_errors=True)
        yield  # the lock goes with the file's closing


def _run(args: argparse.Namespace, package_dir: Path) -> int:
    dest = package_dir / "_native"
    if args.clean:
        shutil.rmtree(dest, ignore_errors=True)
        print(f"compile_native: removed {dest}; inferplane runs as pure Python")
        return 0
    if not args.force and current(package_dir):
        print(f"compile_native: {dest} is current (--force compiles again)")
        return 0
    t0 = time.monotonic()
    try:
        config = args.config_file.resolve() if args.config_file.is_file() else None
        stage, names = build(package_dir, args.verbose, config)
    except RuntimeError as exc:
        shutil.rmtree(dest, ignore_errors=True)  # never leave an older build behind
        print(f"compile_native: not compiled, inferplane runs as pure Python: {exc}")
        return 1 if args.strict else 0
    try:
        shutil.rmtree(dest, ignore_errors=True)
        stage.rename(dest)
    finally:
        shutil.rmtree(stage, ignore_errors=True)  # left only where the rename failed
    print(f"compile_native: compiled {len(names)} modules with mypyc into {dest} "
          f"in {time.monotonic() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
