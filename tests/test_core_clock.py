"""The core runs on the clocks it is given: the simulator drives it on virtual time."""

from __future__ import annotations

from pathlib import Path

from inferplane.admission.state import MemoryStore
from inferplane.config.loader import load_config
from inferplane.core.plane import Core

FLEET = Path(__file__).resolve().parents[1] / "examples" / "fleets" / "h100x8.yaml"


def test_core_reads_the_injected_clocks() -> None:
    wall, mono = [1_000_000.0], [5.0]
    core = Core(
        load_config(FLEET),
        admission_store=MemoryStore(),
        clock=lambda: wall[0],
        monotonic=lambda: mono[0],
    )
    assert core.live.clock() == 5.0
    assert core.admission.clock() == 1_000_000.0
    assert core.admission.queue.clock() == 5.0
    mono[0] = 42.0
    snap = core.live.snapshot()
    assert snap.now == 42.0
