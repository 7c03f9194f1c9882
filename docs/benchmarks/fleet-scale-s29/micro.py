"""In-process timings at 2,000 scraped endpoints (benchmarks.md, "2,000 endpoints, scraped").

    cd CHECKOUT && PYTHONPATH=src:. python micro.py FLEET.yaml

FLEET.yaml: a fleet file `bench/fleet_scale.py`'s `fleet_yaml` writes with a scrape interval
(see micro.sh). Every endpoint is given a scraped page first. CPU time (`time.process_time`)
per call, averaged over the repeats shown.
"""

import asyncio
import sys
import time

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


asyncio.run(main(sys.argv[1]))
