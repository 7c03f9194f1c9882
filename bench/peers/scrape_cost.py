"""bench/peers/scrape_cost.py: what one scrape of ``/metrics`` costs a vLLM engine: the whole
page, the filtered page as main asks it and as narrowed to the names the page carries, against
a health probe.

    python bench/peers/scrape_cost.py [--gets 300] [--rounds 6] [--engine-cpus 1 --client-cpus 0]

Starts one vLLM CPU engine as ``real_engines.py`` starts its three (``.fidelity-venv``,
``FIDELITY_VENV``), then, in ``--rounds`` rounds (the kinds' order alternating between rounds),
GETs ``--gets`` times each of (``--gets`` / 10 for the whole page):

- ``/health`` (a request the API server answers with nothing to render: the floor),
- ``/metrics/?name[]=…`` with every sample the parser reads (`engine_metrics.sample_names`,
  20 names: the query the gateway sent before session 29, ``main``),
- ``/metrics/?name[]=…`` with only those the engine's whole page carries
  (`HttpMetricsSource.narrowed_path`: what the gateway asks once its path is decided),
- the same with its brackets sent unescaped (``name[]=`` instead of ``name%5B%5D=``),
- ``/metrics/?name[]=vllm:num_requests_running`` (one gauge: the filtered route's floor),
- ``/metrics`` (the whole page; vLLM's instrumentator route, in a worker thread),

each request target sent byte for byte as aiohttp (the gateway's client) sends it (``:`` left
as is, the brackets escaped) over one kept-alive connection, sequentially, with the gateway's
``Accept-Encoding: identity``. Prints per kind the request target's and page's size, the API
server's CPU per GET (every thread of its process, from ``/proc/PID/task/*/schedstat``, in ns;
and from ``/proc/PID/stat``'s ticks), the engine core's, and the wall time per GET, each the
median over the rounds (with min-max), and whether the page parses as the whole page does. The
engine is idle: the page's values do not change between the reads.
"""

from __future__ import annotations

import argparse
import http.client
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlencode, urlsplit

ROOT = Path(__file__).resolve().parents[2]
for _p in (str(ROOT / "src"), str(ROOT)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

from bench.peers import real_engines as R  # noqa: E402
from bench.peers.gateway_gap import proc_cpu_s  # noqa: E402
from bench.peers.procs import parse_cpu_list  # noqa: E402
from inferplane.fleet.engine_metrics import parse_vllm, sample_names  # noqa: E402
from inferplane.fleet.scraper import HttpMetricsSource  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gets", type=int, default=300, help="GETs per kind and round")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--executor", choices=R.EXECUTORS, default="uni",
                    help="the engine's executor (real_engines.py; session 12's numbers: mp)")
    ap.add_argument("--engine-cpus", metavar="LIST", help="the engine's CPUs (e.g. 1)")
    ap.add_argument("--client-cpus", metavar="LIST", help="this script's CPUs (e.g. 0)")
    a = ap.parse_args()
    engine_cpus = parse_cpu_list(a.engine_cpus) if a.engine_cpus else None
    if a.client_cpus:
        os.sched_setaffinity(0, parse_cpu_list(a.client_cpus))
    print(f"executor {a.executor}, engine CPUs {engine_cpus or 'any'}, client CPUs "
          f"{sorted(os.sched_getaffinity(0))}", flush=True)
    work = Path(tempfile.mkdtemp(prefix="scrape-cost-"))
    try:
        (url, _), = R.start_engines(1, 1024, 16, work, executor=a.executor, cpus=engine_cpus)
        measure(url, R.PROCS[0].pid, a.gets, a.rounds)
    finally:
        R.stop_engines()  # also an engine left half-started
    return 0


def aiohttp_target(path: str) -> str:
    """``path`` (a path and query) as aiohttp puts it on the wire: yarl requotes the query,
    leaving ``:`` as is and escaping the brackets."""
    import yarl

    return yarl.URL("http://127.0.0.1" + path).raw_path_qs


def ns_on_cpu(pid: int) -> int:
    """Nanoseconds every thread of ``pid`` alive now has run (``schedstat``'s first field)."""
    total = 0
    for t in os.listdir(f"/proc/{pid}/task"):
        try:
            total += int(Path(f"/proc/{pid}/task/{t}/schedstat").read_text().split()[0])
        except (OSError, ValueError, IndexError):  # gone meanwhile
            continue
    return total


def children(pid: int) -> list[int]:
    """The other processes of ``pid``'s session (the engine core)."""
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit() and int(d.name) != pid:
            try:
                fields = (d / "stat").read_text().rpartition(")")[2].split()
            except OSError:
                continue
            if int(fields[3]) == pid:
                out.append(int(d.name))
    return out


def kinds(url: str) -> list[tuple[str, str, int]]:
    """(label, request target, GETs per round in tenths of ``--gets``) per kind."""
    c = http.client.HTTPConnection(*_host_port(url))
    c.request("GET", "/metrics", headers={"Accept-Encoding": "identity"})
    whole = c.getresponse().read().decode()
    c.close()
    names = sample_names("vllm") or ()
    main_q = "/metrics/?" + urlencode([("name[]", n) for n in names])
    narrowed = HttpMetricsSource.narrowed_path("vllm", whole)
    assert narrowed is not None
    return [
        ("/health", "/health", 10),
        (f"filtered, main ({len(names)} names)", aiohttp_target(main_q), 10),
        (f"filtered, narrowed ({narrowed.count('name')} names)", aiohttp_target(narrowed), 10),
        ("filtered, narrowed, [] unescaped",
         aiohttp_target(narrowed).replace("%5B%5D", "[]"), 10),
        ("filtered, 1 gauge", aiohttp_target("/metrics/?" + urlencode(
            [("name[]", names[0])])), 10),
        ("whole /metrics", "/metrics", 1),
    ]


def _host_port(url: str) -> tuple[str, int]:
    u = urlsplit(url)
    assert u.hostname is not None and u.port is not None
    return u.hostname, u.port


def measure(url: str, pid: int, gets: int, rounds: int) -> None:
    todo = kinds(url)
    others = children(pid)
    conn = http.client.HTTPConnection(*_host_port(url))
    headers = {"Accept-Encoding": "identity", "Accept": "*/*"}

    def get(target: str) -> bytes:
        conn.request("GET", target, headers=headers)
        r = conn.getresponse()
        body = r.read()
        assert r.status == 200, (target[:60], r.status)
        return body

    whole = parse_vllm(get("/metrics").decode())
    pages = {label: get(target) for label, target, _ in todo}
    samples: dict[str, list[tuple[float, float, float, float]]] = {k[0]: [] for k in todo}
    print(f"API server pid {pid}, engine core pids {others}", flush=True)
    for rnd in range(rounds):
        order = todo if rnd % 2 == 0 else todo[::-1]
        for label, target, tenths in order:
            n = max(1, gets * tenths // 10)
            get(target)
            ns0, cs0 = ns_on_cpu(pid), proc_cpu_s(pid)
            core0 = sum(ns_on_cpu(p) for p in others)
            t0 = time.monotonic()
            for _ in range(n):
                get(target)
            t1 = time.monotonic()
            ns1, cs1 = ns_on_cpu(pid), proc_cpu_s(pid)
            core1 = sum(ns_on_cpu(p) for p in others)
            samples[label].append(((ns1 - ns0) / 1e6 / n, 1e3 * (cs1 - cs0) / n,
                                   (core1 - core0) / 1e6 / n, 1e3 * (t1 - t0) / n))
        print(f"round {rnd} done", flush=True)
    conn.close()
    print(f"\n{rounds} rounds; median (min-max) over the rounds, ms per GET\n")
    print("| GET | target bytes | page bytes | API server CPU (schedstat) | API server CPU "
          "(ticks) | engine core CPU | wall | parses as the whole page |")
    print("|---|---:|---:|---:|---:|---:|---:|---|")
    for label, target, _ in todo:
        s = samples[label]
        cols = []
        for i in range(4):
            v = [x[i] for x in s]
            cols.append(f"{statistics.median(v):.3f} ({min(v):.3f}-{max(v):.3f})")
        page = pages[label]
        parses = "–" if label == "/health" else str(parse_vllm(page.decode()) == whole)
        print(f"| {label} | {len(target)} | {len(page)} | {' | '.join(cols)} | {parses} |",
              flush=True)
    for label, target, _ in todo:
        print(f"{label}: {target[:100]}{'…' if len(target) > 100 else ''}")


if __name__ == "__main__":
    sys.exit(main())
