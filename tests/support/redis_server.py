"""A private Redis for tests that stop, pause or kill it: ``redis-server --port <free port>
--save ''`` as a child process (skips the test when redis-server is not installed)."""

from __future__ import annotations

import shutil
import signal
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

import pytest
import redis

from tests.support.procs import free_port


class RedisServer:
    """``persist``: an append-only file fsynced on every write, so that `start` after `stop`
    (a Redis restarted on the same port and directory) has its data back."""

    def __init__(self, tmp: Path, *, persist: bool = False, args: Sequence[str] = ()) -> None:
        exe = shutil.which("redis-server")
        if exe is None:
            pytest.skip("redis-server is not installed")
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self._args = [exe, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                      "--dir", str(tmp)]
        self._args += (["--appendonly", "yes", "--appendfsync", "always"] if persist
                       else ["--appendonly", "no"])
        self._args += list(args)  # more redis-server options (``--requirepass``, ``--maxmemory``)
        self._log = (tmp / f"redis-{self.port}.log").open("ab")
        self.start()

    def start(self) -> None:
        """Start (again, after `stop`: same port, same directory)."""
        if self._log.closed:
            self._log = open(self._log.name, "ab")  # noqa: SIM115 - closed in `stop`
        self.p = subprocess.Popen(
            self._args, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        self.wait_up()

    def wait_up(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if redis.Redis.from_url(self.url, socket_timeout=0.2).ping():
                    return
            except (redis.AuthenticationError, redis.ResponseError):  # up, asks for a password
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
