"""Health beyond up/down: outlier ejection and per-pool concurrency health.

Two pieces of pure logic over `LiveFleet` data, each given ``now`` by its caller (the gateway
passes its monotonic clock, tests a fake one):

**Outlier ejection** (`OutlierDetector`), after Envoy's outlier detection
(https://www.envoyproxy.io/docs/envoy/latest/intro/arch_overview/upstream/outlier and the
``config.cluster.v3.OutlierDetection`` reference): a periodic sweep ejects an endpoint that is
unlike its *peers* — endpoints of the same hardware profile and tensor-parallel degree serving
the same models (`peer_key`), so an H100 is never judged against a provider API. An endpoint is
an outlier when, with ``n`` = ``min_requests``:

- **metrics stale** (only when ``stale_eject_s`` is set; off by default): its ``/health``
  answers but its last good scrape is ``>= stale_eject_s`` old, *and* another endpoint serving
  one of its models is in service with metrics younger than that (never-scraped endpoints, e.g.
  provider APIs without ``/metrics``, are exempt). When every endpoint of a model is stale the
  fault is the gateway's own (a loaded host, its network), and nobody is ejected. By default
  staleness only lowers the confidence placement puts in the engine's signals: a stale
  endpoint's queue and KV figures are ignored and the gateway's own in-flight counts, outcomes
  and TTFTs decide (`fleet.state.EndpointState.stale`); a wedged engine is ejected by the
  failures and first-byte timeouts it causes;
- **error rate**: it has ``>= n`` outcomes in the last ``error_window_s`` (of its last 100),
  at least one peer has ``>= n`` too, and
  ``error_rate >= max(min_error_rate, median(peer error rates) + error_rate_margin)``
  (Envoy's failure-percentage ejection, made relative so a fleet-wide fault ejects nobody);
- **TTFT** (only when ``ttft_factor`` is set; off by default): it has ``>= n`` TTFT samples, at
  least one peer has ``>= n`` too, its TTFT p50 is at least ``min_ttft_s``, and it is
  ``ttft_factor`` × slower than the peers' median. Slower is measured on the median of *observed ÷
  predicted* TTFT (placement's uncorrected prediction for that request, so a longer prompt or a
  deeper queue does not count against an endpoint) where it and a peer have ``>= n`` such ratios,
  else on raw TTFT p50s. A busy endpoint that holds the long conversations' prefixes sees longer
  TTFTs for the work it was given, and ejecting it would scatter those conversations (a lone
  endpoint has no peers and is never a TTFT outlier).

**Consecutive failures** (`OutlierDetector.note_failure`, on the request path, not the sweep):
like Envoy's ``consecutive_5xx``, an endpoint whose last ``consecutive_5xx`` attempts all failed
(5xx, connection error, timeout, broken stream) or whose last ``consecutive_timeouts`` attempts
all hit the first-byte timeout (a hung engine) is ejected at once; while on probation after an
ejection (half-open) a single failure ejects it again, for longer. Its cap counts the endpoints
that could take its traffic (those serving one of its models), not its hardware peers: at most
``floor(alternatives × max_ejection_percent / 100)`` of them are ejected at once, so a lone
endpoint, or a fault across every alternative, ejects nobody.

Peers are the other members of the group that pass ``/health`` and are not ejected. At most
``floor(group size × max_ejection_percent / 100)`` members of a group are ejected at once
(stricter than Envoy, which always allows one: the gateway has no panic mode), worst first.
An ejection lasts ``min(base_ejection_s × ejections, max_ejection_s)``, where ``ejections``
counts this endpoint's ejections including this one. When it ends the endpoint is **half-open**:
back in service on probation, its outcome and TTFT windows cleared, so the next sweeps judge only
what it does after its return; an outlier again is ejected again, for longer. Once it has served
``n`` requests (or, ejected for stale metrics, is scraped again) without being an outlier it is
off probation, and its ejection count then drops by one every ``decay_s``.

**Pool concurrency health** (`pool_health`): per substrate, from the scrape history
``LiveFleet`` keeps (``(time, waiting, kv_usage)`` per scrape) and the gateway's own
observations: queue-depth trend, KV pressure, P99/P50 TTFT divergence and in-flight ÷ envelope,
with a verdict (``ok`` | ``pressure`` | ``past-envelope``) and its reasons. Utilisation is not an
input: a pool whose queue grows and whose P99 TTFT pulls away from its P50 is past its envelope
whatever its GPUs report.
"""

from __future__ import annotations

import math
from bisect import bisect_left
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from inferplane.config.schema import OutlierSpec, PoolHealthSpec
from inferplane.fleet.live import LiveFleet, nearest_rank
from inferplane.fleet.model import Endpoint, Fleet
from inferplane.fleet.state import EndpointView
from inferplane.types import JSONObject

ReasonKind = Literal[
    "stale",
    "error_rate",
    "ttft",
    "rate_limited",
    "passive",
    "consecutive_5xx",
    "first_byte_timeout",
]
PoolVerdict = Literal["ok", "pressure", "past-envelope"]
VERDICTS: tuple[PoolVerdict, ...] = ("ok", "pressure", "past-envelope")
PeerKey = tuple[str, int, tuple[tuple[str, str, str], ...]]

_KIND_RANK: dict[ReasonKind, int] = {
    "rate_limited": 4,
    "passive": 3,
    "stale": 2,
    "error_rate": 1,
    "consecutive_5xx": 1,
    "first_byte_timeout": 1,
    "ttft": 0,
}


def peer_key(endpoint: Endpoint) -> PeerKey:
    """Like compares with like: hardware profile, tensor-parallel degree, and the served models
    as (name, variant, precision)."""
    models = tuple(sorted((m.name, m.variant, m.precision) for m in endpoint.spec.models))
    return (endpoint.substrate.hardware.lower(), endpoint.spec.tp, models)


def peer_groups(fleet: Fleet) -> dict[PeerKey, tuple[str, ...]]:
    """Endpoint names by `peer_key`, in fleet order."""
    out: dict[PeerKey, list[str]] = {}
    for e in fleet.endpoints:
        out.setdefault(peer_key(e), []).append(e.name)
    return {k: tuple(v) for k, v in out.items()}


def alternative_groups(fleet: Fleet) -> dict[str, tuple[str, ...]]:
    """For each endpoint, every endpoint (itself included) serving one of its models: those
    that can take its traffic when it is ejected."""
    by_model: dict[str, list[str]] = {}
    for e in fleet.endpoints:
        for m in e.spec.models:
            by_model.setdefault(m.name, []).append(e.name)
    out: dict[str, tuple[str, ...]] = {}
    for e in fleet.endpoints:
        names = {n for m in e.spec.models for n in by_model[m.name]}
        out[e.name] = tuple(x.name for x in fleet.endpoints if x.name in names)
    return out


@dataclass(frozen=True, slots=True)
class Observed:
    """What one sweep reads of one endpoint."""

    healthy: bool = True
    outcomes: int = 0
    error_rate: float = 0.0
    ttft_samples: int = 0
    ttft_p50_s: float | None = None
    ratio_samples: int = 0  # observed ÷ predicted TTFT samples
    ratio_p50: float | None = None
    metrics_age_s: float | None = None  # None: never scraped


def observe(live: LiveFleet, now: float, window_s: float = math.inf) -> dict[str, Observed]:
    """Read every endpoint's outcome window (its last 100 attempts, those older than
    ``window_s`` left out), TTFT window, health and metrics age."""
    out: dict[str, Observed] = {}
    since = now - window_s
    for name, rec in live.live.items():
        n = errors = 0
        for t, ok in rec.outcomes:
            if t >= since:
                n += 1
                errors += not ok
        out[name] = Observed(
            healthy=rec.healthy,
            outcomes=n,
            error_rate=errors / n if n else 0.0,
            ttft_samples=len(rec.ttft),
            ttft_p50_s=rec.ttft.percentile(50),
            ratio_samples=len(rec.ttft_ratio),
            ratio_p50=rec.ttft_ratio.percentile(50),
            metrics_age_s=None if rec.metrics_at is None else now - rec.metrics_at,
        )
    return out


@dataclass(slots=True)
class EjectionRecord:
    """The detector's memory of one endpoint."""

    ejections: int = 0
    ejected_until: float | None = None  # set while the detector holds it ejected
    kind: ReasonKind | None = None
    reason: str = ""
    probation: bool = False
    last_decay: float = 0.0


@dataclass(frozen=True, slots=True)
class Action:
    """One change a sweep makes: eject (with kind, reason and end time) or return to service."""

    endpoint: str
    eject: bool
    kind: ReasonKind | None = None
    reason: str = ""
    until: float | None = None


def _median_without(values: Sequence[float], own: float | None) -> float | None:
    """``statistics.median`` of sorted ``values`` with one occurrence of ``own`` left out (none
    when ``own`` is None); None when nothing is left."""
    k = len(values) - (own is not None)
    if k <= 0:
        return None
    skip = len(values) if own is None else bisect_left(values, own)

    def at(i: int) -> float:
        return values[i if i < skip else i + 1]

    if k % 2 == 1:
        return at(k // 2)
    return (at(k // 2 - 1) + at(k // 2)) / 2


class _PeerMedians:
    """The peer medians `OutlierDetector._judge` compares one member of a group with: each
    signal's values over the group's judged members, sorted once a sweep, and the median taken
    with the member's own value left out. Judging a group of n is O(n log n), where building
    each member's list of peers was O(n²) (a fleet of 2,000 alike endpoints is one group:
    4 million reads a sweep, about 125 ms on the event loop every ``interval_s``)."""

    def __init__(self, members: Sequence[Observed], n: int) -> None:
        self.n = n
        self.rates = sorted(o.error_rate for o in members if o.outcomes >= n)
        self.ratios = sorted(r for o in members if (r := self._ratio(o)) is not None)
        self.p50s = sorted(p for o in members if (p := self._p50(o)) is not None)

    def _ratio(self, o: Observed) -> float | None:
        return o.ratio_p50 if o.ratio_samples >= self.n else None

    def _p50(self, o: Observed) -> float | None:
        return o.ttft_p50_s if o.ttft_samples >= self.n else None

    def error_rate(self, o: Observed) -> float | None:
        """Median error rate of the peers with ``>= n`` outcomes (None: no such peer)."""
        return _median_without(self.rates, o.error_rate if o.outcomes >= self.n else None)

    def ratio(self, o: Observed) -> float | None:
        """Median observed ÷ predicted TTFT of the peers with ``>= n`` such ratios."""
        return _median_without(self.ratios, self._ratio(o))

    def ttft_p50(self, o: Observed) -> float | None:
        """Median TTFT p50 of the peers with ``>= n`` TTFT samples."""
        return _median_without(self.p50s, self._p50(o))


@dataclass(frozen=True, slots=True)
class _Outlier:
    name: str
    kind: ReasonKind
    reason: str
    severity: float  # how far past its threshold, for worst-first ordering


def _s(x: float) -> str:
    return f"{x:.3g} s"


class OutlierDetector:
    """Envoy-style outlier ejection over peer groups; see the module docstring for formulas.

    `sweep` is the pure state machine (observations and ``now`` in, actions out); `run` reads
    a `LiveFleet`, sweeps and applies the actions to it.
    """

    def __init__(self, fleet: Fleet, spec: OutlierSpec) -> None:
        self.spec = spec
        self.groups = peer_groups(fleet)
        self.alternatives = alternative_groups(fleet)
        self.records: dict[str, EjectionRecord] = {
            e.name: EjectionRecord() for e in fleet.endpoints
        }
        self._fresh: frozenset[str] = frozenset()  # in service with fresh metrics (a sweep's)
        # every endpoint whose record may be ejected with kind ``rate_limited`` (a superset: a
        # record's kind is set only by `_eject_as`, which adds it; `rate_limited` drops the
        # names whose record no longer is), so that a request's 429 or 503 does not walk
        # every record
        self._limited: set[str] = set()

    def reconfigure(self, fleet: Fleet, fresh: Sequence[str] = ()) -> None:
        """A reloaded fleet: peer groups and alternatives are recomputed; an endpoint kept
        keeps its ejection memory, a new one (or one in ``fresh``: its URL changed) starts
        clean, a removed one is forgotten."""
        self.groups = peer_groups(fleet)
        self.alternatives = alternative_groups(fleet)
        renewed = set(fresh)
        self.records = {
            e.name: EjectionRecord() if e.name in renewed else
            self.records.get(e.name) or EjectionRecord()
            for e in fleet.endpoints
        }

    def rate_limited(self) -> dict[str, float]:
        """The endpoints ejected after a 429 (kind ``rate_limited``, `eject_now`), each with
        its ejection's end: the records that are, found through ``_limited`` rather than a
        walk over every record."""
        out: dict[str, float] = {}
        for name in list(self._limited):
            rec = self.records.get(name)
            if rec is None or rec.kind != "rate_limited" or rec.ejected_until is None:
                self._limited.discard(name)
            else:
                out[name] = rec.ejected_until
        return out

    def _eject_as(self, name: str, rec: EjectionRecord, kind: ReasonKind, reason: str) -> None:
        """Give ``name``'s ejection its kind and reason (every ejection sets them here, so that
        ``_limited`` holds every record of kind ``rate_limited``, whichever path ejected it)."""
        rec.kind, rec.reason, rec.probation = kind, reason, False
        if kind == "rate_limited":
            self._limited.add(name)

    def ejection_s(self, ejections: int) -> float:
        """``min(base_ejection_s × ejections, max_ejection_s)``."""
        return min(self.spec.base_ejection_s * ejections, self.spec.max_ejection_s)

    def _fresher_alternative(self, name: str) -> bool:
        """Whether another endpoint serving one of ``name``'s models is in service with metrics
        younger than ``stale_eject_s`` (set by `sweep` for the sweep's observations)."""
        return any(m != name and m in self._fresh for m in self.alternatives[name])

    def _judge(self, name: str, peers: _PeerMedians, o: Observed) -> _Outlier | None:
        sp = self.spec
        n = sp.min_requests
        if (
            sp.stale_eject_s is not None
            and o.metrics_age_s is not None
            and o.metrics_age_s >= sp.stale_eject_s
            and self._fresher_alternative(name)
        ):
            return _Outlier(
                name, "stale", f"metrics stale {o.metrics_age_s:.1f} s", o.metrics_age_s
            )
        if o.outcomes >= n:
            med = peers.error_rate(o)
            if med is not None:
                limit = max(sp.min_error_rate, med + sp.error_rate_margin)
                if o.error_rate >= limit:
                    return _Outlier(
                        name,
                        "error_rate",
                        f"error rate {o.error_rate:.2f} vs peers {med:.2f}",
                        o.error_rate / limit,
                    )
        if (
            sp.ttft_factor is not None
            and o.ttft_samples >= n
            and o.ttft_p50_s is not None
            and o.ttft_p50_s >= sp.min_ttft_s
        ):
            if o.ratio_samples >= n and o.ratio_p50 is not None:
                med = peers.ratio(o)
                if med is not None:
                    limit = sp.ttft_factor * med
                    if o.ratio_p50 >= limit and limit > 0:
                        return _Outlier(
                            name,
                            "ttft",
                            f"TTFT {o.ratio_p50:.3g}× its prediction vs peers {med:.3g}× "
                            f"(p50 {_s(o.ttft_p50_s)})",
                            o.ratio_p50 / limit,
                        )
                    return None
            med = peers.ttft_p50(o)
            if med is not None:
                limit = max(sp.min_ttft_s, sp.ttft_factor * med)
                if o.ttft_p50_s >= limit and limit > 0:
                    return _Outlier(
                        name,
                        "ttft",
                        f"TTFT p50 {_s(o.ttft_p50_s)} vs peers {_s(med)}",
                        o.ttft_p50_s / limit,
                    )
        return None

    def sweep(self, observed: Mapping[str, Observed], now: float) -> list[Action]:
        """One ejection sweep at ``now``: return expired ejections to service (half-open),
        eject new outliers within each group's cap, end probations, decay ejection counts."""
        sp = self.spec
        actions: list[Action] = []
        returned: set[str] = set()
        limit = sp.stale_eject_s
        self._fresh = frozenset(
            name
            for name, o in observed.items()
            if limit is not None
            and o.healthy
            and o.metrics_age_s is not None
            and o.metrics_age_s < limit
            and (rec := self.records.get(name)) is not None
            and rec.ejected_until is None
        )
        for name, rec in self.records.items():
            if rec.ejected_until is not None and now >= rec.ejected_until:
                rec.ejected_until, rec.probation, rec.last_decay = None, True, now
                actions.append(Action(name, eject=False, kind=rec.kind))
                returned.add(name)
        for members in self.groups.values():
            in_service = [
                m for m in members if self.records[m].ejected_until is None and observed[m].healthy
            ]
            found: list[_Outlier] = []
            # an endpoint returned this sweep had its windows cleared: judged from the next one
            judged = [m for m in in_service if m not in returned]
            peers = _PeerMedians([observed[m] for m in judged], sp.min_requests)
            for m in judged:
                outlier = self._judge(m, peers, observed[m])
                rec = self.records[m]
                if outlier is not None:
                    found.append(outlier)
                elif rec.probation and (
                    observed[m].outcomes >= sp.min_requests
                    or observed[m].ttft_samples >= sp.min_requests
                    or (rec.kind == "stale" and observed[m].metrics_age_s is not None)
                ):
                    rec.probation, rec.last_decay = False, now
                elif not rec.probation and rec.ejections > 0 and now - rec.last_decay >= sp.decay_s:
                    rec.ejections -= 1
                    rec.last_decay = now
            cap = math.floor(len(members) * sp.max_ejection_percent / 100.0 + 1e-9)
            held = sum(1 for m in members if self.records[m].ejected_until is not None)
            found.sort(key=lambda o: (_KIND_RANK[o.kind], o.severity), reverse=True)
            for o in found:
                if held >= cap:
                    break
                rec = self.records[o.name]
                rec.ejections += 1
                rec.ejected_until = now + self.ejection_s(rec.ejections)
                self._eject_as(o.name, rec, o.kind, o.reason)
                actions.append(Action(o.name, True, o.kind, o.reason, rec.ejected_until))
                held += 1
        return actions

    def eject_now(
        self,
        name: str,
        now: float,
        kind: ReasonKind,
        reason: str,
        seconds: float | None = None,
    ) -> Action:
        """Eject one endpoint at once, outside a sweep and past the group cap (the upstream
        itself said so: a 429, or a passive endpoint failing), for ``seconds`` (an upstream's
        Retry-After; the ejection count is not raised) or else ``ejection_s`` of its raised
        count. An ejection already running longer is kept. The sweep returns it half-open."""
        rec = self.records.get(name)
        if rec is None:  # removed by a reload while its request was in flight
            return Action(name, True, kind, reason, now)
        if seconds is None:
            rec.ejections += 1
            seconds = self.ejection_s(rec.ejections)
        until = now + seconds
        if rec.ejected_until is None or until > rec.ejected_until:
            rec.ejected_until = until
            self._eject_as(name, rec, kind, reason)
        return Action(name, True, rec.kind, rec.reason, rec.ejected_until)

    def note_failure(self, live: LiveFleet, name: str) -> Action | None:
        """After a failed attempt on ``name``: eject it at once when its consecutive failures
        (or first-byte timeouts) reach their threshold — one while on probation — within the
        cap over its alternatives (module docstring). Applies the ejection to ``live``."""
        sp = self.spec
        rec = self.records.get(name)
        if not sp.enabled or rec is None or rec.ejected_until is not None:
            return None
        lrec = live.live.get(name)
        if lrec is None:
            return None
        kind: ReasonKind | None = None
        reason = ""
        t, f = lrec.consecutive_timeouts, lrec.consecutive_failures
        if sp.consecutive_timeouts is not None and t > 0 and (
            t >= sp.consecutive_timeouts or rec.probation
        ):
            kind, reason = "first_byte_timeout", f"{t} consecutive first-byte timeouts"
        elif (
            sp.consecutive_5xx is not None and f > 0 and (f >= sp.consecutive_5xx or rec.probation)
        ):
            kind, reason = "consecutive_5xx", f"{f} consecutive failures"
        if kind is None:
            return None
        if rec.probation:
            reason += " (on probation)"
        alts = self.alternatives.get(name, (name,))
        cap = math.floor(len(alts) * sp.max_ejection_percent / 100.0 + 1e-9)
        if sum(1 for m in alts if self.records[m].ejected_until is not None) >= cap:
            return None
        now = live.clock()
        rec.ejections += 1
        rec.ejected_until = now + self.ejection_s(rec.ejections)
        self._eject_as(name, rec, kind, reason)
        live.set_ejected(name, True, reason)
        return Action(name, True, kind, reason, rec.ejected_until)

    def run(self, live: LiveFleet) -> list[Action]:
        """Observe ``live`` at its clock's now, sweep, and apply: an ejection sets the endpoint's
        ``ejected`` flag and reason; a return clears it and the endpoint's observation windows."""
        now = live.clock()
        actions = self.sweep(observe(live, now, self.spec.error_window_s), now)
        for a in actions:
            if a.eject:
                live.set_ejected(a.endpoint, True, a.reason)
            else:
                live.set_ejected(a.endpoint, False)
                live.reset_observations(a.endpoint)
        return actions


# -- pool concurrency health -------------------------------------------------------------------


def slope(points: Sequence[tuple[float, float]]) -> float | None:
    """Least-squares slope ``Σ(t - t̄)(y - ȳ) / Σ(t - t̄)²`` of (t, y) points; None with fewer
    than 3 points or no spread in t."""
    if len(points) < 3:
        return None
    tm = sum(t for t, _ in points) / len(points)
    ym = sum(y for _, y in points) / len(points)
    den = sum((t - tm) ** 2 for t, _ in points)
    if den <= 0:
        return None
    return sum((t - tm) * (y - ym) for t, y in points) / den


@dataclass(frozen=True, slots=True)
class PoolHealth:
    """Concurrency health of one substrate (pool) at one instant.

    ``queue_trend``: Σ over endpoints of the least-squares slope of engine ``waiting`` over the
    last ``window_s`` of scrapes (requests/s; positive = the queue grows). ``kv_mean`` /
    ``kv_max``: the mean over endpoints of each one's mean ``kv_usage`` in the window (an
    endpoint scraped less often weighs as much), and the largest sample. ``ttft_divergence``:
    p99 / p50 of the pool's observed TTFTs, all endpoints' windows merged (None below
    ``min_ttft_samples``). ``inflight_ratio``: gateway in-flight ÷ Σ ``max_concurrency`` of the
    pool's usable endpoints.
    """

    substrate: str
    endpoints: int
    usable: int
    queue_trend: float
    waiting: float
    kv_mean: float | None
    kv_max: float | None
    ttft_p50_s: float | None
    ttft_p99_s: float | None
    ttft_divergence: float | None
    inflight: int
    envelope: int
    inflight_ratio: float | None
    verdict: PoolVerdict
    reasons: tuple[str, ...]

    def to_json(self) -> JSONObject:
        return {
            "substrate": self.substrate,
            "verdict": self.verdict,
            "reasons": list(self.reasons),
            "endpoints": self.endpoints,
            "usable_endpoints": self.usable,
            "queue_trend_per_s": self.queue_trend,
            "waiting": self.waiting,
            "kv_mean": self.kv_mean,
            "kv_max": self.kv_max,
            "ttft_p50_s": self.ttft_p50_s,
            "ttft_p99_s": self.ttft_p99_s,
            "ttft_divergence": self.ttft_divergence,
            "inflight": self.inflight,
            "concurrency_envelope": self.envelope,
            "inflight_ratio": self.inflight_ratio,
        }


def _verdict(
    spec: PoolHealthSpec,
    trend: float,
    kv_mean: float | None,
    kv_max: float | None,
    div: float | None,
    inflight: int,
    envelope: int,
) -> tuple[PoolVerdict, tuple[str, ...]]:
    """``past-envelope`` if the queue trend, TTFT divergence or in-flight ratio is at or past
    its ``*_past`` threshold, the KV max at or past ``kv_past``, or no endpoint is usable; else
    ``pressure`` if one of them is at or past its ``*_pressure`` threshold (KV: the mean at or
    past ``kv_pressure``); else ``ok``. The reasons name every signal over a threshold."""
    past: list[str] = []
    pressure: list[str] = []
    w = spec.window_s

    def check(value: float | None, soft: float, hard: float, text: str) -> None:
        if value is None:
            return
        if value >= hard:
            past.append(text)
        elif value >= soft:
            pressure.append(text)

    check(
        trend, spec.trend_pressure, spec.trend_past, f"queue growing {trend:.2f} req/s over {w:g} s"
    )
    if kv_max is not None and kv_max >= spec.kv_past:
        past.append(f"KV usage max {kv_max:.2f}")
    if kv_mean is not None and kv_mean >= spec.kv_pressure:
        pressure.append(f"KV usage mean {kv_mean:.2f}")
    check(div, spec.divergence_pressure, spec.divergence_past, f"TTFT p99/p50 {div or 0.0:.1f}")
    if envelope <= 0:
        past.append("no usable endpoint")
    else:
        check(
            inflight / envelope,
            spec.inflight_pressure,
            spec.inflight_past,
            f"in-flight {inflight}/{envelope} of the concurrency envelope",
        )
    if past:
        return "past-envelope", tuple(past + pressure)
    return ("pressure" if pressure else "ok"), tuple(pressure)


def pool_health(live: LiveFleet, spec: PoolHealthSpec, now: float) -> dict[str, PoolHealth]:
    """Every substrate's `PoolHealth` at ``now``, in fleet order."""
    pools: dict[str, list[Endpoint]] = {}
    for e in live.fleet.endpoints:
        pools.setdefault(e.substrate.name, []).append(e)
    out: dict[str, PoolHealth] = {}
    since = now - spec.window_s
    for sub, eps in pools.items():
        trend = waiting = 0.0
        kvs: list[float] = []
        kv_top = 0.0
        ttfts: list[float] = []
        inflight = envelope = usable = 0
        for e in eps:
            rec = live.live[e.name]
            window = [s for s in rec.scrapes if s[0] >= since]
            b = slope([(t, w) for t, w, _ in window if w is not None])
            trend += b or 0.0
            if window and window[-1][1] is not None and now - window[-1][0] <= live.stale_after_s:
                waiting += window[-1][1]
            # each endpoint's mean over the window, then the pool's mean of those: an endpoint
            # scraped less often (idle back-off) weighs as much as a busy one
            ekv = [kv for _, _, kv in window if kv is not None]
            if ekv:
                kvs.append(sum(ekv) / len(ekv))
                kv_top = max(kv_top, max(ekv))
            ttfts.extend(rec.ttft.values())
            inflight += rec.inflight
            if rec.healthy and not rec.ejected:
                usable += 1
                envelope += e.max_concurrency
        kv_mean = sum(kvs) / len(kvs) if kvs else None
        kv_max = kv_top if kvs else None
        p50 = p99 = div = None
        if len(ttfts) >= spec.min_ttft_samples:
            ttfts.sort()
            p50, p99 = nearest_rank(ttfts, 50), nearest_rank(ttfts, 99)
            div = p99 / p50 if p50 > 0 else None
        verdict, reasons = _verdict(spec, trend, kv_mean, kv_max, div, inflight, envelope)
        out[sub] = PoolHealth(
            substrate=sub,
            endpoints=len(eps),
            usable=usable,
            queue_trend=trend,
            waiting=waiting,
            kv_mean=kv_mean,
            kv_max=kv_max,
            ttft_p50_s=p50,
            ttft_p99_s=p99,
            ttft_divergence=div,
            inflight=inflight,
            envelope=envelope,
            inflight_ratio=inflight / envelope if envelope else None,
            verdict=verdict,
            reasons=reasons,
        )
    return out


def endpoint_summary(view: EndpointView, record: EjectionRecord | None, now: float) -> JSONObject:
    """One endpoint's health as ``GET /v1/fleet/health`` shows it."""
    s = view.state
    until = None if record is None else record.ejected_until
    return {
        "endpoint": view.name,
        "substrate": view.endpoint.substrate.name,
        "healthy": s.healthy,
        "ejected": s.ejected,
        "ejected_reason": s.ejected_reason or None,
        "ejected_for_s": None if until is None else max(0.0, until - now),
        "ejections": 0 if record is None else record.ejections,
        "probation": False if record is None else record.probation,
        "stale": s.stale,
        "metrics_age_s": s.metrics_age_at(now),
        "inflight": s.inflight,
        "max_concurrency": view.endpoint.max_concurrency,
        "running": s.running,
        "waiting": s.waiting,
        "kv_usage": s.kv_usage,
        "ttft_p50_s": s.ttft_p50_s,
        "ttft_p99_s": s.ttft_p99_s,
        "ttft_correction": s.ttft_ratio_p50,
        "error_rate": s.error_rate,
        "requests_total": s.requests_total,
    }
