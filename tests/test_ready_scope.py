"""``GET /ready`` and the probes (audit28 findings 2 and 4): ``?scope=process`` is ready
whatever the endpoints (a Kubernetes readiness probe: engines restarting together must not take
every gateway pod out of its Service), plain ``/ready`` is ready when an endpoint is usable, and
both answer 503 while the gateway drains after SIGTERM (``gateway.drain_delay_s``), when
``/health`` stays 200."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from inferplane.api.app import serve
from inferplane.api.pipeline import Gateway
from inferplane.config.loader import parse_config
from tests.builders import pool_fleet, tenant, to_yaml
from tests.support.procs import free_port


def _fleet(up_port: int, **gateway: object) -> str:
    """One endpoint on a port where nothing listens: never usable."""
    return to_yaml(pool_fleet(up_port, gateway={"health_interval_s": 0.1, **gateway},
                              tenants=[tenant("a", "sk-ready")]))


async def _status(client: httpx.AsyncClient, path: str) -> int:
    return (await client.get(path)).status_code


async def test_process_scope_is_ready_with_no_usable_endpoint_and_not_while_draining() -> None:
    gw = Gateway(parse_config(_fleet(free_port())))
    port = free_port()
    runner = await serve(gw, "127.0.0.1", port)
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as c:
            for _ in range(100):  # the probe finds the endpoint down
                if await _status(c, "/ready") == 503:
                    break
                await asyncio.sleep(0.05)
            r = await c.get("/ready")
            assert r.status_code == 503 and r.json()["usable_endpoints"] == 0
            r = await c.get("/ready?scope=process")
            assert r.status_code == 200, r.text
            assert r.json() == {"ready": True, "draining": False, "usable_endpoints": 0,
                                "endpoints": 1}
            assert (await c.get("/ready?scope=nope")).json()["error"]["param"] == "scope"
            assert (await c.get("/health")).headers.get("connection") != "close"
            gw.draining = True
            assert await _status(c, "/ready?scope=process") == 503
            assert (await c.get("/ready")).json()["draining"] is True
            r = await c.get("/health")
            assert r.status_code == 200
            # keep-alive clients are asked to leave while the gateway drains
            assert r.headers.get("connection") == "close"
    finally:
        await runner.cleanup()


ROOT = Path(__file__).resolve().parent.parent


DRAIN_LINE = "gateway.drain_delay_s"  # in `cli._drain_delay`'s line, not in every stop's


def _start(tmp_path: Path, drain_delay_s: float) -> tuple[subprocess.Popen[str], str]:
    """`python -m inferplane serve` with ``gateway.drain_delay_s``, once /health answers."""
    cfg = tmp_path / "fleet.yaml"
    cfg.write_text(_fleet(free_port(), drain_delay_s=drain_delay_s))
    port = free_port()
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{ROOT}"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "inferplane", "serve", "--config", str(cfg), "--port",
         str(port)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            httpx.get(f"{base}/health", timeout=1)
            return proc, base
        except httpx.TransportError:
            if proc.poll() is not None or time.monotonic() > deadline:
                _end(proc)
                raise AssertionError("the gateway did not come up") from None
            time.sleep(0.1)


def _end(proc: subprocess.Popen[str]) -> str:
    """Kill ``proc`` if it still runs; its stderr."""
    if proc.poll() is None:
        proc.kill()
        proc.wait()
    err = proc.stderr.read() if proc.stderr else ""
    if proc.stderr:
        proc.stderr.close()
    return err


def test_sigterm_with_a_drain_delay_keeps_serving_until_a_sigint(tmp_path: Path) -> None:
    """``gateway.drain_delay_s``: after SIGTERM the listener answers (``/ready`` 503,
    ``/health`` 200) for the delay; a SIGINT then ends it and the stop follows."""
    proc, base = _start(tmp_path, drain_delay_s=600)
    try:
        assert httpx.get(f"{base}/ready?scope=process").status_code == 200
        proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 10
        while httpx.get(f"{base}/ready?scope=process").status_code != 503:
            assert time.monotonic() < deadline, "no 503 from /ready after SIGTERM"
            time.sleep(0.05)
        assert httpx.get(f"{base}/health").status_code == 200  # still serving
        proc.send_signal(signal.SIGINT)  # ends the delay
        assert proc.wait(timeout=60) == 0
    finally:
        err = _end(proc)
    assert DRAIN_LINE in err and "inferplane gateway stopped" in err, err


def test_the_drain_delay_ends_on_its_own_and_the_stop_follows(tmp_path: Path) -> None:
    proc, _ = _start(tmp_path, drain_delay_s=0.5)
    try:
        proc.send_signal(signal.SIGTERM)  # one SIGTERM, nothing else
        assert proc.wait(timeout=60) == 0
    finally:
        err = _end(proc)
    assert DRAIN_LINE in err and "inferplane gateway stopped" in err, err


def test_a_sigint_first_skips_the_drain_delay(tmp_path: Path) -> None:
    """Ctrl-C in a terminal stops at once: no delay (600 s here, so waiting would time out)."""
    proc, _ = _start(tmp_path, drain_delay_s=600)
    try:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0
    finally:
        err = _end(proc)
    assert DRAIN_LINE not in err and "inferplane gateway stopped" in err, err
