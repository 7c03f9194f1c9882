# run `inferplane serve` with every scrape's outcome logged to $SCRAPE_LOG
import os, sys, time
os.environ["INFERPLANE_PURE"] = "1"
import inferplane.fleet.scraper as sc
_orig = sc.Scraper._scrape
out = open(os.environ["SCRAPE_LOG"], "a", buffering=1)
async def _scrape(self, endpoint):
    before = self.live.inflight_of(endpoint.name)
    r = await _orig(self, endpoint)
    m = self.live.live[endpoint.name].metrics
    out.write(f"{time.monotonic():.3f} {endpoint.name} {r[2]} took={r[1]*1e3:.1f}ms running={m.running if m else None} waiting={m.waiting if m else None} inflight={before}->{self.live.inflight_of(endpoint.name)}\n")
    return r
sc.Scraper._scrape = _scrape
from inferplane.cli import main
sys.argv = ["inferplane", *sys.argv[1:]]
main()
