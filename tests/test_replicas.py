"""Two gateway replicas sharing one Redis (issue 14 item 4), as real processes on loopback:
100 clients per replica against three emulated engines with ``max_concurrency: 2``. No engine
ever runs more than 2 requests (sampled from its /metrics every 10 ms); replica A is killed with
-9 under load and replica B's clients see 0 failures, while A's slots leave Redis within their
lease. The scenario is `bench/replicas.py`'s."""

from __future__ import annotations

import asyncio
from pathlib import Path

from bench.replicas import run_scenario

LEASE_S = 5.0
"""Renewals run every lease / 3. With 1.5 s, a replica whose event loop stalled past 1 s let its
slots lapse in 2 of 10 runs with 3 CPU burners beside the suite (load 10-25; each logged "slot(s)
held here had lapsed"): the other replica could then take them while their requests still ran,
which is the engine over its limit this test once saw. With 3 s (2 s of stall), CI on a fresh
clone of session 22's main, on a host running the engines ~4x slower than session 21's, saw
Redis hold 3 slots of an endpoint limited to 2 (`slots_max`; the engines' own count stayed at 2):
the only way there is a renewal re-adding a slot that had lapsed. 5 s leaves 3.3 s of stall."""


def test_two_replicas_hold_max_concurrency_and_survive_a_kill_9(tmp_path: Path) -> None:
    res = asyncio.run(run_scenario(
        tmp_path, clients=100, duration_s=4.0, kill_at_s=2.0, lease_s=LEASE_S,
    ))
    assert res.errors == [], res
    assert res.samples > 20, res
    assert max(res.engine_max.values()) <= 2, res.engine_max
    assert max(res.slots_max.values()) <= 2, res.slots_max
    assert res.failed["B"] == 0 and res.ok["B"] > 0 and res.ok_after_kill["B"] > 0, res
    assert res.ok["A"] > 0, res  # both replicas served before the kill
    assert res.killed_slots > 0, res  # A held slots when it died ...
    # ... and lost them within the lease (+ a sync period, + polling on a loaded machine)
    assert res.release_s is not None and res.release_s <= LEASE_S + 1.5, res
    assert res.slots_left_at_end == 0, res
