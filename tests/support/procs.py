"""Start real processes on loopback for integration tests, and always stop them."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def env(src: Path | None = None) -> dict[str, str]:
    """This environment, with inferplane imported from ``src`` (this checkout's ``src/`` when
    None: a bench's side-by-side run of another commit passes that checkout's)."""
    e = dict(os.environ)
    e["PYTHONPATH"] = os.pathsep.join([str(src or ROOT / "src"), str(ROOT),
                                       e.get("PYTHONPATH", "")])
    e.setdefault("HF_HUB_OFFLINE", "1")
    return e


class Proc:
    """A child process that is killed (with its group) on `stop`."""

    def __init__(self, args: Sequence[str], log: Path, src: Path | None = None) -> None:
        self.log = log
        self._fh = log.open("wb")
        self.p = subprocess.Popen(
            [sys.executable, *args], stdout=self._fh, stderr=subprocess.STDOUT, env=env(src),
            cwd=ROOT, start_new_session=True,
        )

    def wait_http(self, url: str, timeout: float = 20.0, status: int = 200) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.p.poll() is not None:
                raise RuntimeError(f"process exited {self.p.returncode}: {self.log.read_text()}")
            try:
                if httpx.get(url, timeout=0.5).status_code == status:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        raise TimeoutError(f"{url} not ready; log: {self.log.read_text()}")

    def stop(self) -> None:
        terminate(self.p)
        self._fh.close()


def terminate(p: subprocess.Popen[bytes]) -> None:
    """End ``p`` if it still runs: SIGTERM, then SIGKILL if it has not ended 5 s later."""
    if p.poll() is None:
        p.terminate()
        try:
            p.wait(5)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(5)
