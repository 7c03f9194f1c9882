"""bench/fairness_sim: does a tenant flooding at 10× its share move another tenant's P99 TTFT?

Deterministic: the simulator runs the gateway's own admission (fair queue, shares, reserve,
dispatch gate) and placement on a virtual clock, so the numbers depend on the code alone, not
on this machine's load (`bench/fairness.py` asks the same question of a live gateway).

Scenario: h100x8 (`examples/fleets/h100x8.yaml`) with ``max_concurrency: 6`` per endpoint (48
slots: about 40 requests/s of this workload), two tenants of the interactive class, every
request 2,000 prompt tokens and 100 output tokens (no shared prefixes):

- **victim**: one request every 0.1 s (10 req/s: half its fair share of the fleet);
- **flooder**: 200 req/s, ten times its fair share (20 req/s);
- ``--victim-every 0.05`` puts the victim at its whole share (20 req/s) instead.

Each mode runs the victim alone, then victim + flood; the change of the victim's P99 TTFT is the
result (target, issue 13: ≤ +20 %). Modes: the dispatch gate (``admission.queue.
max_prefill_queue_s: 0``) with the default reserve and with strict shares
(``keep_unused_shares``); without the gate (the queue as before); without admission (placement
alone).

    python bench/fairness_sim.py [--duration 15] [--victim-every 0.1] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from inferplane.config.loader import load_config
from inferplane.config.schema import MixEntry
from inferplane.twin.simulator.mix import resolve_mix
from inferplane.twin.simulator.report import percentile
from inferplane.twin.simulator.simulator import simulate
from inferplane.twin.traces.loader import TraceRequest

ROOT = Path(__file__).resolve().parents[1]
FLEET = ROOT / "examples" / "fleets" / "h100x8.yaml"

TENANTS = f"""
tenants:
  - {{name: victim, api_keys: ["sha256:{'ab' * 32}"], default_class: interactive,
     region: us-east}}
  - {{name: flooder, api_keys: ["sha256:{'cd' * 32}"], default_class: interactive,
     region: us-east}}
"""

#: mode → (admission on, admission.queue settings)
MODES: dict[str, tuple[bool, str]] = {
    "gate + reserve": (True, "max_prefill_queue_s: 0"),
    "gate + strict shares": (True, "max_prefill_queue_s: 0, keep_unused_shares: true"),
    "reserve (no gate: before)": (True, ""),
    "strict shares (no gate: before)": (True, "keep_unused_shares: true"),
    "no admission": (False, ""),
}


def fleet_file(tmp: Path, queue: str) -> Path:
    text = FLEET.read_text("utf-8")
    text = text[: text.index("\ntenants:")] + "\n" + TENANTS
    text = text.replace("max_concurrency: 128", "max_concurrency: 6")
    text += f"\nadmission: {{queue: {{max_waiting: 256{', ' + queue if queue else ''}}}}}\n"
    path = tmp / "fleet.yaml"
    path.write_text(text, "utf-8")
    return path


def run(mode: str, flood_rps: float, victim_every: float, duration: float, tmp: Path
        ) -> dict[str, Any]:
    admission, queue = MODES[mode]
    config = load_config(fleet_file(tmp, queue))
    victim, flooder = resolve_mix(config, [
        MixEntry.model_validate({"tenant": t, "class": "interactive", "fraction": 0.5})
        for t in ("victim", "flooder")])
    arrivals = [(i * victim_every, victim) for i in range(int(duration / victim_every))]
    if flood_rps:
        every = 1.0 / flood_rps
        arrivals += [(k * every + every / 3, flooder) for k in range(int(duration * flood_rps))]
    arrivals.sort(key=lambda a: a[0])
    c0 = time.process_time()
    sim = simulate(config, [TraceRequest(t, 2000, 100) for t, _ in arrivals], "default",
                   seed=1, admission=admission, assign=[s for _, s in arrivals])
    cpu = time.process_time() - c0
    mine = [r for r in sim.records if r.share.tenant == "victim"]
    theirs = [r for r in sim.records if r.share.tenant == "flooder"]
    ttft = sorted(r.ttft_s for r in mine if r.ttft_s is not None)
    return {
        "victim_requests": len(mine),
        "victim_completed": len(ttft),
        "victim_p50_s": percentile(ttft, 50),
        "victim_p90_s": percentile(ttft, 90),
        "victim_p99_s": percentile(ttft, 99),
        "victim_max_queue_s": max(r.queued_s for r in mine),
        "flooder_requests": len(theirs),
        "flooder_completed": sum(r.completed for r in theirs),
        "flooder_shed": sum(r.shed for r in theirs),
        "flooder_timed_out": sum(r.error_code == "queue_timeout" for r in theirs),
        "cpu_s": cpu,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--duration", type=float, default=15.0, help="seconds of traffic")
    ap.add_argument("--victim-every", type=float, default=0.1, help="victim's request interval")
    ap.add_argument("--flood-rps", type=float, default=200.0)
    ap.add_argument("--modes", default=",".join(MODES), help="comma-separated subset")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    git = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                         capture_output=True, text=True).stdout.strip()
    out: dict[str, Any] = {"git": git, "date": datetime.now(UTC).isoformat(timespec="minutes"),
                           "victim_every_s": args.victim_every, "flood_rps": args.flood_rps,
                           "duration_s": args.duration, "runs": {}}
    print(f"git {git}; victim every {args.victim_every:g} s, flooder {args.flood_rps:g} req/s, "
          f"{args.duration:g} s of traffic\n")
    print("| mode | victim P50 / P90 / P99 TTFT s alone | with the flood | P99 change | "
          "victim max queue s | flooder done / shed / timed out of | CPU s |")
    print("|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as d:
        for mode in args.modes.split(","):
            alone = run(mode, 0.0, args.victim_every, args.duration, Path(d))
            flood = run(mode, args.flood_rps, args.victim_every, args.duration, Path(d))
            change = flood["victim_p99_s"] / alone["victim_p99_s"] - 1.0
            out["runs"][mode] = {"alone": alone, "flood": flood, "p99_change": change}
            a, f = alone, flood
            print(f"| {mode} | {a['victim_p50_s']:.3f} / {a['victim_p90_s']:.3f} / "
                  f"{a['victim_p99_s']:.3f} | {f['victim_p50_s']:.3f} / {f['victim_p90_s']:.3f} / "
                  f"{f['victim_p99_s']:.3f} | {change:+.1%} | {f['victim_max_queue_s']:.3f} | "
                  f"{f['flooder_completed']} / {f['flooder_shed']} / {f['flooder_timed_out']} of "
                  f"{f['flooder_requests']} | {a['cpu_s'] + f['cpu_s']:.1f} |", flush=True)
    if args.json is not None:
        args.json.write_text(json.dumps(out, indent=1), "utf-8")


if __name__ == "__main__":
    main()
