"""In-process timings of the three cuts (benchmarks.md, "A request at 2,000 endpoints").

    cd CHECKOUT && PYTHONPATH=src:. python micro.py FLEET.yaml

FLEET.yaml: a fleet file `bench/fleet_scale.py`'s `fleet_yaml` writes (see micro.sh). CPU time
(`time.process_time`) per call, averaged over the repeats shown.
"""

import asyncio
import sys
import time

from inferplane.api.pipeline import Gateway
from inferplane.config.loader import load_config


async def main(path: str) -> None:
    gw = Gateway(load_config(path), path)
    live, adm = gw.live, gw.admission
    names = [e.name for e in live.fleet.endpoints]
    print(f"{len(names)} endpoints")

    def t(name: str, f, n: int = 20) -> None:  # type: ignore[no-untyped-def]
        t0 = time.process_time()
        for i in range(n):
            f(i)
        print(f"{name} ({n} calls): {(time.process_time() - t0) / n * 1e3:.3f} ms")

    def full(i: int) -> None:
        live._snapshot_at = -1e9
        live.snapshot()

    def partial(i: int) -> None:
        live._version += 1
        live.live[names[0]].dirty = True
        live.snapshot()

    t("snapshot, full refresh", full)
    t("snapshot, one endpoint written", partial)
    pool = ("m", None, None)
    snap = live.snapshot()
    t("pool sums, the same snapshot (the first call builds the columns on the branch)",
      lambda i: adm._compute_stats(snap, pool))

    def reserved(i: int) -> None:
        r = live.reserve(names[i % len(names)], 10)
        adm._compute_stats(live.snapshot(), pool)
        r.release()

    def reserved_base(i: int) -> None:
        r = live.reserve(names[i % len(names)], 10)
        live.snapshot()
        r.release()

    t("reserve + its snapshot + pool sums + release", reserved, 200)
    t("reserve + its snapshot + release (no sums)", reserved_base, 200)
    t("outlier sweep", lambda i: gw.outliers.run(live), 5)


asyncio.run(main(sys.argv[1]))
