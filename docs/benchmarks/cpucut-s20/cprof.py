"""cProfile of the gateway serving the stand-in replay (cpu_per_request.py's setup)."""
import asyncio, contextlib, os, signal, subprocess, sys, tempfile, time
from pathlib import Path
ROOT = Path("/tmp/cpucut/base")
sys.path[:0] = [str(ROOT / "src"), str(ROOT)]
from bench.peers import client, real_engines
from bench.peers.burst_transit import start_engines
from bench.peers.gateway_gap import HEADERS, bench_slice, gateway_config
from bench.peers.procs import free_port
from bench.peers.cpu_per_request import wait_up, stop, cpu_ns

out = Path(sys.argv[1]); dur = float(sys.argv[2])
work = Path(tempfile.mkdtemp(prefix="cpucut-"))
planned, bodies = bench_slice(0.0, dur, 1.0)
engines = start_engines(3, 0.05, work)
try:
    port = free_port()
    conf = gateway_config([e for e, _ in engines], port, "", work, "prof")
    log = open(work / "gw.log", "wb")
    p = subprocess.Popen([sys.executable, "-m", "cProfile", "-o", str(out), "-m", "inferplane.cli",
                          "serve", "--config", str(conf), "--log-level", "warning"],
                         stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": str(ROOT / "src"), "HF_HUB_OFFLINE": "1"})
    wait_up(f"http://127.0.0.1:{port}", p, "gateway", "/ready")
    time.sleep(2)
    c0 = cpu_ns(p.pid)
    records, _ = asyncio.run(client.replay(f"http://127.0.0.1:{port}", planned, bodies,
                                           "/v1/completions", HEADERS, request_timeout_s=60,
                                           deadline_s=planned[-1].arrival_s + 30))
    c1 = cpu_ns(p.pid)
    ok = sum(1 for r in records if r.ok)
    print(f"{ok} ok of {len(records)}; gateway cpu {(c1-c0)/1e9:.3f} s under cProfile", flush=True)
    p.send_signal(signal.SIGINT)
    try:
        p.wait(60)
    except subprocess.TimeoutExpired:
        print("gateway did not stop on SIGINT; terminating", flush=True)
        p.terminate()
        try:
            p.wait(30)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
    print("gateway rc", p.returncode, (work / "gw.log").read_text()[-500:])
finally:
    for q in real_engines.PROCS:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(q.pid, signal.SIGTERM)
