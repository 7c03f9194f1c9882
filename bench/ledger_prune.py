"""Pruning half of an N-record ledger (``inferplane ledger-prune``), PostgreSQL and SQLite.

Setup (not timed): N real records (the templates of bench/ledger_export.py: placed by the real
placement code, encoded by the ledger's own `encode_entry`), each copy given its own decision
id and its own time (``at_unix`` = t0 + i / 100: 100 records a second, so time follows the
chain), chained by `writer.link` with a checkpoint signed every 1,000 records, written with
COPY (PostgreSQL, then ``VACUUM (FREEZE, ANALYZE)``) or one transaction of inserts (SQLite).

Timed, in this process: ``verify`` of the whole ledger (what a prune does first), then
``prune(--before the time of record N/2)`` as the command runs it (its verify included),
with the time its per-shard work inside the transaction took (the checks, the anchor, the
deletes, the checkpoints) and the whole transaction from its ``BEGIN`` to the end of its
``COMMIT`` returning (on SQLite an upper bound on the write lock's hold: ``COMMIT`` returns
after any automatic WAL checkpoint, which runs once the lock is released; on PostgreSQL it
includes taking the advisory lock); their difference is the ``COMMIT`` (and the ``BEGIN``).
Then ``verify`` of what is left.

    .venv/bin/python bench/ledger_prune.py --records 200000 --stores postgres,sqlite
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import os
import platform
import sqlite3
import sys
import tempfile
import time
import uuid
from dataclasses import replace
from pathlib import Path
from typing import Any

import orjson
import psycopg

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))

from ledger_export import DSN, templates  # noqa: E402

from inferplane.ledger import prune as prune_mod  # noqa: E402
from inferplane.ledger.chain import Signer, generate_private_pem, load_private  # noqa: E402
from inferplane.ledger.postgres import PostgresLedger, Tables  # noqa: E402
from inferplane.ledger.record import Entry  # noqa: E402
from inferplane.ledger.sqlite import SqliteLedger  # noqa: E402
from inferplane.ledger.tools import Source, verify  # noqa: E402
from inferplane.ledger.writer import Linked, link  # noqa: E402

T0 = 1_764_633_600.0
RATE = 100.0  # records a second


def chained(n: int, signer: Signer) -> Any:
    """``(linked, checkpoints)`` chunks of 50,000 chained records with their own ids and times."""
    base = templates(500)
    head = (0, "0" * 64)
    for start in range(0, n, 50_000):
        entries: list[Entry] = []
        for i in range(start, min(n, start + 50_000)):
            e = base[i % len(base)]
            did, at = f"{i:016x}", T0 + i / RATE
            old_at = b'"at_unix":' + orjson.dumps(e.at_unix)
            text = e.text.replace(e.decision_id, did).replace(
                old_at.decode(), '"at_unix":' + orjson.dumps(at).decode())
            entries.append(replace(e, decision_id=did, at_unix=at, text=text,
                                   receipt=hashlib.sha256(text.encode()).hexdigest()))
        linked, cps, head = link(entries, "main", head, signer, 1000, False, time.time())
        yield linked, cps, head


def _row(x: Linked) -> tuple[Any, ...]:
    e = x.entry
    return (e.decision_id, e.at_unix, e.tenant, e.endpoint, e.workload_class, e.model,
            e.substrate, e.status, e.ttft_s, e.cost_usd, x.shard, x.seq, e.receipt,
            x.prev_hash, x.chain_hash, e.text)


COLS = ("decision_id, at_unix, tenant, endpoint, workload_class, model, substrate, status, "
        "ttft_s, cost_usd, shard, chain_seq, receipt, prev_hash, chain_hash, record")
CP_COLS = "shard, seq, chain_hash, at_unix, key_id, signature"


def fill_postgres(schema: str, n: int, signer: Signer) -> Source:
    async def create() -> None:
        led = PostgresLedger(DSN, schema=schema)
        await led.start()
        await led.close()

    asyncio.run(create())
    t = Tables(schema, "inferplane_")
    with psycopg.connect(DSN) as conn:
        head: tuple[int, str] = (0, "0" * 64)
        for linked, cps, last in chained(n, signer):
            head = last
            with conn.cursor() as cur:
                with cur.copy(f"COPY {t.decisions} ({COLS}) FROM STDIN") as copy:
                    for x in linked:
                        copy.write_row(_row(x))
                cur.executemany(f"INSERT INTO {t.checkpoints} ({CP_COLS}) VALUES "
                                "(%s, %s, %s, %s, %s, %s)",
                                [(c.shard, c.seq, c.chain_hash, c.at_unix, c.key_id,
                                  c.signature) for c in cps])
            conn.commit()
        conn.execute(f"INSERT INTO {t.heads} VALUES ('main', %s, %s)", head)
        conn.commit()
    with psycopg.connect(DSN, autocommit=True) as conn:
        conn.execute(f"VACUUM (FREEZE, ANALYZE) {t.decisions}")
    return Source(dsn=DSN, schema=schema, checkpoint_every=1000)


def fill_sqlite(path: Path, n: int, signer: Signer) -> Source:
    SqliteLedger(path).close_sync()  # the ledger's own schema
    conn = sqlite3.connect(path)
    head: tuple[int, str] = (0, "0" * 64)
    with conn:
        for linked, cps, last in chained(n, signer):
            head = last
            conn.executemany(f"INSERT INTO decisions ({COLS}) VALUES "
                             f"({', '.join('?' * 16)})", [_row(x) for x in linked])
            conn.executemany(f"INSERT INTO checkpoints ({CP_COLS}) VALUES (?, ?, ?, ?, ?, ?)",
                             [(c.shard, c.seq, c.chain_hash, c.at_unix, c.key_id,
                               c.signature) for c in cps])
        conn.execute("INSERT INTO heads VALUES ('main', ?, ?)", head)
    conn.close()
    return Source(sqlite_path=str(path), checkpoint_every=1000)


def measure(store: str, source: Source, n: int, signer: Signer) -> list[tuple[str, float, int]]:
    out: list[tuple[str, float, int]] = []
    t0 = time.perf_counter()
    rep = verify(source, signer.public)
    out.append((f"{store}: verify (before)", time.perf_counter() - t0, rep.records))
    assert rep.ok, rep.problem
    in_tx: list[float] = []
    real = prune_mod._Store.prune

    def timed(self: prune_mod._Store, p: prune_mod.ShardPlan, a: Any) -> None:
        s = time.perf_counter()
        real(self, p, a)
        in_tx.append(time.perf_counter() - s)

    whole_tx: list[float] = []
    real_so_far = prune_mod._so_far

    @contextlib.contextmanager
    def timed_tx(out_: Any) -> Any:  # entered before the transaction, left after its COMMIT
        s = time.perf_counter()
        with real_so_far(out_):
            yield
        whole_tx.append(time.perf_counter() - s)

    prune_mod._Store.prune = timed  # type: ignore[method-assign]
    prune_mod._so_far = timed_tx  # type: ignore[assignment]
    try:
        t0 = time.perf_counter()
        res = prune_mod.prune(source, signer, T0 + (n // 2) / RATE)
        total = time.perf_counter() - t0
    finally:
        prune_mod._Store.prune = real  # type: ignore[method-assign]
        prune_mod._so_far = real_so_far  # type: ignore[assignment]
    assert res.report.ok and len(res.plans) == 1, (res.report.problem, res.idle)
    gone = res.plans[0].count
    out.append((f"{store}: prune (verify + cut + delete)", total, gone))
    out.append((f"{store}:   of which the transaction", whole_tx[0], gone))
    out.append((f"{store}:     its work before COMMIT", in_tx[0], gone))
    out.append((f"{store}:     its BEGIN + COMMIT", whole_tx[0] - in_tx[0], gone))
    t0 = time.perf_counter()
    rep = verify(source, signer.public)
    out.append((f"{store}: verify (after)", time.perf_counter() - t0, rep.records))
    assert rep.ok and rep.first == {"main": gone + 1}, rep.problem
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--records", type=int, default=200_000)
    ap.add_argument("--stores", default="postgres,sqlite")
    a = ap.parse_args()
    signer = Signer(load_private(generate_private_pem(), "bench"))
    results: list[tuple[str, float, int]] = []
    for store in a.stores.split(","):
        if store == "postgres":
            schema = f"bench_{uuid.uuid4().hex[:10]}"
            try:
                t0 = time.perf_counter()
                source = fill_postgres(schema, a.records, signer)
                print(f"setup postgres: {a.records:,} records in "
                      f"{time.perf_counter() - t0:.1f} s", flush=True)
                results += measure(store, source, a.records, signer)
            finally:
                with psycopg.connect(DSN, autocommit=True) as conn:
                    conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        elif store == "sqlite":
            with tempfile.TemporaryDirectory(prefix="ledger-prune-") as tmp:
                path = Path(tmp) / "ledger.db"
                t0 = time.perf_counter()
                source = fill_sqlite(path, a.records, signer)
                size = path.stat().st_size
                print(f"setup sqlite: {a.records:,} records in {time.perf_counter() - t0:.1f} "
                      f"s ({size / 2**20:,.0f} MiB)", flush=True)
                results += measure(store, source, a.records, signer)
                print(f"sqlite file after the prune: {path.stat().st_size / 2**20:,.0f} MiB "
                      "(freed pages are reused, the file does not shrink)")
        else:
            raise SystemExit(f"unknown store {store!r}")
    print(f"\n{a.records:,} records, PostgreSQL {DSN.rsplit('@', 1)[-1]}, "
          f"{platform.machine()} {os.cpu_count()} CPUs, Python {platform.python_version()}")
    print(f"{'step':<42} {'seconds':>8} {'records':>9} {'records/s':>11}")
    for name, dt, k in results:
        print(f"{name:<42} {dt:>8.2f} {k:>9,} {k / dt:>11,.0f}")


if __name__ == "__main__":
    main()
