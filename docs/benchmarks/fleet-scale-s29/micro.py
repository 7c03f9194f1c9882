"""In-process timings at 2,000 scraped endpoints (benchmarks.md, "2,000 endpoints, scraped").

    cd CHECKOUT && PYTHONPATH=src:. python PATH/TO/micro.py [FLEET.yaml]

CHECKOUT: the tree timed (its ``src``); this file may be another checkout's. FLEET.yaml: without
it, the fleet file is written first by this file's own checkout, in a separate process
(`bench/fleet_scale.py`'s ``fleet_yaml(2000, 9, 18999, LEDGER, 5.0)``: 2,000 endpoints in pools
of 100, each scraped every 5 s; importing that module here would put its checkout's ``src``
first on the path). Every endpoint is given a scraped page first. CPU time
(`time.process_time`) per call, averaged over the repeats shown.
"""

import asyncio
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from inferplane.api.pipeline import Gateway
from inferplane.config.loader import load_config
from inferplane.fleet.engine_metrics import EngineMetrics


async def main(path: str) -> None:
    gw = Gateway(load_config(path), path)
    live, adm = gw.live, gw.admission
    names = [e.name for e in live.fleet.endpoints]
    page = EngineMetrics(running=1.0, waiting=0.0, kv_usage=0.25)
    for n in names:
        live.update_metrics(n, page)
    live.snapshot()
    print(f"{len(names)} endpoints, all scraped")

    def t(name: str, f, n: int = 20) -> None:  # type: ignore[no-untyped-def]
        t0 = time.process_time()
        for i in range(n):
            f(i)
        print(f"{name} ({n} calls): {(time.process_time() - t0) / n * 1e3:.3f} ms")

    def full(i: int) -> None:
        live._snapshot_at = -1e9
        live.snapshot()

    def full_after_20_pages(i: int) -> None:  # 400 scrapes a second, 50 ms: 20 new pages
        for k in range(20):
            live.update_metrics(names[(i * 20 + k) % len(names)], page)
        live._snapshot_at = -1e9
        live.snapshot()

    t("snapshot, full refresh, no page since the last", full)
    t("snapshot, full refresh after 20 endpoints' new pages", full_after_20_pages)
    pool = ("m", None, None)

    def reserved(i: int) -> None:
        r = live.reserve(names[i % len(names)], 10)
        adm._compute_stats(live.snapshot(), pool)
        r.release()

    def reserved_base(i: int) -> None:
        r = live.reserve(names[i % len(names)], 10)
        live.snapshot()
        r.release()

    live.snapshot()
    adm._compute_stats(live.snapshot(), pool)
    t("reserve + its snapshot + pool sums + release", reserved, 200)
    t("reserve + its snapshot + release (no sums)", reserved_base, 200)
    t("rate_limited (none out after a 429)", lambda i: gw.rate_limited("m"), 200)


def fleet_file() -> str:
    """A 2,000-endpoint scraped fleet file, written by this file's checkout (module docstring)."""
    root = Path(__file__).resolve().parents[3]
    work = Path(tempfile.mkdtemp(prefix="fleet-scale-s29-"))
    code = ("import sys; from pathlib import Path; from bench.fleet_scale import fleet_yaml; "
            "w = Path(sys.argv[1]); (w / 'fleet.yaml').write_text("
            "fleet_yaml(2000, 9, 18999, w / 'ledger.sqlite3', 5.0))")
    env = {**os.environ, "PYTHONPATH": f"{root / 'src'}{os.pathsep}{root}"}
    subprocess.run([sys.executable, "-c", code, str(work)], cwd=root, env=env, check=True)
    return str(work / "fleet.yaml")


asyncio.run(main(sys.argv[1] if len(sys.argv) > 1 else fleet_file()))
