"""How fast does `inferplane simulate` replay a trace? Prints a table; one core, no GPU.

    .venv/bin/python bench/sim_speed.py [--trace FILE] [--fleet FILE] [--limit N]
                                        [--rates 1,10] [--duration S]
                                        [--profile NAME ...] [--profile-cpu OUT.prof]

Default: the one-hour Mooncake conversation trace (12,031 requests, mean input ~12k tokens)
on ``examples/fleets/h100x8.yaml`` (or, while that file does not exist, an equivalent fleet of
eight H100 endpoints serving Llama-3.1-8B built here), with the ``round-robin`` and
``default`` profiles. Targets: under two minutes each at ×1; at least 30 simulated seconds per
second at every rate (``--rates``; the table gives them per wall second and per CPU second, and
the CPU seconds of a fixed reference loop before and after, since CPU time of the same work
grows with the contention of a shared machine). ``--profile-cpu`` writes a cProfile of the
first run.
"""

from __future__ import annotations

import argparse
import cProfile
import datetime as dt
import platform
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from inferplane.twin.simulator.simulator import run_simulation

ROOT = Path(__file__).resolve().parent.parent
TRACE = Path("/work/shared/traces/mooncake_conversation.jsonl")
if not TRACE.exists():
    TRACE = ROOT.parent / "shared" / "traces" / "mooncake_conversation.jsonl"
FLEET = ROOT / "examples" / "fleets" / "h100x8.yaml"

_FALLBACK = """\
# Eight H100 endpoints serving Llama-3.1-8B in one region (bench/sim_speed.py fallback fleet).
gateway: {token_estimate: words}
regions: [{name: us-east}]
substrates:
  - name: us-h100
    kind: gpu
    hardware: h100
    region: us-east
    jurisdiction: us
    cost: {hourly_usd: 3.5}
    endpoints:
"""


def fallback_fleet(directory: Path) -> Path:
    """Write the eight-H100 fleet used when ``examples/fleets/h100x8.yaml`` is missing."""
    eps = "".join(
        f"      - {{name: h100-{i}, url: 'http://127.0.0.1:{9100 + i}', "
        "models: [{name: llama-3.1-8b, max_context: 131072}], max_concurrency: 256}\n"
        for i in range(8)
    )
    path = directory / "h100x8.yaml"
    path.write_text(_FALLBACK + eps, "utf-8")
    return path


def reference_cpu_s() -> float:
    """CPU seconds of a fixed pure-Python loop: how fast this machine's cores ran."""
    c0 = time.process_time()
    s = 0
    for i in range(20_000_000):
        s += i
    return time.process_time() - c0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--trace", type=Path, default=TRACE)
    ap.add_argument("--fleet", type=Path, default=None)
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--rates", default="1", help="comma-separated rate scales")
    ap.add_argument("--duration", type=float, default=None, help="trace seconds replayed")
    ap.add_argument("--profile", action="append", default=None, dest="profiles")
    ap.add_argument("--profile-cpu", type=Path, default=None, help="write a cProfile here")
    args = ap.parse_args()
    profiles = args.profiles or ["round-robin", "default"]

    with tempfile.TemporaryDirectory() as tmp:
        fleet = args.fleet or (FLEET if FLEET.exists() else fallback_fleet(Path(tmp)))
        table = Table(
            title=f"sim_speed: {args.trace.name} on {fleet.name} — "
            f"{platform.processor() or platform.machine()}, Python {platform.python_version()}, "
            f"{dt.date.today().isoformat()}"
        )
        for col in (
            "profile",
            "rate",
            "requests",
            "completed",
            "simulated s",
            "wall s",
            "cpu s",
            "sim req/s",
            "sim s / wall s",
            "sim s / CPU s",
            "TTFT p50 ms",
            "prefix hit",
        ):
            table.add_column(col, justify="left" if col == "profile" else "right")
        ref = [reference_cpu_s()]
        runs = [(p, float(r)) for r in args.rates.split(",") for p in profiles]
        for i, (name, rate) in enumerate(runs):
            prof = cProfile.Profile() if (args.profile_cpu and i == 0) else None
            t0, c0 = time.perf_counter(), time.process_time()
            if prof is not None:
                prof.enable()
            r = run_simulation(
                fleet, args.trace, name, rate_scale=rate, limit=args.limit,
                duration_s=args.duration,
            )
            if prof is not None:
                prof.disable()
                prof.dump_stats(args.profile_cpu)
            wall, cpu = time.perf_counter() - t0, time.process_time() - c0
            ttft = r["ttft_s"]["p50"]
            hit = r["prefix_hit_rate"]
            table.add_row(
                name,
                f"x{rate:g}",
                str(r["requests"]),
                str(r["completed"]),
                f"{r['sim_duration_s']:.0f}",
                f"{wall:.1f}",
                f"{cpu:.1f}",
                f"{r['requests'] / wall:.0f}",
                f"{r['sim_duration_s'] / wall:.1f}",
                f"{r['sim_duration_s'] / cpu:.1f}",
                f"{ttft * 1000:.0f}" if ttft is not None else "-",
                f"{hit:.1%}" if hit is not None else "-",
            )
        ref.append(reference_cpu_s())
        Console(width=160).print(table)
        print(f"reference loop (20 M additions): {ref[0]:.2f} CPU s before, {ref[1]:.2f} after")


if __name__ == "__main__":
    main()
