"""A private Redis for tests that stop, pause or kill it: ``redis-server --port <free port>
--save ''`` as a child process (skips the test when redis-server is not installed)."""

from __future__ import annotations

import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import redis

from tests.support.procs import free_port


class RedisServer:
    def __init__(self, tmp: Path) -> None:
        exe = shutil.which("redis-server")
        if exe is None:
            pytest.skip("redis-server is not installed")
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self._log = (tmp / f"redis-{self.port}.log").open("wb")
        self.p = subprocess.Popen(
            [exe, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(tmp)],
            stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        self.wait_up()

    def wait_up(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if redis.Redis.from_url(self.url, socket_timeout=0.2).ping():
                    return
            except redis.RedisError:
                time.sleep(0.05)
        raise TimeoutError(f"redis-server on port {self.port} did not start")

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url, decode_responses=True, socket_timeout=2)

    def pause(self) -> None:
        """SIGSTOP: the server keeps its data and its port but answers nothing (timeouts)."""
        self.p.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        self.p.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        if self.p.poll() is None:
            self.p.send_signal(signal.SIGCONT)
            self.p.kill()
            self.p.wait(5)
        self._log.close()
