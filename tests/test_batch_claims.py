"""Batch lines claimed with leases (issue 14 item 5): two processes never run the same line, a
process killed with -9 loses its lines to the others after the lease, and every line's result is
written exactly once.

In process, against each store (SQLite file; PostgreSQL at 127.0.0.1:5432 when it answers): two
stores on the same rows stand for two processes — claims, takeover after the lease, results
refused to a process that lost its claim, the finish writing each line once. Real processes:
two `inferplane serve` replicas sharing PostgreSQL, and `serve --workers 2` sharing one SQLite
file, run one 60-line batch against emulated engines; the process holding claims is killed
with -9 mid-run; the batch completes with every line exactly once in its output file.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import subprocess
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import psycopg
import pytest

from inferplane.batch.postgres_store import PostgresBatchStore
from inferplane.batch.sqlite_store import SqliteBatchStore
from inferplane.batch.store import BatchStore, pid_scope
from tests.builders import endpoint, model, pool_fleet, to_yaml
from tests.support.postgres import ABSENT, DSN, drop_schema, needs_pg
from tests.support.procs import Proc, free_port

KEY = "sk-batch-claims"


@pytest.fixture
def schema() -> Iterator[str]:
    name = f"b_{uuid.uuid4().hex[:12]}"
    yield name
    if ABSENT is None:
        drop_schema(name)


# -- in process: two stores on the same rows ------------------------------------------------

class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def _pair(kind: str, tmp: Path, schema: str
                ) -> tuple[BatchStore, BatchStore, Callable[[float], Any]]:
    """Two stores (two 'processes') and a function that lets ``s`` seconds pass."""
    if kind == "sqlite":
        clock = Clock()
        a: BatchStore = SqliteBatchStore(tmp / "b.sqlite", clock=clock)
        b: BatchStore = SqliteBatchStore(tmp / "b.sqlite", clock=clock)

        async def wait(s: float) -> None:
            clock.now += s
    else:
        a = PostgresBatchStore(DSN, schema=schema)
        b = PostgresBatchStore(DSN, schema=schema)

        pg = a

        async def wait(s: float) -> None:
            # leases are the database server's clock: instead of sleeping, every lease moves
            # ``s`` seconds nearer its end (a stall of the test costs nothing: leases are long)
            assert isinstance(pg, PostgresBatchStore)
            async with await psycopg.AsyncConnection.connect(DSN, autocommit=True) as conn:
                await conn.execute(
                    f"UPDATE {pg.t.lines} SET lease_until = lease_until - %s * interval "
                    "'1 second' WHERE lease_until IS NOT NULL", (s,))
    await a.start()
    await b.start()
    return a, b, wait


@pytest.mark.parametrize("kind", ["sqlite", pytest.param("postgres", marks=needs_pg)])
def test_claims_leases_and_takeover(kind: str, tmp_path: Path, schema: str) -> None:
    async def main() -> None:
        a, b, wait = await _pair(kind, tmp_path, schema)
        try:
            await a.add_batch({
                "id": "batch_1", "endpoint": "/v1/chat/completions", "input_file_id": "f",
                "completion_window": "24h", "status": "validating", "metadata": None,
                "created_at": 1, "expires_at": 10**10,
            }, "k", "t")
            await b.start_batch("batch_1", [(n, f"c{n}", "/v1/chat/completions", b"{}")
                                            for n in range(6)], 2)
            lease = 600.0  # long: time passes only through ``wait``
            got_a = await a.claim_lines("batch_1", 3, lease)
            got_b = await b.claim_lines("batch_1", 10, lease)
            assert [ln.line_no for ln in got_a] == [0, 1, 2]
            assert [ln.line_no for ln in got_b] == [3, 4, 5]  # never a line A holds
            assert await b.claim_lines("batch_1", 10, lease) == []
            assert await a.finish_line("batch_1", 0, True, b"r0-a")
            assert not await b.finish_line("batch_1", 1, True, b"r1-b")  # not B's claim
            assert await a.live_claims("batch_1") == 5
            await b.release(got_b[1:])  # 4 and 5 were not run: back for anyone
            assert [ln.line_no for ln in await a.claim_lines("batch_1", 10, lease)] == [4, 5]
            # B keeps line 3 alive; A stops renewing (it died): its lines expire
            await wait(lease / 2)
            assert await b.renew(lease * 4) == 1
            await wait(lease / 2 + 1)
            taken = await b.claim_lines("batch_1", 10, lease)
            assert [ln.line_no for ln in taken] == [1, 2, 4, 5]  # A's, after its lease
            assert await a.renew(lease) == 0  # A holds nothing any more
            assert not await a.finish_line("batch_1", 1, True, b"r1-a")  # too late: dropped
            for n in (1, 2, 3, 4, 5):
                assert await b.finish_line("batch_1", n, n != 4, f"r{n}-b".encode())
            assert not await b.finish_line("batch_1", 3, True, b"again")  # once
            assert await b.open_lines("batch_1") == 0 and await b.live_claims("batch_1") == 0
            await a.set_status("batch_1", "finalizing", 3, only_from=("in_progress",))
            await a.finalize("batch_1", "completed", 4, ("file-out", "file-err"))
            await b.finalize("batch_1", "completed", 5, ("file-out2", "file-err2"))  # no-op
            batch = await b.get_batch("batch_1")
            assert batch is not None and batch["status"] == "completed"
            assert batch["output_file_id"] == "file-out"
            assert batch["request_counts"] == {"total": 6, "completed": 5, "failed": 1}
            out = await b.file_content("file-out", "t")
            assert out == b"r0-a\nr1-b\nr2-b\nr3-b\nr5-b\n"
            assert await b.file_content("file-err", "t") == b"r4-b\n"
            assert not await a.finish_line("batch_1", 0, True, b"late")  # the batch ended
        finally:
            await a.close()
            await b.close()

    asyncio.run(main())


@pytest.mark.parametrize("kind", ["sqlite", pytest.param("postgres", marks=needs_pg)])
def test_a_restart_takes_back_the_lines_of_its_dead_predecessor(
    kind: str, tmp_path: Path, schema: str
) -> None:
    import socket

    async def main() -> None:
        a, b, _ = await _pair(kind, tmp_path, schema)
        fresh: BatchStore = (
            SqliteBatchStore(tmp_path / "b.sqlite", clock=a.clock)
            if isinstance(a, SqliteBatchStore) else PostgresBatchStore(DSN, schema=schema))
        try:
            await a.add_batch({
                "id": "batch_2", "endpoint": "/v1/chat/completions", "input_file_id": "f",
                "completion_window": "24h", "status": "validating", "metadata": None,
                "created_at": 1, "expires_at": 10**10,
            }, "k", "t")
            await a.start_batch("batch_2", [(n, f"c{n}", "/v1/chat/completions", b"{}")
                                            for n in range(6)], 2)
            dead = subprocess.Popen(["true"])
            dead.wait()
            host, scope = socket.gethostname(), pid_scope()
            assert scope  # Linux: /proc has the boot id and the PID namespace
            # live claims that must stay: another host; another replica under the same hostname
            # but in another PID namespace (its pid, dead here or equal to ours, means nothing
            # here); an owner id without a scope
            others = [f"elsewhere:{scope}:{os.getpid()}:1111",
                      f"{host}:0123456789ab:{dead.pid}:2222",
                      f"{host}:0123456789ab:{os.getpid()}:3333",
                      f"{host}:{dead.pid}:4444"]
            # ours from a previous life: this namespace, a pid that is gone / our own pid
            ours = [f"{host}:{scope}:{dead.pid}:0000", f"{host}:{scope}:{os.getpid()}:5555"]
            for owner in [*ours, *others]:
                b.owner = owner
                assert len(await b.claim_lines("batch_2", 1, 3600)) == 1
            await fresh.start()
            assert sorted(await fresh.release_dead()) == sorted(ours)
            assert [ln.line_no for ln in await fresh.claim_lines("batch_2", 9, 60)] == [0, 1]
            assert await fresh.live_claims("batch_2") == 2 + len(others)
        finally:
            for s in (a, b, fresh):
                await s.close()

    asyncio.run(main())


# -- real processes ---------------------------------------------------------------------------

LINES = 60


def _fleet(engines: dict[str, int], batch: dict[str, Any], **sections: Any) -> str:
    return to_yaml(pool_fleet(
        gateway={"scrape_interval_s": 0.05, "token_estimate": "words", "seed": 1},
        batch={"poll_interval_s": 0.02, "max_concurrency": 3, "lease_s": 2.0, **batch},
        **sections,
        substrate={"cost": {"hourly_usd": 3.0}},
        endpoints=[endpoint(n, p, models=[model("llama-3.1-8b", None)], max_concurrency=16)
                   for n, p in engines.items()],
        key=KEY,
    ))


def _input() -> bytes:
    return b"".join(orjson.dumps({
        "custom_id": f"line-{i}", "method": "POST", "url": "/v1/chat/completions",
        "body": {"model": "llama-3.1-8b", "max_tokens": 48,
                 "messages": [{"role": "user", "content": f"batch line {i} " * 6}]},
    }) + b"\n" for i in range(LINES))


def _submit(base: str) -> str:
    h = {"Authorization": f"Bearer {KEY}"}
    r = httpx.post(f"{base}/v1/files", headers=h, data={"purpose": "batch"},
                   files={"file": ("in.jsonl", _input())}, timeout=30)
    assert r.status_code == 200, r.text
    r = httpx.post(f"{base}/v1/batches", headers=h, timeout=30, json={
        "input_file_id": r.json()["id"], "endpoint": "/v1/chat/completions",
        "completion_window": "24h"})
    assert r.status_code == 200, r.text
    return str(r.json()["id"])


def _run(tmp: Path, gateways: Callable[[dict[str, int]], list[tuple[Proc, str]]],
         claims: Callable[[], list[tuple[int, str | None, int]]],
         victim_of: Callable[[dict[int, int]], int | None], settle_s: float = 0.0) -> None:
    """Emulated engines, the gateways, one batch; kill -9 the victim mid-run; check the end.
    ``claims()`` reads (line_no, owner, done) of every line from the store. The batch is
    submitted ``settle_s`` after the gateways started at the earliest."""
    engines = {f"e{i}": free_port() for i in range(2)}
    (tmp / "engines.yaml").write_text(_fleet(engines, {"path": "unused.sqlite"}))
    procs: list[Proc] = []
    try:
        emu = Proc(["-m", "inferplane.cli", "emulate", "--config", str(tmp / "engines.yaml")],
                   tmp / "emulate.log")
        procs.append(emu)
        for p in engines.values():
            emu.wait_http(f"http://127.0.0.1:{p}/health")
        started = time.monotonic()
        gws = gateways(engines)
        procs += [p for p, _ in gws]
        for p, base in gws:
            p.wait_http(f"{base}/ready")
        time.sleep(max(0.0, started + settle_s - time.monotonic()))
        bid = _submit(gws[0][1])
        deadline = time.monotonic() + 60
        victim = None
        held: set[int] = set()
        while victim is None:  # a process holding claims, some lines done
            assert time.monotonic() < deadline, claims()
            rows = claims()
            done = sum(1 for _, _, d in rows if d)
            live: dict[int, int] = Counter()
            for _, owner, d in rows:
                if owner and not d:
                    live[int(owner.split(":")[2])] += 1
            if done >= 6:
                victim = victim_of(live)
                if victim is not None:
                    os.kill(victim, signal.SIGKILL)
                    held = {n for n, owner, d in rows
                            if owner and not d and int(owner.split(":")[2]) == victim}
            time.sleep(0.02)
        assert 6 <= sum(1 for _, _, d in claims() if d) < LINES, "killed too late to matter"
        base = gws[-1][1]  # a survivor
        h = {"Authorization": f"Bearer {KEY}"}
        deadline = time.monotonic() + 90
        while True:
            b = httpx.get(f"{base}/v1/batches/{bid}", headers=h, timeout=10).json()
            if b["status"] not in ("validating", "in_progress", "finalizing"):
                break
            assert time.monotonic() < deadline, b
            time.sleep(0.1)
        assert b["status"] == "completed", b
        assert b["request_counts"] == {"total": LINES, "completed": LINES, "failed": 0}, b
        assert b["error_file_id"] is None, b
        out = httpx.get(f"{base}/v1/files/{b['output_file_id']}/content", headers=h,
                        timeout=10).content
        seen = Counter(orjson.loads(ln)["custom_id"] for ln in out.splitlines() if ln)
        assert seen == Counter({f"line-{i}": 1 for i in range(LINES)})  # each exactly once
        # the lines the victim held when it died were finished by another process
        rows = {n: (owner, d) for n, owner, d in claims()}
        assert held and all(rows[n][1] for n in held), (held, rows)
        assert all(int(str(rows[n][0]).split(":")[2]) != victim for n in held)
    finally:
        for p in procs:
            p.stop()
    for log in tmp.glob("gw*.log"):
        assert "Traceback" not in log.read_text(errors="replace"), log.read_text()


@needs_pg
def test_two_replicas_sharing_postgres_survive_a_kill_9(tmp_path: Path, schema: str) -> None:
    pids: list[int] = []

    def gateways(engines: dict[str, int]) -> list[tuple[Proc, str]]:
        cfg = tmp_path / "fleet.yaml"
        cfg.write_text(_fleet(engines, {"postgres_dsn": DSN, "postgres_schema": schema}))
        out = []
        for name in ("A", "B"):
            port = free_port()
            p = Proc(["-m", "inferplane.cli", "serve", "--config", str(cfg), "--port", str(port)],
                     tmp_path / f"gw-{name}.log")
            pids.append(p.p.pid)
            out.append((p, f"http://127.0.0.1:{port}"))
        return out

    def claims() -> list[tuple[int, str | None, int]]:
        with psycopg.connect(DSN, autocommit=True) as conn:
            return [(n, o, int(d)) for n, o, d in conn.execute(
                f'SELECT line_no, owner, done FROM "{schema}"."inferplane_batch_lines"')]

    def victim_of(live: dict[int, int]) -> int | None:
        a, b = pids
        return a if live.get(a) and live.get(b) else None  # A dies while both run lines

    _run(tmp_path, gateways, claims, victim_of)


def test_two_workers_sharing_sqlite_survive_a_kill_9(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("INFERPLANE_WORKER_STARTUP_S", "0")
    from tests.support.redis_server import RedisServer

    srv = RedisServer(tmp_path)  # --workers needs the shared admission store
    db = tmp_path / "batches.sqlite"
    sup: list[Proc] = []

    def gateways(engines: dict[str, int]) -> list[tuple[Proc, str]]:
        cfg = tmp_path / "fleet.yaml"
        cfg.write_text(_fleet(engines, {"path": str(db)}, admission={
            "store": "redis", "redis_url": srv.url, "redis_prefix": "bc:"}))
        port = free_port()
        p = Proc(["-m", "inferplane.cli", "serve", "--config", str(cfg), "--port", str(port),
                  "--workers", "2"], tmp_path / "gw.log")
        sup.append(p)
        return [(p, f"http://127.0.0.1:{port}")]

    def claims() -> list[tuple[int, str | None, int]]:
        if not db.exists():
            return []
        with sqlite3.connect(db, timeout=30) as conn:
            try:
                return [(n, o, int(d)) for n, o, d in conn.execute(
                    "SELECT line_no, owner, done FROM batch_lines")]
            except sqlite3.OperationalError:
                return []

    def victim_of(live: dict[int, int]) -> int | None:
        kids = subprocess.run(["pgrep", "-P", str(sup[0].p.pid)], capture_output=True,
                              text=True).stdout.split()
        workers = {int(k) for k in kids}
        both = [pid for pid in workers if live.get(pid)]
        return both[0] if len(both) == 2 else None  # a worker dies while both run lines

    try:
        # a worker that dies in its start-up window is a failed start (the supervisor then
        # stops them all): with the window at 0 the dead worker is restarted, as in production
        # past it, without waiting for the window (measured from the fork, not from here)
        _run(tmp_path, gateways, claims, victim_of)
    finally:
        srv.stop()


def test_an_unreachable_database_is_a_startup_error_naming_the_field() -> None:
    from inferplane.errors import ConfigError

    store = PostgresBatchStore(f"postgresql://postgres@127.0.0.1:{free_port()}/test")
    with pytest.raises(ConfigError) as err:
        asyncio.run(store.start())
    assert err.value.problems[0][0] == "batch.postgres_dsn"


@needs_pg
def test_a_database_gone_later_is_a_503_not_a_500(schema: str) -> None:
    from inferplane.errors import StoreUnavailableError

    async def main() -> None:
        store = PostgresBatchStore(DSN, schema=schema)
        await store.start()
        try:
            assert await store.get_file("nope", "t") is None
            assert store._conn is not None
            await store._conn.close()  # the database goes away ...
            store.dsn = f"postgresql://postgres@127.0.0.1:{free_port()}/test"
            with pytest.raises(StoreUnavailableError):
                await store.get_file("nope", "t")
            store.dsn = DSN  # ... and comes back
            assert await store.get_file("nope", "t") is None
        finally:
            await store.close()

    asyncio.run(main())
