"""How much CPU does one placement decision cost? An in-process microbenchmark of ``place()``.

    .venv/bin/python bench/placement_speed.py [--fleet h100x8 hetero h100x1000 ...]
                                              [--profile default ...] [-n 2000] [--repeats 7]
                                              [--no-timer] [--whole] [--reference]
                                              [--churn]
    .venv/bin/python bench/placement_speed.py --dump FILE   # behaviour fingerprint, no timing

``h100xN`` (N not 8) is h100x8 grown to N identical endpoints in pools of 64 (`scaled_config`).
Profiles with ``max_candidates`` sample fleets larger than that; ``--whole`` adds rows (``/all``)
for the same policies evaluating every endpoint, in the same run. ``--reference`` adds rows
(``/ref``) for the profiles scored and filtered in one fused pass (`inferplane.placement.fused`,
`inferplane.placement.fused_filters`: ``default``) run one plugin at a time instead, the same
decisions by the reference path. ``--churn`` adds
rows (``/churn``) in the gateway's pattern instead of a fixed snapshot: each decision reserves
on its pick (and the oldest of 40 reservations is released), so every decision gets a new
snapshot in which one or two endpoints' states changed, and the clock advances 1 ms a decision
(1,000 decisions/s: every endpoint's state is rebuilt each 50 decisions, `LiveFleet.refresh_s`);
only the ``place()`` calls are timed (what per-endpoint caches keyed on an unchanged state
save shows here as it would in the gateway, not as on a fixed snapshot).

Builds the gateway's policies from a shipped fleet file (``src/inferplane/data/fleets/``, via
``load_config`` + ``build_policies``), a `LiveFleet` with fresh engine metrics, in-flight
reservations, observed TTFTs/ITLs and (hetero: its ``kv_events`` endpoints) a precise prefix
index, and one `RequestProfile` per traffic-mix share of the fleet file (prompt block hashes
from a shared system prompt + a per-request tail, session ids, the class's SLOs and client
region — what the simulator builds). After a warm-up (which fills the prefix indexes and the
latency plugin's EWMA as traffic would), it times ``n`` consecutive ``place()`` calls per
policy, cycling through the profiles, exactly as the gateway calls it (``timer=perf_counter``;
``--no-timer`` as the simulator does), and prints the best-of-``repeats`` CPU µs per decision
(``time.process_time``: other processes on a shared machine inflate it less than wall time) and
the median. The snapshot is fixed during timing: the snapshot factory is not part of ``place()``.

``--dump FILE`` instead replays a deterministic sequence of decisions over every profile of
both fleets — varied loads, stale metrics, unhealthy and ejected endpoints, batch priorities
that saturate, excluded endpoints, no client region, no SLO, energy-aware requests — reserving
and releasing as the gateway does, and writes every decision's evidence (pick, candidates'
scores and annotations with their key order, removed_by, predicted envelope, spillover,
notes) with exact float reprs. Two dumps from two versions of the code must be identical.

Run it under ``nice -n 19`` on a shared machine; numbers are for one core.
"""

from __future__ import annotations

import argparse
import platform
import random
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from inferplane.config.loader import load_config, parse_config
from inferplane.config.schema import FleetConfig
from inferplane.fleet.engine_metrics import EngineMetrics
from inferplane.fleet.live import LiveFleet, Reservation
from inferplane.fleet.model import Fleet
from inferplane.fleet.prefix_index import PrefixIndex
from inferplane.placement.build import build_policies
from inferplane.placement.framework import Decision, Policy, place
from inferplane.placement.hashing import prompt_block_hashes
from inferplane.placement.profile import RequestProfile
from inferplane.twin.simulator.mix import TrafficShare, resolve_mix

ROOT = Path(__file__).resolve().parent.parent
FLEETS = ROOT / "src" / "inferplane" / "data" / "fleets"
BLOCK_CHARS = 256

_WORDS = ["the", "of", "and", "to", "in", "is", "for", "on", "that", "with", "as", "by", "at",
          "from", "this", "be", "are", "or", "an", "it"]


def _text(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(_WORDS) + str(rng.randrange(1000)) for _ in range(words))


class _Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def scaled_config(n: int) -> FleetConfig:
    """``h100xN``: the h100x8 fleet grown to ``n`` identical endpoints in one region, in pools
    (substrates) of at most 64 — the homogeneous worst case for a per-endpoint scan."""
    raw = yaml.safe_load((FLEETS / "h100x8.yaml").read_text("utf-8"))
    sub = raw["substrates"][0]
    proto = sub["endpoints"][0]
    subs = []
    for k in range((n + 63) // 64):
        eps = []
        for i in range(k * 64, min(n, (k + 1) * 64)):
            eps.append({**proto, "name": f"h100-{i}", "url": f"http://127.0.0.1:{20000 + i}"})
        subs.append({**sub, "name": f"us-east-h100-{k}", "failure_domain": f"us-east-1a/rack-{k}",
                     "endpoints": eps})
    raw["substrates"] = subs
    return parse_config(yaml.safe_dump(raw), f"h100x{n}")


class Scenario:
    """A fleet file's policies, a live fleet with load on it, and the mix's request profiles."""

    def __init__(self, fleet_name: str, seed: int = 0) -> None:
        path = FLEETS / f"{fleet_name}.yaml"
        self.name = fleet_name
        scaled = re.fullmatch(r"h100x(\d+)", fleet_name)
        if scaled and not path.exists():
            self.config: FleetConfig = scaled_config(int(scaled.group(1)))
        else:
            self.config = load_config(path)
        self.fleet = Fleet.from_config(self.config)
        self.policies: dict[str, Policy] = build_policies(self.config, str(path))
        self.rng = random.Random(seed)
        self.clock = _Clock()
        self.precise: PrefixIndex | None = None
        if any(e.spec.kv_events for e in self.fleet.endpoints):
            self.precise = PrefixIndex(0)
        self.live = LiveFleet(self.fleet, clock=self.clock, prefix_index=self.precise)
        self.shares: list[TrafficShare] = resolve_mix(self.config)
        self.reservations: list[Reservation] = []
        self.system_prompts = [_text(self.rng, 300) for _ in range(3)]
        self._n = 0

    # -- load --------------------------------------------------------------------------------
    def scrape(self, stale: bool = False) -> None:
        rng = self.rng
        for e in self.fleet.endpoints:
            if e.spec.engine == "openai-compatible":
                continue  # provider APIs publish no metrics
            self.live.update_metrics(
                e.name,
                EngineMetrics(
                    running=float(rng.randrange(0, 48)),
                    waiting=float(rng.choice([0, 0, 0, 1, 3, 8])),
                    kv_usage=rng.random() * 0.9,
                    block_size=16,
                    num_gpu_blocks=28000,
                ),
            )
        if stale:
            self.clock.t += 10.0  # older than stale_after_s

    def observe(self) -> None:
        rng = self.rng
        for e in self.fleet.endpoints:
            for _ in range(rng.randrange(0, 6)):
                predicted = 0.1 + rng.random()
                self.live.observe_ttft(e.name, predicted * (0.7 + rng.random()), predicted)
                self.live.observe_itl(e.name, 0.01 + 0.02 * rng.random())

    def reserve(self, endpoint: str, prof: RequestProfile, uncached: float | None) -> None:
        prefill = prof.prompt_tokens if uncached is None else int(uncached)
        self.reservations.append(
            self.live.reserve(endpoint, prof.prompt_tokens + prof.max_output_tokens, prefill)
        )

    def churn(self) -> None:
        """Some in-flight requests get their first token, some finish."""
        rng = self.rng
        keep: list[Reservation] = []
        for r in self.reservations:
            x = rng.random()
            if x < 0.15:
                r.release()
            else:
                if x < 0.5:
                    r.first_token()
                keep.append(r)
        self.reservations = keep

    # -- requests ------------------------------------------------------------------------------
    def profile(self, share: TrafficShare, **over: Any) -> RequestProfile:
        rng = self.rng
        self._n += 1
        cls = share.workload_class
        text = rng.choice(self.system_prompts) + " " + _text(rng, rng.randrange(20, 1500))
        prompt = len(text.split())
        hashes = prompt_block_hashes(share.model, text, BLOCK_CHARS)
        out = 0 if share.api == "embeddings" else rng.randrange(50, 800)
        base: dict[str, Any] = dict(
            request_id=f"r{self._n}",
            tenant=share.tenant,
            model=share.model,
            api=share.api,
            workload_class=cls.name,
            priority=cls.priority,
            prompt_tokens=prompt,
            max_output_tokens=out,
            block_hashes=hashes,
            engine_block_hashes=hashes if self.precise is not None else (),
            session_id=f"s{rng.randrange(20)}" if rng.random() < 0.5 else None,
            ttft_slo_s=None if cls.ttft_slo_ms is None else cls.ttft_slo_ms / 1000.0,
            itl_slo_s=None if cls.itl_slo_ms is None else cls.itl_slo_ms / 1000.0,
            allowed_jurisdictions=share.allowed_jurisdictions,
            allowed_kinds=frozenset(cls.allowed_kinds) if cls.allowed_kinds else None,
            allow_burst=cls.allow_burst,
            energy_aware=cls.energy_aware,
            client_region=share.region,
            stream=True,
        )
        base.update(over)
        return RequestProfile(**base)

    def learn_precise(self, decision: Decision) -> None:
        """Engines with KV events announce the blocks of what they were sent."""
        if self.precise is None or decision.picked is None:
            return
        if decision.picked.endpoint.spec.kv_events:
            self.precise.block_stored(decision.picked.name, decision.profile.engine_block_hashes)

    def load(self, n: int = 40) -> None:
        """Put ``n`` requests in flight through the default policy (as traffic would)."""
        self.scrape()
        self.observe()
        pol = self.policies[self.config.gateway.default_profile]
        for i in range(n):
            prof = self.profile(self.shares[i % len(self.shares)])
            d = place(prof, self.live.snapshot(), pol, decision_id=prof.request_id)
            self.learn_precise(d)
            if d.picked is not None:
                self.reserve(d.picked.name, prof, d.candidate(d.picked.name).annotations.get(
                    "uncached_tokens"))
            self.clock.t += 0.02
        self.churn()
        self.clock.t += 0.1


def _churn_run(sc: Scenario, pol: Policy, reqs: list[RequestProfile], n: int,
               timer: Callable[[], float] | None) -> float:
    """CPU µs per ``place()`` when every decision reserves on its pick (``--churn``)."""
    clock = time.process_time
    live = sc.live
    held: list[Reservation] = []
    m = len(reqs)
    spent = 0.0
    for i in range(n):
        prof = reqs[i % m]
        snap = live.snapshot()
        t0 = clock()
        d = place(prof, snap, pol, decision_id=prof.request_id, timer=timer)
        spent += clock() - t0
        if d.picked is not None:
            held.append(live.reserve(d.picked.name, prof.prompt_tokens + prof.max_output_tokens,
                                     prof.prompt_tokens))
            if len(held) > 40:
                held.pop(0).release()
        sc.clock.t += 0.001
    for r in held:
        r.release()
    return spent / n * 1e6


def bench(
    fleets: list[str], profiles: list[str], n: int, repeats: int, timer: Callable[[], float] | None,
    whole: bool = False, reference: bool = False, churn: bool = False,
) -> None:
    print(f"# place() CPU µs/decision, best of {repeats} × {n} decisions; python "
          f"{platform.python_version()}, {platform.machine()}; timer={'on' if timer else 'off'}")
    print(f"{'fleet':10} {'profile':14} {'endpoints':>9} {'µs/decision':>12} {'median':>8}")
    for fleet_name in fleets:
        sc = Scenario(fleet_name)
        sc.load()
        snap = sc.live.snapshot()
        reqs = [sc.profile(s) for s in sc.shares for _ in range(4)]
        variants = [(p, sc.policies[p], sc.policies[p].max_candidates, sc.policies[p].fused,
                     getattr(sc.policies[p], "fused_filters", None)) for p in profiles]
        if whole:  # the same policies evaluating every endpoint (no sampling), side by side
            variants += [(f"{p}/all", pol, 0, fused, ff) for p, pol, limit, fused, ff in variants
                         if limit and len(snap.endpoints) > limit]
        if reference:  # the same policies scored (and filtered) one plugin at a time
            variants += [(f"{p}/ref", pol, limit, None, None)
                         for p, pol, limit, fused, ff in variants
                         if fused is not None or ff is not None]
        if churn:  # the gateway's pattern: a new snapshot per decision (after the fixed rows)
            variants += [(f"{p}/churn", pol, limit, fused, ff)
                         for p, pol, limit, fused, ff in variants]
        for pname, pol, limit, fused, ff in variants:
            pol.max_candidates = limit
            pol.fused = fused
            if hasattr(pol, "fused_filters"):  # (absent before the fused filter pass)
                pol.fused_filters = ff
            for prof in reqs:  # warm-up: the prefix indexes learn these prompts, EWMA fills
                place(prof, snap, pol, decision_id=prof.request_id, timer=timer)
            m = len(reqs)
            runs: list[float] = []
            for _ in range(repeats):
                if pname.endswith("/churn"):
                    runs.append(_churn_run(sc, pol, reqs, n, timer))
                    continue
                t0 = time.process_time()  # CPU time: robust to other load on a shared machine
                for i in range(n):
                    prof = reqs[i % m]
                    place(prof, snap, pol, decision_id=prof.request_id, timer=timer)
                runs.append((time.process_time() - t0) / n * 1e6)
            runs.sort()
            print(f"{fleet_name:10} {pname:14} {len(snap.endpoints):9d} {runs[0]:12.1f} "
                  f"{runs[len(runs) // 2]:8.1f}")


# -- behaviour fingerprint -----------------------------------------------------------------------
def _fmt(d: Decision) -> str:
    lines = [
        f"D {d.decision_id} {d.policy} picked={d.endpoint} removed={d.removed_by!r} "
        f"predicted={d.predicted!r} notes={d.notes!r} spill={d.spillover!r} v={d.snapshot_version}"
    ]
    for c in d.candidates:
        lines.append(
            f"  {c.endpoint} {c.substrate} {c.rejected_by} {c.reason!r} total={c.total!r} "
            f"scores={list(c.scores.items())!r} ann={list(c.annotations.items())!r}"
        )
    return "\n".join(lines)


def dump(path: str, steps: int) -> None:
    out: list[str] = []
    for fleet_name in ("h100x8", "hetero"):
        sc = Scenario(fleet_name, seed=1)
        sc.load(20)
        rng = sc.rng
        names = [e.name for e in sc.fleet.endpoints]
        for _ in range(steps):
            r = rng.random()
            if r < 0.05:
                sc.scrape(stale=rng.random() < 0.3)
            elif r < 0.08:
                sc.observe()
            elif r < 0.10:
                sc.live.set_health(rng.choice(names), rng.random() < 0.5)
            elif r < 0.12:
                sc.live.set_ejected(rng.choice(names), rng.random() < 0.5, "bench")
            elif r < 0.16:  # a surge on one region: its endpoints miss SLOs, saturate, spill
                region = rng.choice(sc.fleet.endpoints).region
                for e in sc.fleet.endpoints:
                    if e.region == region:
                        for _ in range(rng.randrange(20, 140)):
                            sc.reservations.append(
                                sc.live.reserve(e.name, 20000, rng.randrange(0, 8000)))
            if rng.random() < 0.2:
                sc.churn()
            share = rng.choice(sc.shares)
            over: dict[str, Any] = {}
            x = rng.random()
            if x < 0.08:
                over["client_region"] = None
            elif x < 0.14:
                over["ttft_slo_s"] = None
                over["itl_slo_s"] = None
            elif x < 0.18:
                over["energy_aware"] = True
            elif x < 0.24:
                over["priority"] = "batch"
            elif x < 0.28:
                over["excluded"] = frozenset(rng.sample(names, 2))
            elif x < 0.31:
                over["block_hashes"] = ()
                over["engine_block_hashes"] = ()
            elif x < 0.34:
                over["data_region"] = rng.choice([r.name for r in sc.config.regions])
            prof = sc.profile(share, **over)
            for pname, pol in sc.policies.items():
                d = place(prof, sc.live.snapshot(), pol, decision_id=f"{prof.request_id}:{pname}")
                out.append(_fmt(d))
                if pname == sc.config.gateway.default_profile:
                    sc.learn_precise(d)
                    if d.picked is not None:
                        sc.reserve(d.picked.name, prof, d.candidate(d.picked.name).annotations
                                   .get("uncached_tokens"))
            sc.clock.t += rng.random() * 0.1
    Path(path).write_text("\n".join(out) + "\n")
    print(f"wrote {len(out)} decisions to {path}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--fleet", nargs="+", default=["h100x8", "hetero"])
    ap.add_argument("--profile", nargs="+", default=["default", "round-robin"])
    ap.add_argument("-n", type=int, default=2000, help="decisions per timed run")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--no-timer", action="store_true", help="no per-plugin timings (simulator)")
    ap.add_argument("--whole", action="store_true",
                    help="also time each sampled profile evaluating every endpoint (/all)")
    ap.add_argument("--reference", action="store_true",
                    help="also time each fused profile on the reference path, one scorer at a "
                    "time (/ref)")
    ap.add_argument("--churn", action="store_true",
                    help="also time each profile with a new snapshot per decision, reserving on "
                    "its pick, as the gateway does (/churn)")
    ap.add_argument("--dump", metavar="FILE", help="write the behaviour fingerprint instead")
    ap.add_argument("--steps", type=int, default=600, help="--dump: requests per fleet")
    a = ap.parse_args()
    if a.dump:
        dump(a.dump, a.steps)
        return
    bench(a.fleet, a.profile, a.n, a.repeats, None if a.no_timer else time.perf_counter, a.whole,
          a.reference, a.churn)


if __name__ == "__main__":
    sys.exit(main())
