"""Stand-ins: the `inferplane envoy` setup in front of three fake engines, the Mooncake slice's
first DURATION trace seconds replayed by the bench's client; CPU seconds of Envoy and of the
picker apart (by thread), and (with PYSPY=1) py-spy on the picker during the replay."""
import asyncio, os, subprocess, sys, tempfile, time
from pathlib import Path
import yaml
sys.path[:0] = ["src", "."]
from bench.envoy_epp import thread_cpu
from bench.peers import client, metrics, procs
from bench.peers.peers import ENVOY_EPP, Context, setups
from bench.peers.real_engines import fleet_yaml
from bench.peers.run import DEFAULT_TRACE, start_router, warm_up
from bench.peers.workload import PATHS, SliceSpec, encode_bodies, plan
from inferplane.twin.traces.loader import load_trace

duration = float(sys.argv[1]) if len(sys.argv) > 1 else 60.0
out = Path(sys.argv[2]) if len(sys.argv) > 2 else Path("/work/exp/envoyreal/prof")
out.mkdir(parents=True, exist_ok=True)
work = Path(tempfile.mkdtemp(prefix="envoyreal-prof-"))
ports = procs.free_ports(3)
urls = [f"http://127.0.0.1:{p}" for p in ports]
fakes = [procs.Proc(f"fake{i}", [sys.executable, "bench/peers/fake_engine.py", "--port", str(p)],
                    work / f"fake{i}.log") for i, p in enumerate(ports)]
try:
    for f, u in zip(fakes, urls):
        f.wait_http(u + "/health")
    cfg = yaml.safe_load(fleet_yaml([(u, "") for u in urls], 1024, 16, False))
    if os.environ.get("NOOBS"):
        cfg["epp"] = {"observe_responses": False}
    print("observer:", not os.environ.get("NOOBS"), "envoy concurrency:",
          os.environ.get("PEERS_ENVOY_CONCURRENCY") or 1)
    setup = next(s for s in setups() if s.name == ENVOY_EPP)
    proc, base = start_router(setup, Context(work, urls, "tiny-llama", cfg, {}))
    warm_up(base, setup, "tiny-llama")
    picker, envoy = proc.parts
    planned, _ = plan(load_trace(DEFAULT_TRACE), SliceSpec(0.0, duration, 1.0, 1.0, max_output=16))
    bodies = encode_bodies(planned, "completion-text", "tiny-llama", 32)
    spy = None
    if os.environ.get("PYSPY"):
        spy = subprocess.Popen(["/work/main/.venv/bin/py-spy", "record", "--pid", str(picker.pid),
                                "--rate", "200", "--nonblocking", "--format", "raw", "--output",
                                str(out / "picker.raw"), "--duration",
                                str(int(planned[-1].arrival_s) + 5)],
                               stdout=open(out / "pyspy.log", "w"), stderr=subprocess.STDOUT)
        time.sleep(1)
    t0 = {n: thread_cpu(p.pid) for n, p in (("picker", picker), ("envoy", envoy))}
    records, wall = asyncio.run(client.replay(base, planned, bodies, PATHS["completion-text"],
                                              dict(setup.headers), request_timeout_s=120,
                                              deadline_s=planned[-1].arrival_s + 60))
    t1 = {n: thread_cpu(p.pid) for n, p in (("picker", picker), ("envoy", envoy))}
    if spy:
        spy.wait(120)
    n = len(records)
    s = metrics.summarize(records, wall, metrics.Slo.scaled(1000, 100, 1.0))
    print(f"{n} requests, errors {s['errors']}, TTFT p50/p90/p99 {s['ttft_ms']['p50']:.0f}/"
          f"{s['ttft_ms']['p90']:.0f}/{s['ttft_ms']['p99']:.0f} ms (fake engines' TTFT 150 ms)")
    for name in t0:
        per = {t: v - t0[name].get(t, 0.0) for t, v in t1[name].items()}
        tot = sum(per.values())
        print(f"{name}: {tot:.2f} s CPU = {1e3 * tot / n:.2f} ms/request; by thread: "
              + ", ".join(f"{t} {v:.2f}" for t, v in sorted(per.items(), key=lambda x: -x[1]) if v > 0.005))
    proc.stop()
finally:
    procs.stop_all()
