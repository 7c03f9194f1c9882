"""The batch lane shared by replicas (issue 14 item 5): one batch run by one process on SQLite
(the embedded default, as before), by one and by two `inferplane serve` replicas sharing
PostgreSQL, and by two replicas one of which is killed with -9 mid-run — side by side in one run.

Real processes on loopback: two emulated Llama-3.1-8B engines (H100 profiles), the replicas
(``batch.max_concurrency`` lines each, ``batch.lease_s`` lease), one batch of ``--lines`` lines.
For each setting: seconds from submitting the batch to ``completed``, lines per second, the
upstream executions the engines counted (``vllm:request_success_total``; more than the lines
means some line ran twice: the killed replica's lines in flight, re-run after their lease), and
whether the output file holds every line exactly once.

    .venv/bin/python bench/batch_replicas.py --lines 200 --lease 2 --runs 2
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import sys
import tempfile
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import orjson
import psycopg

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.builders import endpoint, model, pool_fleet, to_yaml  # noqa: E402
from tests.support.procs import Proc, free_port  # noqa: E402

DSN = os.environ.get("INFERPLANE_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")
KEY = "sk-batch-bench"
_SUCCESS = re.compile(rb"^vllm:request_success_total\{[^}]*\} ([0-9.eE+-]+)$", re.M)


@dataclass
class Row:
    setting: str
    lines: int
    seconds: float
    executions: int
    exactly_once: bool
    status: str


def fleet(engines: dict[str, int], batch: dict[str, Any], concurrency: int,
          lease: float) -> str:
    return to_yaml(pool_fleet(
        gateway={"scrape_interval_s": 0.05, "token_estimate": "words", "seed": 1},
        batch={"poll_interval_s": 0.02, "max_concurrency": concurrency, "lease_s": lease,
               "max_utilisation": 1.0, **batch},
        substrate={"cost": {"hourly_usd": 3.0}},
        endpoints=[endpoint(n, p, models=[model("llama-3.1-8b", None)], max_concurrency=32)
                   for n, p in engines.items()],
        key=KEY,
    ))


def executions(engines: dict[str, int]) -> int:
    n = 0.0
    for p in engines.values():
        text = httpx.get(f"http://127.0.0.1:{p}/metrics", timeout=5).content
        n += sum(float(v) for v in _SUCCESS.findall(text))
    return int(n)


def one(tmp: Path, engines: dict[str, int], setting: str, lines: int, concurrency: int,
        lease: float) -> Row:
    schema = f"bench_{uuid.uuid4().hex[:10]}"
    replicas = 1 if setting in ("sqlite x1", "postgres x1") else 2
    batch = ({"path": str(tmp / (schema + ".sqlite"))} if setting.startswith("sqlite")
             else {"postgres_dsn": DSN, "postgres_schema": schema})
    cfg = tmp / f"{schema}.yaml"
    cfg.write_text(fleet(engines, batch, concurrency, lease))
    gws: list[tuple[Proc, str]] = []
    h = {"Authorization": f"Bearer {KEY}"}
    try:
        for i in range(replicas):
            port = free_port()
            gws.append((Proc(["-m", "inferplane.cli", "serve", "--config", str(cfg), "--port",
                              str(port)], tmp / f"{schema}-{i}.log"),
                        f"http://127.0.0.1:{port}"))
        for p, base in gws:
            p.wait_http(f"{base}/ready", timeout=60)
        base = gws[-1][1]
        body = b"".join(orjson.dumps({
            "custom_id": f"l{i}", "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": "llama-3.1-8b", "max_tokens": 48,
                     "messages": [{"role": "user", "content": f"bench line {i} " * 6}]},
        }) + b"\n" for i in range(lines))
        fid = httpx.post(f"{base}/v1/files", headers=h, data={"purpose": "batch"},
                         files={"file": ("in.jsonl", body)}, timeout=60).json()["id"]
        before = executions(engines)
        t0 = time.monotonic()
        bid = httpx.post(f"{base}/v1/batches", headers=h, timeout=30, json={
            "input_file_id": fid, "endpoint": "/v1/chat/completions",
            "completion_window": "24h"}).json()["id"]
        killed = setting != "postgres x2, kill -9 one"
        while True:
            b = httpx.get(f"{base}/v1/batches/{bid}", headers=h, timeout=10).json()
            if b["status"] not in ("validating", "in_progress", "finalizing"):
                break
            done = b["request_counts"]["completed"] + b["request_counts"]["failed"]
            if not killed and done >= lines // 3:
                os.kill(gws[0][0].p.pid, signal.SIGKILL)
                killed = True
            time.sleep(0.05)
        seconds = time.monotonic() - t0
        time.sleep(0.3)  # the last answers reach the engines' counters
        ran = executions(engines) - before
        ok = False
        if b.get("output_file_id"):
            out = httpx.get(f"{base}/v1/files/{b['output_file_id']}/content", headers=h,
                            timeout=30).content
            seen = Counter(orjson.loads(ln)["custom_id"] for ln in out.splitlines() if ln)
            ok = seen == Counter({f"l{i}": 1 for i in range(lines)})
        return Row(setting, lines, seconds, ran, ok, b["status"])
    finally:
        for p, _ in gws:
            p.stop()
        if not setting.startswith("sqlite"):
            with psycopg.connect(DSN, autocommit=True) as conn:
                conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lines", type=int, default=200)
    ap.add_argument("--concurrency", type=int, default=4, help="batch.max_concurrency")
    ap.add_argument("--lease", type=float, default=2.0, help="batch.lease_s")
    ap.add_argument("--runs", type=int, default=1)
    args = ap.parse_args()
    settings = ["sqlite x1", "postgres x1", "postgres x2", "postgres x2, kill -9 one"]
    rows: list[Row] = []
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        engines = {f"e{i}": free_port() for i in range(2)}
        (tmp / "engines.yaml").write_text(fleet(engines, {"path": "x.sqlite"}, 1, 1.0))
        emu = Proc(["-m", "inferplane.cli", "emulate", "--config", str(tmp / "engines.yaml")],
                   tmp / "emulate.log")
        try:
            for p in engines.values():
                emu.wait_http(f"http://127.0.0.1:{p}/health")
            for _ in range(args.runs):
                for s in settings:
                    rows.append(one(tmp, engines, s, args.lines, args.concurrency, args.lease))
                    print(rows[-1], flush=True)
        finally:
            emu.stop()
    print(f"\n| setting | lines | seconds to completed | lines/s | upstream executions | "
          f"each line once in the output | status |  (batch.max_concurrency "
          f"{args.concurrency} per process, lease {args.lease} s)")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r.setting} | {r.lines} | {r.seconds:.1f} | {r.lines / r.seconds:.1f} | "
              f"{r.executions} | {'yes' if r.exactly_once else 'NO'} | {r.status} |")


if __name__ == "__main__":
    main()
