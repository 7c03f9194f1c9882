"""Session 22 (core22), run once at 00:32-00:36 UTC through the queue, from the repository root:
``PYTHONPATH=src:. FIDELITY_VENV=… python docs/benchmarks/real-engines-s22-cores/lone_pinned.py``.

Three engines started on CPU 1 (`bench.peers.real_engines.start_engines(cpus=[1])`), this client
on CPU 0: the engines' CPU while idle (5 s), 12 lone 600-token prompts (random ids, max_tokens
1, one at a time) pinned, then every engine thread moved to CPUs 0-1, back to CPU 1, and to CPU
0 (client on 1); then the rate-×1 pilot of sglang-router (``pilot-rate-1/``) on the same engines
back on CPU 1. Output: ``lone_pinned.out``."""
import os, sys, time, tempfile, json, random
from pathlib import Path
import httpx
sys.path[:0] = ["src", "."]
from bench.peers import real_engines as re_

def cpu_by_thread():
    out = {}
    for pid in re_.engine_pids():
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for t in tids:
            try:
                st = Path(f"/proc/{pid}/task/{t}/stat").read_text()
                comm = st[st.index("(")+1:st.rindex(")")]
                f = st.rpartition(")")[2].split()
                out[(pid, int(t), comm)] = int(f[11]) + int(f[12])
            except OSError:
                pass
    return out

def idle(label, s=5.0):
    a = cpu_by_thread(); time.sleep(s); b = cpu_by_thread()
    d = {k: b[k] - a.get(k, 0) for k in b}
    tot = sum(d.values()) / os.sysconf("SC_CLK_TCK")
    top = sorted(d.items(), key=lambda kv: -kv[1])[:6]
    print(f"{label}: engines' CPU while idle {tot/s*100:.1f}% of a CPU; top threads {[(k[2], v) for k, v in top]}", flush=True)

def lone(url, label, n=12, toks=600):
    rnd = random.Random(1)
    xs = []
    for i in range(n):
        prompt = [4 + rnd.randrange(250) for _ in range(toks)]
        t0 = time.perf_counter()
        r = httpx.post(f"{url}/v1/completions", json={"model": "tiny-llama", "prompt": prompt,
                       "max_tokens": 1, "ignore_eos": True}, timeout=60)
        r.raise_for_status()
        xs.append(1e3 * (time.perf_counter() - t0))
    xs.sort()
    print(f"{label}: {n} lone {toks}-token prompts, max_tokens 1: ms p50 {xs[n//2]:.1f} min {xs[0]:.1f} max {xs[-1]:.1f}", flush=True)

def set_all(cpus):
    for pid in re_.engine_pids():
        for t in os.listdir(f"/proc/{pid}/task"):
            try:
                os.sched_setaffinity(int(t), cpus)
            except OSError:
                pass

work = Path(tempfile.mkdtemp(prefix="core22-diag-"))
try:
    os.sched_setaffinity(0, {0})
    eng = re_.start_engines(3, 1024, 16, work, cpus=[1])
    url = eng[0][0]
    print(re_.threads_cpus(re_.engine_pids()), flush=True)
    idle("pinned to CPU 1")
    lone(url, "pinned to CPU 1")
    lone(url, "pinned to CPU 1 (again)")
    set_all({0, 1}); os.sched_setaffinity(0, {0, 1})
    print(re_.threads_cpus(re_.engine_pids()), flush=True)
    idle("unpinned (0-1)")
    lone(url, "unpinned (0-1)")
    set_all({1}); os.sched_setaffinity(0, {0})
    lone(url, "pinned to CPU 1 again")
    set_all({0}); os.sched_setaffinity(0, {1})
    lone(url, "engines on CPU 0, client on CPU 1")
    set_all({1}); os.sched_setaffinity(0, {0})
    print(re_.threads_cpus(re_.engine_pids()), flush=True)
    import subprocess
    urls = ",".join(f"{u}@{kv}" for u, kv in eng)
    print("== pilot rate 1", time.strftime("%H:%M:%S", time.gmtime()), flush=True)
    subprocess.run([sys.executable, "bench/peers/real_engines.py", "--urls", urls, "--router-cpus", "0",
                    "--runs", "1", "--duration", "60", "--warmup-s", "20", "--rate-scale", "1",
                    "--max-output", "16", "--setup-limit", "300", "--only", "sglang-router cache_aware",
                    "--out", "/work/exp/core22/pilot-1"], timeout=400)
    print(re_.threads_cpus(re_.engine_pids()), flush=True)
finally:
    re_.stop_engines()
