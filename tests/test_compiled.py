"""The optional mypyc build (`inferplane.compiled`, ``scripts/compile_native.py``): used only
while it is current, pure Python otherwise, and both decide alike.

The manifest checks run on a fake build in a temporary directory; the tests marked ``needs a
build`` use this checkout's real one (``make install`` makes it where mypyc and a C compiler
are present) and are skipped, saying so, where there is none.
"""

from __future__ import annotations

import hashlib
import importlib.machinery
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from inferplane import compiled
from inferplane.compiled import ENV_PURE, BuildStatus, check, load
from tests.builders import load_file

ROOT = Path(__file__).resolve().parent.parent
SRC = ROOT / "src"
SUFFIX = importlib.machinery.EXTENSION_SUFFIXES[0]
REAL, _ = check()
needs_build = pytest.mark.skipif(
    os.environ.get(ENV_PURE) is not None or REAL.mode != "compiled",
    reason=f"no current compiled build here ({REAL.describe()}); `make install` or "  # conftest
    "scripts/compile_native.py makes one where mypyc and a C compiler are present",
)


def fake_build(
    tmp: Path, sources: dict[str, str], depends: dict[str, str] | None = None
) -> tuple[Path, Path]:
    """A package dir with ``sources`` (path → text) and a native dir whose manifest lists them
    as compiled (extension files that are empty placeholders), and ``depends`` (path → text) as
    what they import."""
    pkg, native = tmp / "pkg", tmp / "native"
    native.mkdir()
    files = {"rt__mypyc": f"rt__mypyc{SUFFIX}"}
    listed = {}
    for rel, text in sources.items():
        (pkg / rel).parent.mkdir(parents=True, exist_ok=True)
        (pkg / rel).write_text(text, "utf-8")
        name = "inferplane." + rel.removesuffix(".py").replace("/", ".")
        files[name] = f"{name}{SUFFIX}"
        listed[name] = {"path": rel, "sha256": hashlib.sha256(text.encode()).hexdigest()}
    deps = {}
    for rel, text in (depends or {}).items():
        (pkg / rel).parent.mkdir(parents=True, exist_ok=True)
        (pkg / rel).write_text(text, "utf-8")
        deps[rel] = hashlib.sha256(text.encode()).hexdigest()
    for f in files.values():
        (native / f).write_bytes(b"")
    manifest = {
        "format": 1, "cache_tag": sys.implementation.cache_tag, "ext_suffix": SUFFIX,
        "runtime": "rt__mypyc", "files": files, "sources": listed, "depends": deps,
        "cflags": {"extension": ["-O3", compiled.FP_CONTRACT_OFF]},
        "sizes": {f: 0 for f in files.values()},
    }
    (native / "manifest.json").write_text(json.dumps(manifest), "utf-8")
    return native, pkg


@pytest.fixture(autouse=True)
def _no_pure_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV_PURE, raising=False)


SOURCES = {"placement/fused.py": "x = 1\n", "physics/roofline.py": "y = 2\n"}


def test_a_current_build_is_used(tmp_path: Path) -> None:
    native, pkg = fake_build(tmp_path, SOURCES)
    status, files = check(native, pkg)
    assert status == BuildStatus(
        "compiled", modules=("inferplane.physics.roofline", "inferplane.placement.fused")
    )
    assert files["inferplane.placement.fused"] == native / f"inferplane.placement.fused{SUFFIX}"
    assert files["rt__mypyc"] == native / f"rt__mypyc{SUFFIX}"


def test_no_build_is_pure_without_a_warning(tmp_path: Path) -> None:
    status, files = check(tmp_path / "absent", tmp_path)
    assert status.mode == "pure" and not status.stale and files == {}
    assert "not compiled" in status.reason


def test_a_source_edited_after_the_compile_makes_the_whole_build_stale(tmp_path: Path) -> None:
    native, pkg = fake_build(tmp_path, SOURCES)
    (pkg / "physics/roofline.py").write_text("y = 3\n", "utf-8")
    status, files = check(native, pkg)
    assert status.mode == "pure" and status.stale and files == {}
    assert "physics/roofline.py changed after the compile" in status.reason
    (pkg / "physics/roofline.py").unlink()
    status, _ = check(native, pkg)
    assert status.stale and "physics/roofline.py" in status.reason


def test_an_edited_dependency_makes_the_build_stale(tmp_path: Path) -> None:
    """The compiled code was compiled against the types of what it imports."""
    native, pkg = fake_build(tmp_path, SOURCES, {"fleet/state.py": "z = 1\n"})
    assert check(native, pkg)[0].mode == "compiled"
    (pkg / "fleet/state.py").write_text("z: float = 1\n", "utf-8")
    status, _ = check(native, pkg)
    assert status.stale and "fleet/state.py changed after the compile" in status.reason


@pytest.mark.parametrize(
    ("field", "value", "words"),
    [
        ("cache_tag", "cpython-20", "built for cpython-20"),
        ("ext_suffix", ".other.so", "this interpreter loads"),
        ("format", 99, "manifest format 99"),
        ("files", {}, "unreadable manifest"),
    ],
)
def test_a_build_for_another_interpreter_or_format_is_not_used(
    tmp_path: Path, field: str, value: object, words: str
) -> None:
    native, pkg = fake_build(tmp_path, SOURCES)
    m = json.loads((native / "manifest.json").read_text("utf-8"))
    m[field] = value
    (native / "manifest.json").write_text(json.dumps(m), "utf-8")
    status, _ = check(native, pkg)
    assert status.mode == "pure" and status.stale and words in status.reason


def test_a_build_without_fp_contract_off_is_not_used(tmp_path: Path) -> None:
    """Compiled ``a*b + c`` may become an FMA (rounding unlike CPython) without the flag."""
    native, pkg = fake_build(tmp_path, SOURCES)
    m = json.loads((native / "manifest.json").read_text("utf-8"))
    for cflags in ({"extension": ["-O3"]}, None):
        if cflags is None:
            del m["cflags"]  # a manifest from before the flag
        else:
            m["cflags"] = cflags
        (native / "manifest.json").write_text(json.dumps(m), "utf-8")
        status, files = check(native, pkg)
        assert status.mode == "pure" and status.stale and files == {}
        assert "built without -ffp-contract=off" in status.reason


def _compile_native() -> Any:
    return load_file("compile_native", ROOT / "scripts" / "compile_native.py")


def test_the_compile_passes_fp_contract_off_to_every_extension() -> None:
    """What ``scripts/compile_native.py`` hands the C compiler: mypyc's flags, then
    ``-ffp-contract=off`` last (so it wins over an earlier ``-ffp-contract=fast``)."""
    cn = _compile_native()
    assert compiled.FP_CONTRACT_OFF in cn.FP_FLAGS
    exts = [SimpleNamespace(extra_compile_args=["-O3", "-ffp-contract=fast"]),
            SimpleNamespace(extra_compile_args=None)]
    args = cn.with_fp_flags(exts)
    assert args == ["-O3", "-ffp-contract=fast", *cn.FP_FLAGS]
    assert exts[0].extra_compile_args == args
    assert exts[1].extra_compile_args == list(cn.FP_FLAGS)


def test_one_run_at_a_time_builds_and_swaps(tmp_path: Path) -> None:
    """Two ``make install`` at once in one checkout take turns (an exclusive flock), and a
    stage a killed run left behind is removed."""
    import fcntl

    cn = _compile_native()
    (tmp_path / "_native.killed").mkdir()
    with cn.locked(tmp_path):
        assert not (tmp_path / "_native.killed").exists()
        with open(tmp_path / cn.LOCK, "a") as other, pytest.raises(BlockingIOError):
            fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
    with open(tmp_path / cn.LOCK, "a") as other:  # released
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)


def test_a_failed_swap_leaves_no_stage(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cn = _compile_native()
    stage = tmp_path / "_native.stage"

    def fake_build(package_dir: Path, verbose: bool, config: Path | None) -> Any:
        stage.mkdir()
        (stage / "manifest.json").write_text("{}", "utf-8")
        return stage, ["m"]

    def no_rename(self: Path, target: Path) -> None:
        raise OSError("rename refused")

    monkeypatch.setattr(cn, "build", fake_build)
    monkeypatch.setattr(Path, "rename", no_rename)
    with pytest.raises(OSError, match="rename refused"):
        cn.main(["--package-dir", str(tmp_path), "--force"])
    assert not stage.exists() and not (tmp_path / "_native").exists()


def test_a_missing_setuptools_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """mypyc needs setuptools (mypy's ``[mypyc]`` extra), which a 3.12 venv does not seed."""
    pytest.importorskip("mypyc.build")  # imported with setuptools present (3.11: not distutils)
    monkeypatch.setitem(sys.modules, "setuptools", None)
    with pytest.raises(RuntimeError) as err:
        _compile_native().build(tmp_path, False, None)
    assert "setuptools is not installed" in str(err.value)
    assert "pip install 'mypy[mypyc]'" in str(err.value)


def _installed(tmp: Path) -> Path:
    """This checkout's package as pip installs it: in a site-packages beside other
    distributions' modules (``typing_extensions.py`` among them, as in the Docker image)."""
    site = tmp / "site-packages"
    shutil.copytree(SRC / "inferplane", site / "inferplane",
                    ignore=shutil.ignore_patterns("__pycache__", "_native", "_native.*"))
    import typing_extensions

    shutil.copy2(typing_extensions.__file__, site / "typing_extensions.py")
    return site / "inferplane"


def test_an_installed_package_is_compiled_from_a_copy_not_from_site_packages(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """mypy takes its working directory as the user's code: run in site-packages, the
    modules there shadowed the library stubs (``typing_extensions.py: error: This file shadows
    library module``) and the Dockerfile's compile never compiled. It runs in a directory that
    holds only a copy of the package's sources."""
    mypyc_build = pytest.importorskip("mypyc.build")
    pytest.importorskip("setuptools")
    if shutil.which(os.environ.get("CC", "cc").split()[0]) is None and not shutil.which("gcc"):
        pytest.skip("no C compiler")
    pkg = _installed(tmp_path)
    seen: dict[str, Any] = {}

    def fake_mypycify(paths: list[str], **kw: Any) -> Any:
        cwd = Path.cwd()
        seen["cwd"], seen["listing"] = cwd, sorted(p.name for p in cwd.iterdir())
        seen["missing"] = [p for p in paths if p.endswith(".py") and not (cwd / p).is_file()]
        raise SystemExit(2)  # stop before mypy

    monkeypatch.setattr(mypyc_build, "mypycify", fake_mypycify)
    before = Path.cwd()
    with pytest.raises(RuntimeError, match="SystemExit"):
        _compile_native().build(pkg, False, None)
    assert seen["listing"] == ["inferplane"]
    assert seen["cwd"] != pkg.parent and seen["missing"] == []
    assert Path.cwd() == before
    assert not seen["cwd"].exists()  # the copy went with the temporary directory


@pytest.mark.slow
def test_a_real_compile_of_an_installed_package(tmp_path: Path) -> None:
    """The Dockerfile's step, ``--strict``: the package in a site-packages compiles
    (``pytest -m slow tests/test_compiled.py -k installed``; mypyc and cc, about a minute)."""
    pytest.importorskip("mypyc.build")
    pytest.importorskip("setuptools")
    pkg = _installed(tmp_path)
    assert _compile_native().main(["--package-dir", str(pkg), "--strict"]) == 0
    status, _ = check(pkg / "_native", pkg)
    assert status.mode == "compiled", status.describe()
    out = _run(WHICH, pkg.parent)
    assert out.stdout.split()[0] == "compiled" and out.stdout.strip().endswith(SUFFIX)


def test_ci_fails_instead_of_skipping_without_a_build() -> None:
    """``INFERPLANE_REQUIRE_NATIVE=1`` (``.ci/run``) turns `needs_build`'s skip into a failure
    (tests/conftest.py); without it, and for other skips, a skip stays a skip."""
    conftest = load_file("_conftest", ROOT / "tests" / "conftest.py")
    reason = needs_build.kwargs["reason"]
    assert reason.startswith(conftest.NATIVE_ABSENT)
    why = conftest.required_but_skipped(reason, {"INFERPLANE_REQUIRE_NATIVE": "1"})
    assert why is not None and why.startswith("INFERPLANE_REQUIRE_NATIVE=1, and no current")
    assert conftest.required_but_skipped(reason, {}) is None
    assert conftest.required_but_skipped(reason, {"INFERPLANE_REQUIRE_NATIVE": "0"}) is None
    assert conftest.required_but_skipped("no GPU", {"INFERPLANE_REQUIRE_NATIVE": "1"}) is None
    assert conftest.required_but_skipped(
        "Redis not reachable at x", {"INFERPLANE_REQUIRE_SERVICES": "1"}
    ) is not None


def test_a_missing_extension_file_is_not_used(tmp_path: Path) -> None:
    native, pkg = fake_build(tmp_path, SOURCES)
    (native / f"inferplane.placement.fused{SUFFIX}").unlink()
    status, _ = check(native, pkg)
    assert status.stale and "missing" in status.reason


def test_an_extension_file_not_the_size_built_is_not_used(tmp_path: Path) -> None:
    """A partial copy: loading a truncated shared object kills the process (SIGBUS)."""
    native, pkg = fake_build(tmp_path, SOURCES)
    (native / f"inferplane.placement.fused{SUFFIX}").write_bytes(b"x")
    status, _ = check(native, pkg)
    assert status.stale
    assert f"inferplane.placement.fused{SUFFIX} not the size built" in status.reason
    m = json.loads((native / "manifest.json").read_text("utf-8"))
    del m["sizes"]
    (native / "manifest.json").write_text(json.dumps(m), "utf-8")
    status, _ = check(native, pkg)
    assert status.stale and "no file sizes" in status.reason


def test_the_environment_forces_pure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    native, pkg = fake_build(tmp_path, SOURCES)
    monkeypatch.setenv(ENV_PURE, "1")
    status, files = check(native, pkg)
    assert status == BuildStatus("pure", reason=f"{ENV_PURE} is set") and files == {}


def test_a_runtime_that_fails_to_load_leaves_no_finder(tmp_path: Path) -> None:
    native, pkg = fake_build(tmp_path, SOURCES)  # the "extensions" are empty files
    status, files = check(native, pkg)
    before = list(sys.meta_path)
    got = load(status, files)
    assert got.mode == "pure" and got.stale and "runtime fails to load" in got.reason
    assert sys.meta_path == before and "rt__mypyc" not in sys.modules


def test_a_module_that_fails_to_load_leaves_no_finder_and_no_module(tmp_path: Path) -> None:
    """The runtime loads (here: a module already imported) but a module's file is corrupt."""
    corrupt = tmp_path / f"corrupt{SUFFIX}"
    corrupt.write_bytes(b"\x7fELF" + b"\0" * 60)  # a truncated shared object
    names = ("inferplane._test_corrupt_native",)
    files = {"json": Path(json.__file__), names[0]: corrupt}
    before = list(sys.meta_path)
    got = load(BuildStatus("compiled", modules=names), files)
    assert got.mode == "pure" and got.stale
    assert f"{names[0]} fails to load" in got.reason
    assert sys.meta_path == before and names[0] not in sys.modules and "json" in sys.modules


def test_this_process_reports_what_it_runs() -> None:
    status = compiled.status()
    assert status.mode in ("compiled", "pure")
    import inferplane.placement.fused as fused

    assert fused.__file__ is not None
    assert fused.__file__.endswith(SUFFIX) == (status.mode == "compiled")


def _run(code: str, pkg_parent: Path, **env: str) -> subprocess.CompletedProcess[str]:
    e = {k: v for k, v in os.environ.items() if k != ENV_PURE}
    e.update(env, PYTHONPATH=str(pkg_parent))
    return subprocess.run([sys.executable, "-c", code], env=e, capture_output=True,
                          text=True, timeout=120, check=True)


WHICH = ("import inferplane.compiled as c, inferplane.placement.fused as f; "
         "print(c.status().mode, f.__file__)")


@needs_build
def test_a_real_build_edited_after_the_compile_runs_pure_and_warns(tmp_path: Path) -> None:
    copy = tmp_path / "src"
    shutil.copytree(SRC / "inferplane", copy / "inferplane",
                    ignore=shutil.ignore_patterns("__pycache__"))
    out = _run(WHICH, copy)
    assert out.stdout.split()[0] == "compiled" and out.stdout.strip().endswith(SUFFIX)
    assert "pure" not in out.stderr
    fused = copy / "inferplane" / "placement" / "fused.py"
    fused.write_text(fused.read_text("utf-8") + "\n# edited after the compile\n", "utf-8")
    out = _run(WHICH, copy)
    assert out.stdout.split() == ["pure", str(fused)]
    assert out.stderr.count("running pure Python") == 1
    assert "placement/fused.py changed after the compile" in out.stderr
    out = _run(WHICH, copy, **{ENV_PURE: "1"})  # forced: no warning
    assert out.stdout.split()[0] == "pure" and out.stderr == ""


@needs_build
def test_a_real_build_with_a_corrupt_module_runs_pure_and_warns(tmp_path: Path) -> None:
    """A corrupt module file (its ELF header overwritten, the size kept) of a build that is
    otherwise current: the modules that loaded before it are dropped again, and everything runs
    from its source."""
    copy = tmp_path / "src"
    shutil.copytree(SRC / "inferplane", copy / "inferplane",
                    ignore=shutil.ignore_patterns("__pycache__"))
    # the last one listed that no other compiled module imports: imported after the others,
    # which load and are then dropped (one that another imports is loaded by mypyc's shared
    # runtime with it, not from its own file: `telemetry.records`, imported by `notes`)
    cn = _compile_native()
    imported = set().union(*(cn._imports(SRC / "inferplane" / rel) for rel in cn.MODULES))
    last = [m for m in REAL.modules if m not in imported][-1]
    ext = copy / "inferplane" / "_native" / f"{last}{SUFFIX}"
    data = ext.read_bytes()
    ext.write_bytes(b"\0" * 16 + data[16:])
    code = ("import inferplane.compiled as c, inferplane.placement.fused as f, "
            "inferplane.physics.roofline as r, inferplane.fleet.prefix_index as p; "
            "print(c.status().mode, f.__file__, r.__file__, p.__file__)")
    out = _run(code, copy)
    mode, *paths = out.stdout.split()
    assert mode == "pure" and len(paths) == 3 and all(p.endswith(".py") for p in paths)
    assert out.stderr.count("running pure Python") == 1
    assert "fails to load" in out.stderr and f"{last}{SUFFIX}" in out.stderr


@needs_build
def test_compiled_and_pure_decide_alike(tmp_path: Path) -> None:
    """Every decision of ``bench/placement_speed.py --dump`` (both bench fleets, every
    profile, loads, failures, reservations; exact float reprs) is byte-identical."""
    dumps = {}
    for mode, env in (("compiled", {}), ("pure", {ENV_PURE: "1"})):
        out = tmp_path / f"{mode}.txt"
        e = {k: v for k, v in os.environ.items() if k != ENV_PURE}
        e.update(env, PYTHONPATH=str(SRC))
        subprocess.run([sys.executable, str(ROOT / "bench" / "placement_speed.py"),
                        "--dump", str(out)], env=e, check=True, capture_output=True,
                       timeout=600)
        dumps[mode] = out.read_bytes()
    assert dumps["compiled"] == dumps["pure"] and len(dumps["pure"]) > 100_000


@needs_build
def test_compiled_and_pure_otel_notes_hand_over_alike() -> None:
    """The OTel notes (`telemetry.notes`, compiled): ``tests/support/otel_notes_dump.py`` drives
    the same traces (own and a caller's, sampled and not, an invalid ``traceparent``, two
    stages and a nested one, a failed attempt then a good one, streamed usage, a refused and an
    unplaced request, ``end`` twice) with the same clock and ids; what they hand over (every
    record, compact or full; the outgoing headers; the metric points) is byte-identical."""
    script = ROOT / "tests" / "support" / "otel_notes_dump.py"
    dumps, builds = {}, {}
    for mode, env in (("compiled", {}), ("pure", {ENV_PURE: "1"})):
        e = {k: v for k, v in os.environ.items() if k != ENV_PURE}
        e.update(env, PYTHONPATH=str(SRC))
        out = subprocess.run([sys.executable, str(script)], env=e, check=True,
                             capture_output=True, text=True, timeout=120)
        dumps[mode], builds[mode] = out.stdout, out.stderr.split()
    assert builds["compiled"][:2] == ["build", "compiled"] and builds["compiled"][2].endswith(
        SUFFIX)
    assert builds["pure"][:2] == ["build", "pure"] and builds["pure"][2].endswith("notes.py")
    assert dumps["compiled"] == dumps["pure"]
    lines = dumps["pure"].splitlines()
    assert lines[-1] == "sampled 5 records 5 points 7"
    records = [line for line in lines if line.startswith("record ")]
    assert sum("compact=True" in r for r in records) == 3 and len(records) == 5
    assert "'not_accounted'" in dumps["pure"] and "'upstream_error', 500" in dumps["pure"]
    assert any(line.endswith("-00')]") for line in lines)  # a caller's unsampled trace


@needs_build
def test_compiled_and_pure_otel_exporter_encodes_alike(tmp_path: Path) -> None:
    """The exporter's encoder (`telemetry.records`, compiled): ``bench/otel_encode.py`` hands
    over the same 600 records (written by the pure run, read by the compiled one) in batches as
    the gateway does and encodes them to OTLP; the export requests are byte-identical. (The
    property tests of tests/test_otel_encoding.py hold either build to the SDK's encoder for
    every shape of request.)"""
    recs = tmp_path / "records.pickle"
    dumps = {}
    for mode, env in (("pure", {ENV_PURE: "1"}), ("compiled", {})):
        out = tmp_path / f"{mode}.bin"
        e = {k: v for k, v in os.environ.items() if k != ENV_PURE}
        e.update(env, PYTHONPATH=str(SRC))
        subprocess.run([sys.executable, str(ROOT / "bench" / "otel_encode.py"), "--requests",
                        "600", "--repeat", "0", "--records", str(recs), "--dump", str(out)],
                       env=e, check=True, capture_output=True, timeout=300)
        dumps[mode] = out.read_bytes()
    assert dumps["compiled"] == dumps["pure"] and len(dumps["pure"]) > 100_000


def test_version_and_metric_say_which_build_runs() -> None:
    from prometheus_client import generate_latest
    from typer.testing import CliRunner

    from inferplane.cli import app
    from inferplane.telemetry.metrics import GatewayMetrics

    status = compiled.status()
    out = CliRunner().invoke(app, ["version"])
    assert out.exit_code == 0
    assert f"placement: {status.describe()}" in out.output
    assert all(name in out.output for name in status.modules)
    text = generate_latest(GatewayMetrics().registry).decode()
    assert f'inferplane_build_info{{placement="{status.mode}",version="' in text
