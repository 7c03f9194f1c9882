"""bench/peers/scrape_cost.py: what one scrape of ``/metrics`` costs a vLLM engine, whole page
against the filtered page (`gateway.scrape_filter`).

    python bench/peers/scrape_cost.py [--gets 200]

Starts one vLLM CPU engine as ``real_engines.py`` starts its three (``.fidelity-venv``,
``FIDELITY_VENV``), then GETs ``--gets`` times each of: ``/metrics`` (the whole page),
``/metrics?name[]=…`` (vLLM's ``/metrics`` route ignores the query), ``/metrics/?name[]=…``
(prometheus_client's app, which filters) with the samples the gateway reads
(`engine_metrics.sample_names`), and ``/metrics`` again; prints per kind the page's size, the
API server's CPU per GET (its process, from ``/proc``) and the wall time per GET, and whether the
page parses as the whole page does. One client, sequential, ``Accept-Encoding: identity`` as the
gateway sends. The engine is idle: the page's values do not change between the reads.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[2]
for _p in (str(ROOT / "src"), str(ROOT)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

from bench.peers import real_engines as R  # noqa: E402
from bench.peers.gateway_gap import proc_cpu_s  # noqa: E402
from inferplane.fleet.engine_metrics import parse_vllm, sample_names  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gets", type=int, default=200)
    ap.add_argument("--executor", choices=R.EXECUTORS, default="uni",
                    help="the engine's executor (real_engines.py; session 12's numbers: mp)")
    a = ap.parse_args()
    print(f"executor {a.executor}", flush=True)
    work = Path(tempfile.mkdtemp(prefix="scrape-cost-"))
    try:
        (url, _), = R.start_engines(1, 1024, 16, work, executor=a.executor)
        pid = R.PROCS[0].pid
        measure(url, pid, a.gets)
    finally:
        R.stop_engines()  # also an engine left half-started
    return 0


def measure(url: str, pid: int, gets: int) -> None:
    names = [("name[]", n) for n in sample_names("vllm") or ()]
    with httpx.Client(headers={"Accept-Encoding": "identity"}) as c:
        whole = parse_vllm(c.get(f"{url}/metrics").text)
        for label, path, params in [("/metrics", "/metrics", None),
                                    ("/metrics?name[]=...", "/metrics", names),
                                    ("/metrics/?name[]=...", "/metrics/", names),
                                    ("/metrics (again)", "/metrics", None)]:
            page = c.get(url + path, params=params)
            page.raise_for_status()
            c0, t0 = proc_cpu_s(pid), time.monotonic()
            for _ in range(gets):
                c.get(url + path, params=params).raise_for_status()
            c1, t1 = proc_cpu_s(pid), time.monotonic()
            print(f"{label:22s} {len(page.content):6d} bytes {page.text.count(chr(10)):4d} "
                  f"lines: API server CPU {1e3 * (c1 - c0) / gets:.2f} ms/GET, wall "
                  f"{1e3 * (t1 - t0) / gets:.2f} ms/GET, parses as the whole page: "
                  f"{parse_vllm(page.text) == whole}", flush=True)

if __name__ == "__main__":
    sys.exit(main())
