"""`inferplane serve --workers N` (issue 14 item 3): N processes on one port sharing Redis; a
clear start-up error without a shared store; a killed worker is restarted; SIGTERM stops all."""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from inferplane.api.workers import STARTUP_ENV, STARTUP_S, startup_s
from tests.support.procs import ROOT, Proc, env, free_port
from tests.support.redis_server import RedisServer
from tests.test_redis_outage import KEYS, _config, slow_upstream
from tests.test_worker_metrics import tmpdir_env

__all__ = ["slow_upstream", "tmpdir_env"]


def test_the_startup_window_reads_its_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Seconds >= 0 and finite; anything else (``inf`` would make every worker's death a failed
    start) stops the supervisor with one line."""
    monkeypatch.delenv(STARTUP_ENV, raising=False)
    assert startup_s() == STARTUP_S
    for good, want in (("0", 0.0), ("2.5", 2.5)):
        monkeypatch.setenv(STARTUP_ENV, good)
        assert startup_s() == want
    for bad in ("-1", "soon", "nan", "inf", "Infinity", "1e999"):
        monkeypatch.setenv(STARTUP_ENV, bad)
        with pytest.raises(SystemExit) as exc:
            startup_s()
        assert str(exc.value) == (
            f"inferplane: {STARTUP_ENV}={bad!r} is not a finite number of seconds >= 0"
        ), bad


def test_workers_need_a_shared_store(tmp_path: Path) -> None:
    r = subprocess.run(
        [sys.executable, "-m", "inferplane.cli", "serve", "--config",
         str(ROOT / "examples/quickstart.yaml"), "--workers", "2"],
        capture_output=True, text=True, env=env(), cwd=ROOT, timeout=60,
    )
    assert r.returncode == 2
    assert "--workers 2 needs admission.store: redis" in r.stderr
    assert "Traceback" not in r.stderr


def test_workers_without_a_usable_temporary_directory_say_so(
    monkeypatch: pytest.MonkeyPatch
) -> None:
    """The supervisor makes a directory for the workers' metrics sockets before it forks:
    where it cannot (a full or read-only temporary directory), it stops with one line saying
    so, not a traceback, and forks nothing."""
    from inferplane.api import workers
    from inferplane.api.console_auth import SECRET_ENV

    monkeypatch.setenv(SECRET_ENV, "s" * 64)  # supervise sets one where none is: restored after

    def full() -> str:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(workers, "pages_directory", full)
    monkeypatch.setattr(workers.os, "fork", lambda: pytest.fail("forked"))
    with pytest.raises(SystemExit) as exc:
        workers.supervise(2, lambda _i: 0)
    assert "cannot make the workers' metrics directory" in str(exc.value)
    assert "No space left on device" in str(exc.value)


def _serve_two_workers(tmp_path: Path, upstream: int) -> tuple[RedisServer, Proc, str]:
    """A Redis server and ``serve --workers 2`` in front of ``upstream``; the gateway's URL."""
    srv = RedisServer(tmp_path)
    port = free_port()
    cfg = tmp_path / "gw.yaml"
    cfg.write_text(_config(port, upstream, srv.url))
    gw = Proc(["-m", "inferplane.cli", "serve", "--config", str(cfg), "--workers", "2"],
              tmp_path / "gw.log")
    return srv, gw, f"http://127.0.0.1:{port}"


def _workers_of(gw: Proc, base: str) -> list[int]:
    """Once the gateway is ready and both workers listen: the supervisor's two children."""
    gw.wait_http(f"{base}/ready")
    deadline = time.monotonic() + 20
    while gw.log.read_text().count("listening on") < 2:
        assert time.monotonic() < deadline, gw.log.read_text()
        time.sleep(0.1)
    kids = subprocess.run(["pgrep", "-P", str(gw.p.pid)], capture_output=True, text=True)
    pids = [int(k) for k in kids.stdout.split()]
    assert len(pids) == 2
    return pids


def test_two_workers_share_the_port_and_stop_together(
    tmp_path: Path, slow_upstream: int
) -> None:
    srv, gw, base = _serve_two_workers(tmp_path, slow_upstream)
    try:
        _workers_of(gw, base)
        chat = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}
        for i in range(8):
            r = httpx.post(f"{base}/v1/chat/completions", json=chat, timeout=10,
                           headers={"Authorization": f"Bearer {KEYS['plain']}",
                                    "Idempotency-Key": str(i)})
            assert r.status_code == 200, r.text
        gw.p.send_signal(signal.SIGTERM)
        assert gw.p.wait(20) == 0
        assert subprocess.run(["pgrep", "-P", str(gw.p.pid)], capture_output=True).stdout == b""
    finally:
        gw.stop()
        srv.stop()
    assert "Traceback" not in gw.log.read_text()


def test_workers_stop_when_their_supervisor_is_killed(
    tmp_path: Path, slow_upstream: int, tmpdir_env: Path
) -> None:
    """SIGKILL to the supervisor (no chance to pass anything on): the kernel sends each worker
    SIGTERM (PR_SET_PDEATHSIG) and they stop, instead of serving on with nobody to stop them;
    they remove their metrics sockets and the last one their directory, which the supervisor
    can no longer do (`telemetry.gather.PageServer.close`)."""
    tmp = tmpdir_env
    srv, gw, base = _serve_two_workers(tmp_path, slow_upstream)
    kids: list[int] = []
    try:
        kids = _workers_of(gw, base)
        deadline = time.monotonic() + 20
        while len(list(tmp.glob("inferplane-workers-*/worker-*.sock"))) < 2:
            assert time.monotonic() < deadline, list(tmp.rglob("*"))
            time.sleep(0.1)
        gw.p.kill()
        gw.p.wait(10)
        deadline = time.monotonic() + 30
        while any(_alive(k) for k in kids):
            assert time.monotonic() < deadline, f"workers {kids} outlived their supervisor"
            time.sleep(0.1)
        assert list(tmp.iterdir()) == []
    finally:
        for k in kids:  # never leave one behind, whatever failed above
            with contextlib.suppress(ProcessLookupError):
                os.kill(k, signal.SIGKILL)
        gw.stop()
        srv.stop()
    assert "Traceback" not in gw.log.read_text()


def _alive(pid: int) -> bool:
    """Running, not a zombie waiting for init to reap it."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return "\nState:\tZ" not in status
