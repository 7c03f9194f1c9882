"""Export of N decision records from the PostgreSQL ledger (issue 11: 1 M records in ≤ 60 s).

Setup (not timed): a fresh schema in the local PostgreSQL is filled with N real records — placed
by the real placement code on a 3-endpoint fleet, encoded by the ledger's own `encode_entry`
(canonical form), chained by `writer.link` and signed every 1,000 records, then written with
COPY. A few hundred distinct decisions are encoded and re-used with fresh decision ids, so the
rows have the size and shape of real ones and every receipt and chain hash is right (the bench
verifies the chain too, when asked), then the table is vacuumed (``--no-vacuum`` skips
it: the first read of freshly bulk-loaded rows also writes every page).

Timed: ``inferplane export --config F --format FMT -o FILE`` as a subprocess, per format; and
optionally ``inferplane verify``.

    .venv/bin/python bench/ledger_export.py --records 1000000 --formats ndjson,csv,parquet

The schema is dropped at the end (``--keep`` keeps it).
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import replace
from pathlib import Path

import psycopg

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from inferplane.config.loader import parse_config  # noqa: E402
from inferplane.fleet.live import LiveFleet  # noqa: E402
from inferplane.fleet.model import Fleet  # noqa: E402
from inferplane.ledger.chain import Signer, generate_private_pem, load_private  # noqa: E402
from inferplane.ledger.postgres import PostgresLedger, Tables  # noqa: E402
from inferplane.ledger.record import Entry, Outcome, encode_entry  # noqa: E402
from inferplane.ledger.writer import link  # noqa: E402
from inferplane.placement.build import build_policies  # noqa: E402
from inferplane.placement.framework import place  # noqa: E402
from inferplane.placement.profile import RequestProfile  # noqa: E402

DSN = os.environ.get("INFERPLANE_BENCH_PG", "postgresql://postgres@127.0.0.1:5432/test")

FLEET = """
regions: [{name: eu-west}, {name: us-east}]
substrates:
  - name: eu-h100
    kind: gpu
    hardware: h100
    region: eu-west
    jurisdiction: eu
    cost: {hourly_usd: 3.5}
    endpoints:
      - {name: eu-h100-0, url: "http://127.0.0.1:9001", models: [{name: llama-3.1-8b, max_context: 32768, variant: instruct, precision: fp8}]}
      - {name: eu-h100-1, url: "http://127.0.0.1:9002", models: [{name: llama-3.1-8b, max_context: 32768}]}
  - name: us-l4
    kind: gpu
    hardware: l4
    region: us-east
    jurisdiction: us
    cost: {hourly_usd: 1.2}
    endpoints:
      - {name: us-l4-0, url: "http://127.0.0.1:9003", models: [{name: llama-3.1-8b, max_context: 16384}]}
tenants:
  - name: acme
    api_keys: ["sha256:5c0900028d88a97d85eeeea8f2b20fe468d3403bbfa203dca2bef8f87f07cbf4"]
  - name: globex
    api_keys: ["sha256:6c0900028d88a97d85eeeea8f2b20fe468d3403bbfa203dca2bef8f87f07cbf4"]
"""  # noqa: E501


def templates(n: int) -> list[Entry]:
    config = parse_config(FLEET, "bench.yaml")
    live = LiveFleet(Fleet.from_config(config), stale_after_s=2.0)
    policy = build_policies(config, "bench.yaml")["default"]
    out: list[Entry] = []
    for i in range(n):
        rid = f"{i:016x}"
        profile = RequestProfile(
            request_id=rid, tenant=("acme", "globex")[i % 2], model="llama-3.1-8b",
            prompt_tokens=200 + 37 * i % 4000, max_output_tokens=256, ttft_slo_s=0.5,
            client_region=("eu-west", "us-east")[i % 2],
        )
        d = place(profile, live.snapshot(), policy, decision_id=rid, timer=time.perf_counter)
        out.append(encode_entry(d, Outcome(
            status=200, endpoint=d.endpoint, ttft_s=0.05 + i % 7 / 100, itl_s=0.012,
            e2e_s=1.5, prompt_tokens=profile.prompt_tokens, completion_tokens=120 + i % 50,
            cached_tokens=0, cost_usd=0.0001 * (1 + i % 9), usage_source="upstream",
        ), 1_764_633_600.0 + i))
    return out


def fill(t: Tables, n: int, signer: Signer) -> float:
    """Write ``n`` chained records with COPY; return seconds."""
    import hashlib

    base = templates(500)
    t0 = time.perf_counter()
    cols = ("decision_id, at_unix, tenant, endpoint, workload_class, model, substrate, status, "
            "ttft_s, cost_usd, shard, chain_seq, receipt, prev_hash, chain_hash, record")
    head = (0, "0" * 64)
    with psycopg.connect(DSN) as conn:
        for start in range(0, n, 50_000):
            entries: list[Entry] = []
            for i in range(start, min(n, start + 50_000)):
                e = base[i % len(base)]
                did = f"{i:016x}"
                text = e.text.replace(e.decision_id, did)
                # the indexed columns must be the record's own (verify compares them): the
                # copies keep their template's time
                entries.append(replace(
                    e, decision_id=did, text=text,
                    receipt=hashlib.sha256(text.encode()).hexdigest()))
            linked, cps, head = link(entries, "main", head, signer, 1000, False, time.time())
            with conn.cursor() as cur:
                with cur.copy(f"COPY {t.decisions} ({cols}) FROM STDIN") as copy:
                    for x in linked:
                        e = x.entry
                        copy.write_row((e.decision_id, e.at_unix, e.tenant, e.endpoint,
                                        e.workload_class, e.model, e.substrate, e.status,
                                        e.ttft_s, e.cost_usd, x.shard, x.seq, e.receipt,
                                        x.prev_hash, x.chain_hash, e.text))
                cur.executemany(
                    f"INSERT INTO {t.checkpoints} (shard, seq, chain_hash, at_unix, key_id, "
                    "signature) VALUES (%s, %s, %s, %s, %s, %s)",
                    [(c.shard, c.seq, c.chain_hash, c.at_unix, c.key_id, c.signature)
                     for c in cps])
            conn.commit()
        conn.execute(f"UPDATE {t.heads} SET seq = %s, chain_hash = %s WHERE shard = 'main'",
                     head)
        conn.execute(f"ANALYZE {t.decisions}")
        conn.commit()
    return time.perf_counter() - t0


def _proc_cpu(pid: int) -> float:
    """utime + stime of a process on this machine, in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_split(t: Tables, fmt: str, out: Path) -> tuple[str, float, int]:
    """Export in this process; print wall, client CPU and PostgreSQL-backend CPU seconds."""
    from inferplane.ledger import postgres as pg

    with pg.connect_sync(DSN) as conn, out.open("wb") as fh:
        backend = conn.info.backend_pid
        c0, b0, w0 = time.process_time(), _proc_cpu(backend), time.perf_counter()
        pg.COPY_WRITERS[fmt](conn, t, None, fh)
        client, server = time.process_time() - c0, _proc_cpu(backend) - b0
        wall = time.perf_counter() - w0
    size = out.stat().st_size
    out.unlink()
    print(f"in-process {fmt}: wall {wall:.1f} s, client CPU {client:.1f} s, PostgreSQL backend "
          f"CPU {server:.1f} s", flush=True)
    return (f"in-process {fmt}", wall, size)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--records", type=int, default=1_000_000)
    ap.add_argument("--formats", default="ndjson,csv,parquet")
    ap.add_argument("--verify", action="store_true", help="also time inferplane verify")
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--no-vacuum", action="store_true",
                    help="skip the VACUUM after the setup: time the first read of freshly loaded "
                         "rows, which also writes every page (hint bits)")
    ap.add_argument("--schema", help="re-use the records a --keep run left in this schema")
    ap.add_argument("--cpu", action="store_true", help="also export in-process and report the "
                    "CPU seconds of the client and of its PostgreSQL backend (load-independent)")
    a = ap.parse_args()
    schema = a.schema or f"bench_{uuid.uuid4().hex[:10]}"
    t = Tables(schema, "inferplane_")
    key_pem = generate_private_pem()
    signer = Signer(load_private(key_pem, "bench"))
    tmp = Path(tempfile.mkdtemp(prefix="ledger-export-"))
    key = tmp / "ledger.key"
    key.write_bytes(key_pem)
    cfg = tmp / "fleet.yaml"
    cfg.write_text(FLEET + f"ledger: {{postgres_dsn: '{DSN}', postgres_schema: {schema}, "
                   f"signing_key_file: {key}}}\n")
    import asyncio

    async def create() -> None:  # the ledger's own migrations make the tables
        led = PostgresLedger(DSN, schema=schema)
        await led.start()
        await led.close()

    results: list[tuple[str, float, int]] = []
    try:
        if a.schema:
            with psycopg.connect(DSN) as conn:
                got = conn.execute(f"SELECT count(*) FROM {t.decisions}").fetchone()
            a.records = int(got[0]) if got else 0
            a.verify = False  # the key that signed them is gone
        else:
            asyncio.run(create())
            with psycopg.connect(DSN, autocommit=True) as conn:
                conn.execute(f"INSERT INTO {t.heads} VALUES ('main', 0, %s)", ("0" * 64,))
            fill_s = fill(t, a.records, signer)
            with psycopg.connect(DSN) as conn:
                size = conn.execute(
                    f"SELECT pg_total_relation_size('{t.decisions}')").fetchone()
            print(f"setup: {a.records:,} records written in {fill_s:.1f} s "
                  f"(table + indexes {size[0] / 2**20:,.0f} MiB)" if size else "")
            if not a.no_vacuum:
                # A ledger that grows over days is vacuumed by autovacuum as it goes; a table
                # bulk-loaded a moment ago is not, and its first reader sets every row's hint
                # bits and writes every page back (measured: the first export ~2x slower).
                t0 = time.perf_counter()
                with psycopg.connect(DSN, autocommit=True) as conn:
                    conn.execute(f"VACUUM (FREEZE, ANALYZE) {t.decisions}")
                print(f"setup: VACUUM (FREEZE, ANALYZE) in {time.perf_counter() - t0:.1f} s "
                      "(untimed in the target; --no-vacuum skips it)")
        exe = str(Path(sys.executable).parent / "inferplane")
        for fmt in a.formats.split(","):
            out = tmp / f"export.{fmt}"
            t0 = time.perf_counter()
            proc = subprocess.run([exe, "export", "--config", str(cfg), "--format", fmt,
                                   "-o", str(out)], capture_output=True, text=True)
            dt = time.perf_counter() - t0
            if proc.returncode != 0:
                raise SystemExit(f"export {fmt} failed: {proc.stderr}")
            results.append((f"export {fmt}", dt, out.stat().st_size))
            out.unlink()
        if a.cpu:
            for fmt in a.formats.split(","):
                results.append(cpu_split(t, fmt, tmp / f"cpu.{fmt}"))
        if a.verify:
            t0 = time.perf_counter()
            proc = subprocess.run([exe, "verify", "--config", str(cfg)], capture_output=True,
                                  text=True)
            dt = time.perf_counter() - t0
            if proc.returncode != 0:
                raise SystemExit(f"verify failed: {proc.stdout}{proc.stderr}")
            results.append(("verify (chain + signatures)", dt, 0))
    finally:
        if not a.keep:
            with psycopg.connect(DSN, autocommit=True) as conn:
                conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    print(f"\n{a.records:,} records, PostgreSQL {DSN.rsplit('@', 1)[-1]}, "
          f"{platform.machine()} {os.cpu_count()} CPUs, Python {platform.python_version()}")
    print(f"{'step':<30} {'seconds':>8} {'records/s':>11} {'output MiB':>11}")
    for name, dt, size in results:
        print(f"{name:<30} {dt:>8.1f} {a.records / dt:>11,.0f} {size / 2**20:>11,.0f}")


if __name__ == "__main__":
    main()
