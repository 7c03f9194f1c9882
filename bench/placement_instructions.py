"""Instructions per placement decision, counted by callgrind: a comparison that holds on a
noisy shared machine, where CPU time moves with the load.

    .venv/bin/python bench/placement_instructions.py [--fleet h100x16 ...] [--profile default ...]
                                                      [-n 300] [--reference] [--keep DIR]

For each fleet and profile it starts ``valgrind --tool=callgrind`` on itself (``--child``): the
`bench.placement_speed` scenario (a live fleet under load, the fleet file's request mix, the
prefix indexes and latency corrections warmed up), then ``n`` consecutive ``place()`` calls on
the fixed snapshot, with the gateway's timer, driven by ``itertools.starmap`` so that callgrind
counts only them (``--toggle-collect=starmap_next``). It prints the instructions per decision
(callgrind's total ÷ n). ``--reference`` adds the fused profiles scored and filtered one plugin
at a time (``/ref``). ``--keep DIR`` keeps the callgrind files for ``callgrind_annotate``.
``--floor`` counts the evidence floor: only the per-candidate
objects a decision keeps (annotation and score dicts, `Scored`, `CandidateRecord`), values given.
``--parts`` also counts the filters, the scorers, the picker and the pick observers of the same
decisions each on its own (the parts before each run uncounted on fresh cycles); the rest of
``place()`` is the framework's loop and the evidence (candidate records, the decision).
``--churn`` also counts decisions in the gateway's pattern: a new snapshot per decision and a
reservation on each pick (``/churn``: the snapshot, ``place()`` and the reservation counted).
``--encode`` also counts ``place()`` followed by what the gateway does with the decision on
every request: its reads of the pick's record (`Decision.candidate`, three for a streamed
request, four for one that is not: ``_gateway_reads``) and the ledger's encoding of the record
(`encode_entry`): ``/encode``, so that evidence built later rather than in ``place()`` shows
where it is paid.

Counts are deterministic for a given code and Python build (±0.1 % between runs from hash
seeds and allocator state), whatever else the machine runs; they are not time: a dict lookup
and a float multiply both count by their instructions, not their cache misses. Run the old and
the new code with the same interpreter (``PYTHONPATH=OLD/src`` selects another checkout).
"""

from __future__ import annotations

import argparse
import itertools
import os
import re
import subprocess
import sys
import tempfile
import time
from collections import deque
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from placement_speed import Scenario

from inferplane.fleet.state import EndpointView, FleetSnapshot
from inferplane.ledger.record import Outcome, encode_entry
from inferplane.placement.framework import (
    CandidateRecord,
    CycleState,
    Decision,
    Policy,
    Scored,
    place,
)
from inferplane.placement.profile import RequestProfile

PARTS = ("place", "filters", "score", "pick", "observe")
OUTCOME = Outcome(status=200, endpoint="e", ttft_s=0.2, itl_s=0.02, e2e_s=3.0, prompt_tokens=900,
                  completion_tokens=150, cost_usd=1e-4)


def _floor(cands: list[EndpointView], names: tuple[str, ...], x: float) -> object:
    """The evidence one decision must build, and nothing else: per candidate an annotation
    dict of the 11 keys predicted-latency, prefix-affinity, cost and locality write, a score
    dict of the 7 scorers, the `Scored` the picker reads and the `CandidateRecord` the
    decision keeps (values already computed: no arithmetic, no lookups)."""
    n1, n2, n3, n4, n5, n6, n7 = names
    out = []
    for c in cands:
        ann = {"ttft_s": x, "ttft_raw_s": x, "itl_s": x, "itl_raw_s": x, "queue_s": x,
               "uncached_tokens": x, "meets_slo": x, "prefix_match": x, "cost_usd": x,
               "rtt_s": x, "egress_usd": x}
        sd = {n1: x, n2: x, n3: x, n4: x, n5: x, n6: x, n7: x}
        out.append(Scored(c, x, sd))
        out.append(CandidateRecord(c.name, c.name, None, None, sd, x, ann))
    return out


def _gateway_reads(d: Decision) -> None:
    """What the gateway reads of a decision's pick per request (`core.plane`), one
    `Decision.candidate` call each: its ``uncached_tokens`` when it reserves, its ``ttft_s``
    and ``itl_s`` for the first-byte timeout, its ``ttft_raw_s`` with the outcome; a
    non-streamed request also its ``ttft_s`` for when its prefill stops counting."""
    picked = d.picked
    if picked is None:
        return
    name = picked.name
    d.candidate(name).annotations.get("uncached_tokens")
    a = d.candidate(name).annotations
    a.get("ttft_s")
    a.get("itl_s")
    if not d.profile.stream:
        d.candidate(name).annotations.get("ttft_s")
    d.candidate(name).annotations.get("ttft_raw_s")


def _filters(pol: Policy, cycle: CycleState, cands: list[EndpointView]) -> list[EndpointView]:
    """The policy's filters as `place` runs them (the fused pass where there is one)."""
    fused = getattr(pol, "fused_filters", None)
    if fused is not None:
        kept: list[EndpointView] = fused(cycle, cands)[0]
        return kept
    for f in pol.filters:
        if not cands:
            break
        cands = f.filter(cycle, cands).kept
    return cands


def _score(pol: Policy, cycle: CycleState, cands: list[EndpointView]) -> list[Scored]:
    """The policy's scorers (the fused pass where there is one; else the reference path's
    per-scorer calls, without its clamping and summing)."""
    if pol.fused is not None:
        return pol.fused(cycle, cands)
    for s, _ in pol.scorers:
        s.score(cycle, cands)
    return [Scored(c, 0.0, {}) for c in cands]


def child(fleet: str, profile: str, n: int, reference: bool, part: str) -> None:
    """Run under callgrind: warm up, then ``n`` decisions (or one part of each: ``part``)
    inside ``starmap`` (counted)."""
    sc = Scenario(fleet)
    sc.load()
    snap = sc.live.snapshot()
    reqs = [sc.profile(s) for s in sc.shares for _ in range(4)]
    pol = sc.policies[profile]
    if reference:
        pol.fused = None
        if hasattr(pol, "fused_filters"):  # (absent before the fused filter pass)
            pol.fused_filters = None
    timer = time.perf_counter
    for prof in reqs:  # the prefix indexes learn these prompts, the EWMA fills
        place(prof, snap, pol, decision_id=prof.request_id, timer=timer)
    m = len(reqs)
    if part == "place":
        args: list[tuple[object, ...]] = [(reqs[i % m], snap, pol) for i in range(n)]

        def one(prof: RequestProfile, snap: FleetSnapshot, pol: Policy) -> object:
            return place(prof, snap, pol, decision_id="d", timer=timer)

        deque(itertools.starmap(one, args), maxlen=0)
        return
    if part == "encode":
        args = [(reqs[i % m], snap, pol) for i in range(n)]

        def placed_and_encoded(prof: RequestProfile, snap: FleetSnapshot, pol: Policy) -> object:
            d = place(prof, snap, pol, decision_id="d", timer=timer)
            _gateway_reads(d)
            return encode_entry(d, OUTCOME, 1.0)

        deque(itertools.starmap(placed_and_encoded, args), maxlen=0)
        return
    if part == "churn":
        # the gateway's pattern (`placement_speed --churn`): a new snapshot per decision,
        # reserving on each pick (the oldest of 40 reservations released), 1 ms a decision;
        # counted: the snapshot, place() and the reservation
        live = sc.live
        held: deque[object] = deque()

        def churned(prof: RequestProfile) -> object:
            d = place(prof, live.snapshot(), pol, decision_id="d", timer=timer)
            if d.picked is not None:
                held.append(live.reserve(d.picked.name, prof.prompt_tokens
                                         + prof.max_output_tokens, prof.prompt_tokens))
                if len(held) > 40:
                    held.popleft().release()  # type: ignore[attr-defined]
            sc.clock.t += 0.001
            return d

        deque(itertools.starmap(churned, [(reqs[i % m],) for i in range(n)]), maxlen=0)
        return
    if part == "floor":
        names = tuple(f"scorer-{i}" for i in range(7))
        eps = list(snap.endpoints)
        deque(itertools.starmap(_floor, [(eps, names, 0.5 + i) for i in range(n)]), maxlen=0)
        return
    # one part of each decision: the parts before it run uncounted, on fresh cycles
    cycles = [CycleState(profile=reqs[i % m], snapshot=snap, rng=pol.rng) for i in range(n)]
    if part == "filters":
        deque(itertools.starmap(_filters, [(pol, c, list(snap.endpoints)) for c in cycles]),
              maxlen=0)
        return
    kept = [_filters(pol, c, list(snap.endpoints)) for c in cycles]
    if part == "score":
        deque(itertools.starmap(_score, [(pol, c, k) for c, k in zip(cycles, kept, strict=True)]),
              maxlen=0)
        return
    scored = [_score(pol, c, k) for c, k in zip(cycles, kept, strict=True)]
    if part == "pick":
        deque(itertools.starmap(pol.picker.pick, zip(cycles, scored, strict=True)), maxlen=0)
        return
    picks = [pol.picker.pick(c, s).view for c, s in zip(cycles, scored, strict=True)]
    observers = pol.observers

    def observe(cycle: CycleState, view: EndpointView) -> None:
        for o in observers:
            o.on_picked(cycle, view)

    deque(itertools.starmap(observe, zip(cycles, picks, strict=True)), maxlen=0)


def count(fleet: str, profile: str, n: int, reference: bool, keep: str | None,
          part: str = "place") -> float:
    out_dir = keep or tempfile.mkdtemp(prefix="placement-ir-")
    os.makedirs(out_dir, exist_ok=True)
    tag = f"{fleet}-{profile}{'-ref' if reference else ''}-{part}"
    out = os.path.join(out_dir, f"callgrind.{tag}.out")
    cmd = [
        "valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", "--collect-atstart=no",
        "--toggle-collect=starmap_next", sys.executable, __file__, "--child",
        "--fleet", fleet, "--profile", profile, "-n", str(n), "--part", part,
    ]
    if reference:
        cmd.append("--reference")
    run = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if run.returncode != 0:
        raise SystemExit(f"callgrind run failed ({run.returncode}):\n{run.stderr[-3000:]}")
    text = Path(out).read_text()
    m = re.search(r"^summary:\s+(\d+)", text, re.M) or re.search(r"^totals:\s+(\d+)", text, re.M)
    if m is None:
        raise SystemExit(f"no instruction total in {out}")
    if keep is None:
        os.unlink(out)
    return int(m.group(1)) / n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--fleet", nargs="+", default=["h100x16"])
    ap.add_argument("--profile", nargs="+", default=["default"])
    ap.add_argument("-n", type=int, default=300, help="decisions counted")
    ap.add_argument("--reference", action="store_true",
                    help="also count the fused profiles on the reference path (/ref)")
    ap.add_argument("--keep", metavar="DIR", help="keep the callgrind output files here")
    ap.add_argument("--parts", action="store_true",
                    help="also count each part of a decision on its own: the filters, the "
                    "scorers, the picker, the pick observers (each after the parts before it, "
                    "uncounted); what place() costs beyond them is the framework's loop and "
                    "the evidence (records, decision)")
    ap.add_argument("--floor", action="store_true",
                    help="also count the evidence floor: per candidate only the annotation and "
                    "score dicts, the Scored and the CandidateRecord a decision keeps, with "
                    "values given (no arithmetic, no lookups)")
    ap.add_argument("--encode", action="store_true",
                    help="also count place() followed by the gateway's reads of the pick's record "
                    "(Decision.candidate) and the ledger's encoding of the record "
                    "(encode_entry), as the gateway does for every request (/encode)")
    ap.add_argument("--churn", action="store_true",
                    help="also count decisions in the gateway's pattern (/churn): a new "
                    "snapshot per decision and a reservation on each pick, as "
                    "placement_speed.py --churn times them; counted: LiveFleet.snapshot(), "
                    "place() and the reservation")
    ap.add_argument("--part", default="place", choices=(*PARTS, "floor", "encode", "churn"),
                    help=argparse.SUPPRESS)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        child(a.fleet[0], a.profile[0], a.n, a.reference, a.part)
        return
    import inferplane

    print(f"# instructions per place() (callgrind), {a.n} decisions; inferplane from "
          f"{Path(inferplane.__file__).parent}")
    print(f"{'fleet':10} {'profile':14} {'instr/decision':>15}")
    for fleet in a.fleet:
        for profile in a.profile:
            variants = [(profile, False)] + ([(f"{profile}/ref", True)] if a.reference else [])
            for name, ref in variants:
                total = count(fleet, profile, a.n, ref, a.keep)
                print(f"{fleet:10} {name:14} {total:15,.0f}", flush=True)
                if a.churn:
                    got = count(fleet, profile, a.n, ref, a.keep, "churn")
                    print(f"{fleet:10} {name + '/churn':14} {got:15,.0f}", flush=True)
                if a.encode:
                    got = count(fleet, profile, a.n, ref, a.keep, "encode")
                    print(f"{fleet:10} {name + '/encode':14} {got:15,.0f}", flush=True)
                if not a.parts:
                    continue
                rest = total
                for part in PARTS[1:]:
                    got = count(fleet, profile, a.n, ref, a.keep, part)
                    rest -= got
                    print(f"{'':10} {'  ' + part:14} {got:15,.0f} {got / total:6.1%}", flush=True)
                print(f"{'':10} {'  the rest':14} {rest:15,.0f} {rest / total:6.1%}", flush=True)
            if a.floor:
                got = count(fleet, profile, a.n, False, a.keep, "floor")
                print(f"{fleet:10} {'evidence floor':14} {got:15,.0f}", flush=True)


if __name__ == "__main__":
    main()
