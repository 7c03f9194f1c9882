import sys, time, asyncio
sys.path[:0] = ["src", "."]
from inferplane.config.loader import load_config
from inferplane.api.pipeline import Gateway
cfgp = sys.argv[1]
async def main():
    gw = Gateway(load_config(cfgp), cfgp)
    live = gw.live
    def t(name, f, n=20):
        t0 = time.process_time()
        for _ in range(n): f()
        print(f"{name}: {(time.process_time()-t0)/n*1e3:.3f} ms")
    def full():
        live._snapshot_at = -1e9; live.snapshot()
    t("snapshot full", full)
    def partial():
        live._version += 1; live.live[live.fleet.endpoints[0].name].dirty = True; live.snapshot()
    t("snapshot partial", partial)
    snap = live.snapshot()
    adm = gw.admission
    pool = next(iter([("m", None, None)]))
    t("compute_stats", lambda: adm._compute_stats(snap, pool))
    t("outlier sweep", lambda: gw.outliers.run(live), 5)
asyncio.run(main())
