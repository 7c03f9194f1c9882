"""closed_loop.py REPORT.json...: the fidelity workload (``physics.probe.run_workload``:
concurrency 1, 2, 4; 12 fresh prompts a level cycling 32 / 128 / 384 / 768 tokens, popped from
the end; 32 output tokens; closed-loop workers that send their next request as their stream
ends) on the emulator's engine and front end (``EmulatedEndpoint``'s ``Engine`` and
``FrontEnd``, the run's fitted profile, no speed spread) in virtual time: what the fitted model
says each request's TTFT is, with no event loop, no sleeps and no real HTTP.

``--rtt MS``: the emulator's own HTTP round trip (half on the way in, half on the way out),
taken out of the calibrated overhead as main does (``cut``: out of the wait before the
hand-off) or as the branch does (``after``: after the hand-off, as an earlier arrival at the
engine). With ``--rtt 0`` both are the fitted model itself (the simulator's timeline).

Prints per level the TTFT of each request in completion order (prompt tokens: ms), as
``by_position.py`` prints the measured ones. Run from a tree's root:
``PYTHONPATH=src:. python docs/benchmarks/calibration-s29/closed_loop.py REPORT.json``."""
from __future__ import annotations

import argparse
import heapq
import json
import random
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml

sys.path[:0] = ["src", "."]
from bench.calibration import PROFILE_NAME, emulator_fleet  # noqa: E402
from inferplane.config.loader import parse_config  # noqa: E402
from inferplane.fleet.model import Fleet  # noqa: E402
from inferplane.twin.emulator.endpoint import EmulatedEndpoint  # noqa: E402
from inferplane.twin.engine.model import EngineRequest  # noqa: E402

SIZES = (32, 128, 384, 768)


def _without_spread(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: _without_spread(v) for k, v in node.items()
                if k not in ("speed_spread", "speed_spread_window_s")}
    if isinstance(node, list):
        return [_without_spread(v) for v in node]
    return node


def run(profile_text: str, rtt_s: float = 0.0, mode: str = "after", levels=(1, 2, 4),
        n: int = 12, out_tokens: int = 32) -> dict[int, list[tuple[int, float]]]:
    with tempfile.TemporaryDirectory() as tmp:
        prof = Path(tmp) / "profile.yaml"
        # no speed spread (its mean is ~1): one timeline
        prof.write_text(yaml.safe_dump(_without_spread(yaml.safe_load(profile_text))))
        fleet = Fleet.from_config(parse_config(emulator_fleet(PROFILE_NAME, 1, prof)))
    rng = random.Random(1)
    res: dict[int, list[tuple[int, float]]] = {}
    for c in levels:
        ep = EmulatedEndpoint(fleet.endpoints[0])
        eng, fe, ovh = ep.engine, ep.frontend, ep.request_overhead_s
        events: list[tuple[float, int, str, Any]] = []
        seq = 0

        def push(t: float, kind: str, arg: Any) -> None:
            nonlocal seq
            seq += 1
            heapq.heappush(events, (t, seq, kind, arg))

        todo = [SIZES[i % len(SIZES)] for i in range(n)]
        sent: dict[str, tuple[float, int, float]] = {}  # id: (client send, size, cut)
        seen: set[str] = set()
        ttft: list[tuple[int, float]] = []
        running = False
        last_end = float("-inf")  # the engine's last step end: a step never starts before it

        def send(t: float) -> None:
            """A worker sends its next request at ``t`` (client time): its handler gets it
            half a round trip later."""
            if todo:
                rid = f"r{len(sent)}"
                sent[rid] = (t, todo.pop(), 0.0)
                push(t + rtt_s / 2, "arrive", rid)

        def arrive(t: float, rid: str) -> None:
            cut = min(rtt_s, ovh)
            shift = min(rtt_s - cut, fe.request_s + fe.handoff_s)
            taken = fe.intake(t - shift + 1.0) - 1.0  # +1 s: the front end's clock starts at 0
            if mode == "cut":  # main: the round trip out of the wait before the hand-off
                push(max(taken + ovh - cut, t), "handoff", rid)
            else:  # the branch: the wait whole, the round trip out after the hand-off
                sent[rid] = (*sent[rid][:2], cut)
                push(max(taken + ovh, t), "handoff", rid)

        for _ in range(c):
            send(0.0)
        while events:
            t, _, kind, arg = heapq.heappop(events)
            if kind == "arrive":
                arrive(t, arg)
            elif kind == "handoff":
                push(fe.handoff(t + 1.0) - 1.0, "add", arg)
            elif kind == "add":
                at = t - sent[arg][2]
                prompt = [rng.randrange(1000, 30000) for _ in range(sent[arg][1])]
                eng.add_request(EngineRequest(arg, prompt, out_tokens, arrival_time=at), at)
                if not running:
                    running = True
                    push(max(at, last_end), "step", None)
            elif kind == "step":
                if not eng.has_unfinished():
                    running = False
                    continue
                out = eng.step(t)
                push(t + out.duration_s, "end", out)
            elif kind == "end":
                last_end = t
                done = fe.emit(t + 1.0, len(arg.new_tokens)) - 1.0
                push(done, "deliver", (list(arg.new_tokens), list(arg.finished)))
                push(t, "step", None)
            elif kind == "deliver":
                tokens, finished = arg
                for rid in tokens:
                    if rid not in seen:
                        seen.add(rid)
                        ttft.append((sent[rid][1], (t + rtt_s / 2 - sent[rid][0]) * 1e3))
                for _ in finished:
                    send(t + rtt_s / 2)
        res[c] = ttft
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("reports", nargs="+")
    ap.add_argument("--rtt", type=float, default=0.0, help="emulator round trip, ms")
    ap.add_argument("--mode", choices=("cut", "after"), default="after")
    a = ap.parse_args()
    for f in a.reports:
        r = json.loads(Path(f).read_text())
        print(f, f"rtt {a.rtt} ms, {a.mode}")
        for c, xs in run(r["calibration_profile"], a.rtt / 1e3, a.mode).items():
            print(f" c{c} " + " ".join(f"{n}:{v:.1f}" for n, v in xs))


if __name__ == "__main__":
    main()
