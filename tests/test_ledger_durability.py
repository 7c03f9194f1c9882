"""Issue 12 item 8: a gateway killed with -9 under load (concurrency 20) loses no record of an
answered request: every answer waits for its record's commit (group commit)."""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
from pathlib import Path

import httpx

from tests.builders import model, pool_fleet, to_yaml
from tests.support.procs import Proc, free_port

KEY = "sk-durable"


def fleet(gw_port: int, up_port: int, ledger: Path, durable: bool = True) -> str:
    return to_yaml(pool_fleet(
        up_port,
        gateway={"port": gw_port, "scrape_interval_s": 0.05, "ledger_path": str(ledger)},
        ledger={"durable": durable},
        admission={"store": "memory"},
        substrate={"cost": {"hourly_usd": 3.0}},
        endpoint_fields={"name": "up", "engine": "vllm"},
        models=[model(max_context=4096)],
        key=KEY,
    ))


async def load_then_kill(base: str, gw: Proc, *, concurrency: int, kill_after: int,
                         stream_every: int = 3) -> list[str]:
    """``concurrency`` clients post until the gateway dies; it is killed with SIGKILL as soon as
    ``kill_after`` answers have come back (others are in flight). Returns the decision ids of the
    requests that were answered in full."""
    answered: list[str] = []
    killed = asyncio.Event()
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}

    async def client(c: httpx.AsyncClient, k: int) -> None:
        i = 0
        while not killed.is_set():
            i += 1
            stream = (k + i) % stream_every == 0
            try:
                if stream:
                    async with c.stream("POST", "/v1/chat/completions",
                                        json={**body, "stream": True}) as r:
                        data = b"".join([x async for x in r.aiter_bytes()])
                        ok = r.status_code == 200 and data.endswith(b"data: [DONE]\n\n")
                else:
                    r = await c.post("/v1/chat/completions", json=body)
                    ok = r.status_code == 200
            except httpx.HTTPError:
                return
            if ok:
                answered.append(r.headers["x-inferplane-decision-id"])
                if len(answered) >= kill_after and not killed.is_set():
                    killed.set()
                    os.kill(gw.p.pid, signal.SIGKILL)

    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(base_url=base, headers={"Authorization": f"Bearer {KEY}"},
                                 timeout=10, limits=limits) as c:
        await asyncio.wait_for(
            asyncio.gather(*(client(c, k) for k in range(concurrency))), timeout=60)
    return answered


def recorded(ledger: Path) -> set[str]:
    conn = sqlite3.connect(ledger)
    try:
        return {r[0] for r in conn.execute("SELECT decision_id FROM decisions")}
    finally:
        conn.close()


def test_kill_9_under_concurrency_20_loses_no_answered_record(tmp_path: Path) -> None:
    up_port, gw_port = free_port(), free_port()
    up = Proc(["-m", "tests.support.fake_upstream", "--port", str(up_port), "--mode", "fast"],
              tmp_path / "up.log")
    ledger = tmp_path / "ledger.db"
    cfg = tmp_path / "fleet.yaml"
    cfg.write_text(fleet(gw_port, up_port, ledger))
    gw = Proc(["-m", "inferplane.cli", "serve", "--config", str(cfg)], tmp_path / "gw.log")
    try:
        up.wait_http(f"http://127.0.0.1:{up_port}/health")
        base = f"http://127.0.0.1:{gw_port}"
        gw.wait_http(f"{base}/ready")
        answered = asyncio.run(load_then_kill(base, gw, concurrency=20, kill_after=300))
        assert gw.p.wait(10) == -signal.SIGKILL
    finally:
        gw.stop()
        up.stop()
    assert len(answered) >= 300
    missing = set(answered) - recorded(ledger)
    assert not missing, f"{len(missing)} of {len(answered)} answered requests have no record"
