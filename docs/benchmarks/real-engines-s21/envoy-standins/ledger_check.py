"""Stand-in check that the picker placed and Envoy sent where it said: three fake engines
(access logs), the `inferplane envoy` setup's own starter with the bench's real-engine fleet
file plus gateway.ledger_path, the Mooncake slice's first DURATION trace seconds replayed
open-loop by the bench's client; then the ledger's decisions by endpoint against each engine's
access-log count of completions."""
import asyncio, collections, json, sqlite3, sys, tempfile, time
from pathlib import Path
import yaml
sys.path[:0] = ["src", "."]
from bench.peers import client, procs
from bench.peers.peers import ENVOY_EPP, Context, setups
from bench.peers.real_engines import fleet_yaml
from bench.peers.run import DEFAULT_TRACE, start_router, warm_up
from bench.peers.workload import PATHS, SliceSpec, encode_bodies, plan
from inferplane.twin.traces.loader import load_trace

duration = float(sys.argv[1]) if len(sys.argv) > 1 else 60.0
work = Path(tempfile.mkdtemp(prefix="envoyreal-ledger-"))
ports = procs.free_ports(3)
urls = [f"http://127.0.0.1:{p}" for p in ports]
fakes = [procs.Proc(f"fake{i}", [sys.executable, "bench/peers/fake_engine.py", "--port", str(p),
                                "--log", str(work / f"fake{i}.access")], work / f"fake{i}.log")
         for i, p in enumerate(ports)]
try:
    for f, u in zip(fakes, urls):
        f.wait_http(u + "/health")
    cfg = yaml.safe_load(fleet_yaml([(u, "") for u in urls], 1024, 16, False))
    cfg["gateway"]["ledger_path"] = str(work / "ledger.sqlite")
    setup = next(s for s in setups() if s.name == ENVOY_EPP)
    proc, base = start_router(setup, Context(work, urls, "tiny-llama", cfg, {}))
    warm_up(base, setup, "tiny-llama")
    planned, _ = plan(load_trace(DEFAULT_TRACE), SliceSpec(0.0, duration, 1.0, 1.0, max_output=16))
    bodies = encode_bodies(planned, "completion-text", "tiny-llama", 32)
    records, wall = asyncio.run(client.replay(base, planned, bodies, PATHS["completion-text"],
                                              dict(setup.headers), request_timeout_s=120,
                                              deadline_s=planned[-1].arrival_s + 60))
    time.sleep(8)  # the observer's reports and the ledger's background writes
    proc.stop()
    ok = sum(r.ok for r in records)
    print(f"replayed {len(records)} requests in {wall:.0f}s: {ok} ok, errors "
          f"{collections.Counter(r.error for r in records if not r.ok)}")
    db = sqlite3.connect(work / "ledger.sqlite")
    rows = db.execute("SELECT endpoint, status, count(*), avg(ttft_s) FROM decisions "
                      "GROUP BY endpoint, status").fetchall()
    print("ledger decisions (endpoint, status, n, mean TTFT s):", rows)
    for i in range(3):
        n = sum(1 for ln in (work / f"fake{i}.access").read_text().splitlines()
                if "/v1/completions" in ln)
        print(f"engine vllm-{i} ({urls[i]}): {n} completions in its access log")
    print("warm-up requests (8) are in both counts")
finally:
    procs.stop_all()
