"""The batch lane end to end, in-process (`serve`) on loopback: upload validation, a batch that
completes (output and error files), tenant isolation, cancel, restart survival on the same
SQLite file (every line exactly once) and spare-capacity gating."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web

from tests.support.batch_lane import Env, Upstream, jsonl, line, start
from tests.support.procs import free_port


@pytest.fixture
async def env() -> AsyncIterator[Env]:
    up = Upstream()
    up_runner = web.AppRunner(up.app())
    await up_runner.setup()
    up.port = free_port()
    await web.TCPSite(up_runner, "127.0.0.1", up.port).start()
    gw, runner, base = await start(up)
    async with aiohttp.ClientSession() as http:
        e = Env(up, base, gw, runner, http)
        try:
            yield e
        finally:
            await e.runner.cleanup()
            await up_runner.cleanup()


@pytest.mark.parametrize(("bad", "where"), [
    (b"{not json", "line 2: malformed JSON"),
    (b"[1, 2]", "line 2: must be a JSON object"),
    (line("r1"), "line 2: duplicate custom_id 'r1'"),
    (line("r2", method="GET"), "line 2: 'method' must be \"POST\""),
    (line("r2", url="/v1/images"), "line 2: 'url' must be one of"),
    (line("r2", body=[1]), "line 2: 'body' must be a JSON object"),
    (line("r2", body={"model": "m"}), "line 2: body: 'messages' is required"),
    (line("r2", body={"model": "m", "stream": True,
                      "messages": [{"role": "user", "content": "hi"}]}),
     "line 2: body: 'stream' is not supported"),
])
async def test_upload_rejects_a_bad_line_naming_its_number(env: Env, bad: bytes, where: str
                                                           ) -> None:
    st, err = await env.upload(jsonl(line("r1"), bad, line("r3")))
    assert st == 400 and where in err["error"]["message"], err
    assert err["error"]["param"] == "file"


async def test_upload_purpose_and_size_limit(env: Env) -> None:
    st, err = await env.upload(jsonl(line("r1")), purpose="fine-tune")
    assert st == 400 and err["error"]["param"] == "purpose"
    st, err = await env.upload(jsonl(*(line(f"r{i}") for i in range(300))))
    assert st == 413 and "batch.max_file_bytes" in err["error"]["message"]
    st, f = await env.upload(jsonl(line("r1")))
    assert st == 200 and f["object"] == "file" and f["purpose"] == "batch"
    st, got = await env.call("GET", f"/v1/files/{f['id']}")
    assert st == 200 and got == f
    st, content = await env.call("GET", f"/v1/files/{f['id']}/content")
    assert st == 200 and content == jsonl(line("r1"))


async def test_a_batch_completes_with_output_and_error_files(env: Env) -> None:
    b = await env.create(jsonl(line("r1"), line("r2"), line("r3", model="nope"), line("r4")))
    assert b["status"] == "validating" and b["metadata"] == {"job": "t"}
    done = await env.wait(b["id"], "completed")
    assert done["request_counts"] == {"total": 4, "completed": 3, "failed": 1}
    for k in ("in_progress_at", "finalizing_at", "completed_at", "output_file_id",
              "error_file_id"):
        assert done[k], k
    _, out = await env.call("GET", f"/v1/files/{done['output_file_id']}/content")
    rows = [orjson.loads(x) for x in out.splitlines()]
    assert [r["custom_id"] for r in rows] == ["r1", "r2", "r4"]
    r = rows[0]
    assert r["error"] is None and r["id"].startswith("batch_req_")
    assert r["response"]["status_code"] == 200 and r["response"]["request_id"]
    assert r["response"]["body"]["choices"][0]["message"]["content"] == "re: r1"
    # the line went through the pipeline: its decision is in the ledger, for its tenant
    st, rec = await env.call("GET", f"/v1/decisions/{r['response']['request_id']}")
    assert st == 200 and rec["tenant"] == "a"
    _, err = await env.call("GET", f"/v1/files/{done['error_file_id']}/content")
    (e,) = [orjson.loads(x) for x in err.splitlines()]
    assert e["custom_id"] == "r3" and e["response"] is None
    assert e["error"]["code"] == "model_not_found"
    assert sorted(env.up.seen) == ["r1", "r2", "r4"]


async def test_batch_endpoint_must_match_every_line(env: Env) -> None:
    st, f = await env.upload(jsonl(line("r1"), line("r2")))
    st, b = await env.call("POST", "/v1/batches", json={
        "input_file_id": f["id"], "endpoint": "/v1/embeddings", "completion_window": "24h"})
    assert st == 200
    failed = await env.wait(b["id"], "failed")
    assert failed["errors"]["data"][0]["code"] == "mismatched_endpoint"
    st, err = await env.call("POST", "/v1/batches", json={
        "input_file_id": f["id"], "endpoint": "/v1/chat/completions",
        "completion_window": "1h"})
    assert st == 400 and err["error"]["param"] == "completion_window"


async def test_other_tenants_get_404(env: Env) -> None:
    b = await env.create(jsonl(line("r1")))
    await env.wait(b["id"], "completed")
    for method, path in [("GET", f"/v1/files/{b['input_file_id']}"),
                         ("GET", f"/v1/files/{b['input_file_id']}/content"),
                         ("GET", f"/v1/batches/{b['id']}"),
                         ("POST", f"/v1/batches/{b['id']}/cancel")]:
        st, err = await env.call(method, path, tenant="b")
        assert st == 404 and err["error"]["type"] == "not_found_error", (path, err)
    st, err = await env.call("POST", "/v1/batches", tenant="b", json={
        "input_file_id": b["input_file_id"], "endpoint": "/v1/chat/completions",
        "completion_window": "24h"})
    assert st == 404
    _, mine = await env.call("GET", "/v1/batches")
    _, theirs = await env.call("GET", "/v1/batches", tenant="b")
    assert [x["id"] for x in mine["data"]] == [b["id"]] and theirs["data"] == []


async def test_cancel_stops_feeding_and_keeps_what_ran(env: Env) -> None:
    env.up.delay = 0.2
    b = await env.create(jsonl(*(line(f"r{i}") for i in range(10))))
    await env.wait(b["id"], "in_progress")
    st, c = await env.call("POST", f"/v1/batches/{b['id']}/cancel")
    assert st == 200 and c["status"] in ("cancelling", "cancelled") and c["cancelling_at"]
    done = await env.wait(b["id"], "cancelled")
    counts = done["request_counts"]
    assert counts["total"] == 10 and counts["completed"] < 10 and counts["failed"] == 0
    assert sum(env.up.seen.values()) < 10
    st, again = await env.call("POST", f"/v1/batches/{b['id']}/cancel")
    assert st == 200 and again["status"] == "cancelled"  # a no-op, as in OpenAI


async def test_a_batch_survives_a_restart_with_every_line_once(env: Env, tmp_path: Path
                                                               ) -> None:
    await env.runner.cleanup()
    extra = {"ledger_path": str(tmp_path / "ledger.sqlite")}
    env.gw, env.runner, env.base = await start(env.up, extra)
    env.up.delay = 0.05
    n = 12
    b = await env.create(jsonl(*(line(f"r{i}") for i in range(n))))
    deadline = time.monotonic() + 20
    while (cut := await env.wait(b["id"], "in_progress"))["request_counts"]["completed"] < 2:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.01)
    await env.runner.cleanup()  # mid-batch: lines in flight are cancelled, not done
    assert cut["request_counts"]["completed"] < n
    assert (tmp_path / "ledger.sqlite.batches.sqlite").exists()
    env.gw, env.runner, env.base = await start(env.up, extra)
    done = await env.wait(b["id"], "completed")
    assert done["request_counts"] == {"total": n, "completed": n, "failed": 0}
    _, out = await env.call("GET", f"/v1/files/{done['output_file_id']}/content")
    ids = [orjson.loads(x)["custom_id"] for x in out.splitlines()]
    assert sorted(ids) == sorted(f"r{i}" for i in range(n))  # each line exactly once
    assert set(env.up.seen) == {f"r{i}" for i in range(n)}


async def test_lines_wait_for_spare_capacity(env: Env) -> None:
    busy = [env.gw.live.reserve("up", 10) for _ in range(7)]  # 7 / 10 ≥ 0.6
    b = await env.create(jsonl(line("r1"), line("r2")))
    await env.wait(b["id"], "in_progress")
    gated = env.svc.worker.gated
    await asyncio.sleep(0.2)
    assert env.svc.worker.gated > gated and not env.up.seen  # waiting, nothing sent
    for r in busy[:3]:  # 4 / 10 in flight: one line may go (5 / 10 < 0.6), then the next
        r.release()
    done = await env.wait(b["id"], "completed")
    assert done["request_counts"]["completed"] == 2
    for r in busy[3:]:
        r.release()


async def test_queued_interactive_requests_hold_batch_lines_back(env: Env) -> None:
    adm = env.gw.admission
    profile = env.gw.classify("chat", {"model": "m", "messages": [{"role": "user",
                                                                   "content": "x"}]},
                              {}, env.gw.config.tenants[0])
    pool = adm.pool_of(profile)
    busy = [env.gw.live.reserve("up", 1) for _ in range(10)]
    waiter = asyncio.create_task(adm.queue.acquire("b", "standard", pool, 1, 5.0))
    await asyncio.sleep(0.01)
    for r in busy:
        r.release()  # the pool is idle, but an interactive request still waits
    assert adm.utilisation(pool) == 0.0
    assert not env.svc.worker.spare(pool)
    waiter.cancel()
    await asyncio.gather(waiter, return_exceptions=True)
    assert env.svc.worker.spare(pool)


class _IdleStore:
    """A batch store holding ``active`` batches (the worker only lists them here)."""

    def __init__(self, active: list[dict[str, Any]]) -> None:
        self.active = active

    async def release_dead(self) -> list[str]:
        return []

    async def active_batches(self) -> list[dict[str, Any]]:
        return self.active


@pytest.mark.parametrize(
    ("active", "wait"),
    [([], 2.5), ([{"id": "b1", "status": "queued"}], 0.05)],  # idle: the long period
)
async def test_the_worker_polls_slowly_while_no_batch_is_active(
    monkeypatch: pytest.MonkeyPatch, active: list[dict[str, Any]], wait: float
) -> None:
    from inferplane.batch.worker import BatchWorker
    from inferplane.config.schema import BatchSpec

    waits: list[float | None] = []

    async def fake_wait_woken(event: asyncio.Event, timeout: float) -> bool:
        waits.append(timeout)
        if len(waits) == 3:
            raise asyncio.CancelledError
        return False  # timed out

    monkeypatch.setattr("inferplane.batch.worker.wait_woken", fake_wait_woken)
    spec = BatchSpec(poll_interval_s=0.05, idle_poll_interval_s=2.5)
    worker = BatchWorker(None, None, _IdleStore(active), spec)  # type: ignore[arg-type]
    with pytest.raises(asyncio.CancelledError):
        await worker._run()
    assert waits == [wait] * 3
