"""Placement economics from decision records: utilisation, unit cost, break-even, triggers.

Everything here is a pure function of the records (the ledger's canonical decision records with
their outcomes, each with its time), the fleet and the `EconomicsSpec`; ``docs/economics.md``
states every formula with a worked example. In short, over a window of ``H`` hours:

* **utilisation** of a pool (substrate) = busy request-seconds (Σ E2E of the requests it served)
  ÷ (``H`` × 3600 × Σ of its endpoints' ``max_concurrency``): the share of its concurrency
  envelope in use, per day and over the window, against the band ``[band_low, band_high]``
  (provider APIs are elastic: nothing idles there, so they have no band);
* **cost per 1M tokens** by substrate kind and by workload class: attributed cost (the records'
  ``cost_usd``: per-token prices, or the hourly rate amortised over the request's seconds and the
  endpoint's slots) ÷ tokens; for hourly-priced pools also the **owned** cost, the hourly rate of
  every endpoint for every hour of the window whether busy or not, which is what owning costs;
* **repatriation break-even** per model served by a provider API: provider spend per hour ``S``
  against the hourly cost ``C`` of the owned endpoints that would carry the same tokens at
  ``target_utilisation`` (``N = ⌈T ÷ (r × max_concurrency × 3600 × target)⌉`` endpoints, ``r``
  the tokens per busy request-second measured on the cheapest owned pool serving the model);
  ``S ÷ C > 1`` means owned capacity would pay off;
* **energy** by substrate kind and class: the records' joules (``fleet.energy``: live power
  where the engine page reports it, else the configured envelope or the hardware's rating) per
  token of the requests that have them;
* **reassessment triggers**: a pool outside its band for ``out_of_band_days`` consecutive days,
  provider spend past break-even, and a P99/P50 TTFT divergence whose least-squares slope over
  the last ``divergence_days`` days is positive. None fires on less data than its rule needs:
  ``out_of_band_days`` days of data (every one whole but the window's last), at least
  ``MIN_BREAK_EVEN_H`` hours for break-even (its figures are per hour), and a P99/P50 on each of
  the window's last ``divergence_days`` UTC days (the slope is fitted by date over those days).

A ledger younger than the window (``starts_in_window``: it holds nothing before ``since``) is read
over the span it covers, from its first record: the days before it are no data, not idle days,
and owned cost counts the hours since then.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from inferplane.config.schema import EconomicsSpec, FleetConfig, SubstrateSpec

DAY_S = 86400.0
MIN_BREAK_EVEN_H = 1.0
"""The fewest hours of records for a ``provider_past_break_even`` trigger."""


@dataclass(frozen=True, slots=True)
class Served:
    """What economics needs of one record."""

    at_unix: float
    substrate: str
    workload_class: str
    model: str
    tokens: int
    cost_usd: float
    busy_s: float
    ttft_s: float | None
    spillover: str | None
    energy_j: float | None

    @classmethod
    def from_record(cls, at_unix: float, record: Mapping[str, Any]) -> Served | None:
        """None for a record that served nothing (rejected, failed before an answer)."""
        picked = record.get("picked") or {}
        outcome = record.get("outcome") or {}
        substrate = picked.get("substrate")
        status = outcome.get("status")
        if not substrate or not isinstance(status, int) or status >= 500 or status == 0:
            return None
        req = record.get("request") or {}
        prompt = outcome.get("prompt_tokens")
        completion = outcome.get("completion_tokens")
        e2e = outcome.get("e2e_s")
        spill = record.get("spillover") or None
        return cls(
            at_unix=at_unix,
            substrate=str(substrate),
            workload_class=str(req.get("workload_class") or "?"),
            model=str(req.get("model") or "?"),
            tokens=(prompt if isinstance(prompt, int) else int(req.get("prompt_tokens") or 0))
            + (completion if isinstance(completion, int) else 0),
            cost_usd=float(outcome.get("cost_usd") or 0.0),
            busy_s=float(e2e) if isinstance(e2e, int | float) else 0.0,
            ttft_s=outcome.get("ttft_s") if isinstance(outcome.get("ttft_s"), float) else None,
            # the vocabulary word (`kind`); records before it had only `reason`
            spillover=str(spill.get("kind") or spill.get("reason") or "spillover")
            if isinstance(spill, dict) else None,
            energy_j=float(outcome["energy_j"])
            if isinstance(outcome.get("energy_j"), int | float) else None,
        )


@dataclass
class _Acc:
    requests: int = 0
    tokens: int = 0
    cost_usd: float = 0.0
    busy_s: float = 0.0
    energy_j: float = 0.0
    energy_tokens: int = 0  # tokens of the requests whose energy is known
    ttfts: list[float] = field(default_factory=list)

    def add(self, s: Served) -> None:
        self.requests += 1
        self.tokens += s.tokens
        self.cost_usd += s.cost_usd
        self.busy_s += s.busy_s
        if s.energy_j is not None:
            self.energy_j += s.energy_j
            self.energy_tokens += s.tokens
        if s.ttft_s is not None:
            self.ttfts.append(s.ttft_s)


@dataclass(frozen=True, slots=True)
class PoolEconomics:
    name: str
    kind: str
    capacity_class: str
    endpoints: int
    slots: int
    requests: int
    tokens: int
    attributed_usd: float
    owned_usd: float | None  # hourly pools: every endpoint, every hour of the window
    utilisation: float
    daily_utilisation: dict[str, float]
    band: str  # "below", "within", "above"; "elastic" for provider APIs
    days_out_of_band: int  # consecutive, ending with the window's last day
    divergence: dict[str, float]  # day -> P99 / P50 TTFT
    divergence_slope: float | None  # per day, least squares over the last divergence_days
    # calendar days (by date: a day without a P99/P50 is a gap, not skipped)

    @property
    def usd_per_mtok(self) -> float | None:
        cost = self.owned_usd if self.owned_usd is not None else self.attributed_usd
        return cost / self.tokens * 1e6 if self.tokens else None


@dataclass(frozen=True, slots=True)
class BreakEven:
    model: str
    provider_usd_per_h: float
    provider_tokens_per_h: float
    owned_pool: str | None  # the cheapest owned pool serving the model with measured throughput
    tokens_per_busy_s: float | None
    endpoints_needed: int | None
    owned_usd_per_h: float | None

    @property
    def ratio(self) -> float | None:
        """Provider spend ÷ the owned capacity's cost; > 1: repatriating would pay off."""
        if not self.owned_usd_per_h:
            return None
        return self.provider_usd_per_h / self.owned_usd_per_h


@dataclass(frozen=True, slots=True)
class Trigger:
    kind: str  # "out_of_band", "provider_past_break_even", "divergence_rising"
    subject: str
    detail: str


@dataclass(frozen=True, slots=True)
class EconomicsReport:
    since: float  # the window's start: ``requested_since``, or the ledger's first record
    until: float
    hours: float
    requests: int
    pools: list[PoolEconomics]
    by_kind: dict[str, dict[str, float | None]]
    by_class: dict[str, dict[str, float | None]]
    spillovers: dict[str, int]
    break_even: list[BreakEven]
    triggers: list[Trigger]
    requested_since: float | None = None  # the window asked for; set when the ledger is younger

    @property
    def ledger_span(self) -> bool:
        """The ledger began inside the window asked for: the report covers only its span."""
        return self.requested_since is not None and self.requested_since < self.since

    def to_json(self) -> dict[str, Any]:
        def pool(p: PoolEconomics) -> dict[str, Any]:
            return {
                "name": p.name, "kind": p.kind, "capacity_class": p.capacity_class,
                "endpoints": p.endpoints, "slots": p.slots, "requests": p.requests,
                "tokens": p.tokens, "attributed_usd": p.attributed_usd, "owned_usd": p.owned_usd,
                "usd_per_mtok": p.usd_per_mtok, "utilisation": p.utilisation,
                "daily_utilisation": p.daily_utilisation, "band": p.band,
                "days_out_of_band": p.days_out_of_band, "divergence": p.divergence,
                "divergence_slope_per_day": p.divergence_slope,
            }

        return {
            "schema": "inferplane.economics/1",
            "since": self.since, "until": self.until, "hours": self.hours,
            "requested_since": (self.requested_since if self.requested_since is not None
                                else self.since),
            "requests": self.requests,
            "pools": [pool(p) for p in self.pools],
            "by_kind": self.by_kind, "by_class": self.by_class, "spillovers": self.spillovers,
            "break_even": [
                {"model": b.model, "provider_usd_per_h": b.provider_usd_per_h,
                 "provider_tokens_per_h": b.provider_tokens_per_h, "owned_pool": b.owned_pool,
                 "tokens_per_busy_s": b.tokens_per_busy_s,
                 "endpoints_needed": b.endpoints_needed, "owned_usd_per_h": b.owned_usd_per_h,
                 "ratio": b.ratio}
                for b in self.break_even
            ],
            "triggers": [{"kind": t.kind, "subject": t.subject, "detail": t.detail}
                         for t in self.triggers],
        }


def day_of(at_unix: float) -> str:
    return datetime.fromtimestamp(at_unix, UTC).strftime("%Y-%m-%d")


def _percentile(xs: list[float], q: float) -> float:
    s = sorted(xs)
    k = (len(s) - 1) * q / 100.0
    lo, hi = math.floor(k), math.ceil(k)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def _slope(ys: list[float], xs: list[int] | None = None) -> float | None:
    """Least-squares slope of ``ys`` against ``xs`` (default 0, 1, 2, …); None below two
    points."""
    n = len(ys)
    if n < 2:
        return None
    xs = list(range(n)) if xs is None else xs
    mx, my = sum(xs) / n, sum(ys) / n
    den = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / den


def _last_days_covered(days: list[str], divergence: dict[str, float], n: int) -> bool:
    """Whether each of the last ``n`` UTC days of the window has a P99/P50 (what
    ``divergence_rising`` needs: not ``n`` days anywhere in the window)."""
    last = days[-n:]
    return len(last) == n and all(d in divergence for d in last)


def _days(since: float, until: float) -> list[tuple[str, float]]:
    """Every UTC day the window touches, with the seconds of the window that fall in it."""
    out: list[tuple[str, float]] = []
    t = since
    while t < until:
        next_midnight = (math.floor(t / DAY_S) + 1) * DAY_S
        end = min(until, next_midnight)
        out.append((day_of(t), end - t))
        t = end
    return out


def _band(u: float, spec: EconomicsSpec) -> str:
    return "below" if u < spec.band_low else "above" if u > spec.band_high else "within"


def analyse(
    records: Iterable[tuple[float, Mapping[str, Any]]],
    config: FleetConfig,
    *,
    since: float,
    until: float,
    starts_in_window: bool = False,
) -> EconomicsReport:
    """The report over ``since <= at < until`` of ``(at_unix, record)`` pairs; with
    ``starts_in_window`` (the ledger holds nothing before ``since``) over the span from the
    first record on (none: an empty span)."""
    if until <= since:
        raise ValueError("the window is empty: until must be after since")
    spec = config.economics
    subs: dict[str, SubstrateSpec] = {s.name: s for s in config.substrates}
    pools: dict[str, _Acc] = defaultdict(_Acc)
    daily: dict[tuple[str, str], _Acc] = defaultdict(_Acc)
    kinds: dict[str, _Acc] = defaultdict(_Acc)
    classes: dict[str, _Acc] = defaultdict(_Acc)
    by_model_sub: dict[tuple[str, str], _Acc] = defaultdict(_Acc)
    spillovers: dict[str, int] = defaultdict(int)
    total = 0
    first = until
    for at, record in records:
        if not since <= at < until:
            continue
        first = min(first, at)
        s = Served.from_record(at, record)
        if s is None:
            continue
        total += 1
        kind = subs[s.substrate].kind if s.substrate in subs else "unknown"
        pools[s.substrate].add(s)
        daily[(s.substrate, day_of(at))].add(s)
        kinds[kind].add(s)
        classes[s.workload_class].add(s)
        by_model_sub[(s.model, s.substrate)].add(s)
        if s.spillover is not None:
            spillovers[s.spillover] += 1

    requested = since
    if starts_in_window:
        since = first  # before the ledger's first record there is no data (not 0 % busy)
    hours = (until - since) / 3600.0
    days = _days(since, until)
    pool_reports: list[PoolEconomics] = []
    owned_by_kind: dict[str, float] = defaultdict(float)
    for sub in config.substrates:
        acc = pools.get(sub.name, _Acc())
        slots = sum(e.max_concurrency for e in sub.endpoints)
        owned = (sub.cost.hourly_usd * len(sub.endpoints) * hours
                 if sub.cost.hourly_usd is not None else None)
        if owned is not None:
            owned_by_kind[sub.kind] += owned
        per_day = {
            d: daily.get((sub.name, d), _Acc()).busy_s / (secs * slots)
            for d, secs in days
        }
        elastic = sub.kind == "provider-api"  # nothing idles there: no band to be outside of
        run = 0
        for k, (d, secs) in enumerate(reversed(days)):
            if elastic or _band(per_day[d], spec) == "within":
                break
            if k and secs < DAY_S:  # a day covered in part (not the last): not a day of data
                break
            run += 1
        divergence = {}
        for d, _ in days:
            ttfts = daily.get((sub.name, d), _Acc()).ttfts
            if len(ttfts) >= 20:  # fewer make a P99 that is just the maximum
                p50 = _percentile(ttfts, 50)
                if p50 > 0:
                    divergence[d] = _percentile(ttfts, 99) / p50
        # the last divergence_days calendar days, by date: a day without a value is a gap
        last = [d for d, _ in days][-spec.divergence_days:]
        xs = [i for i, d in enumerate(last) if d in divergence]
        recent = [divergence[last[i]] for i in xs]
        utilisation = acc.busy_s / (hours * 3600.0 * slots) if hours > 0 else 0.0
        pool_reports.append(PoolEconomics(
            name=sub.name, kind=sub.kind, capacity_class=sub.capacity_class,
            endpoints=len(sub.endpoints), slots=slots, requests=acc.requests, tokens=acc.tokens,
            attributed_usd=acc.cost_usd, owned_usd=owned, utilisation=utilisation,
            daily_utilisation=per_day,
            band="elastic" if elastic else _band(utilisation, spec), days_out_of_band=run,
            divergence=divergence, divergence_slope=_slope(recent, xs),
        ))

    def unit(acc: _Acc, owned: float | None = None) -> dict[str, float | None]:
        return {
            "requests": float(acc.requests), "tokens": float(acc.tokens),
            "attributed_usd": acc.cost_usd,
            "usd_per_mtok": acc.cost_usd / acc.tokens * 1e6 if acc.tokens else None,
            "owned_usd": owned,
            "owned_usd_per_mtok": owned / acc.tokens * 1e6 if owned and acc.tokens else None,
            "energy_j": acc.energy_j if acc.energy_tokens else None,
            "joules_per_token": acc.energy_j / acc.energy_tokens if acc.energy_tokens else None,
        }

    by_kind = {k: unit(kinds.get(k, _Acc()), owned_by_kind.get(k))
               for k in sorted({s.kind for s in config.substrates} | set(kinds))}
    by_class = {k: unit(v) for k, v in sorted(classes.items())}
    breaks = _break_even(by_model_sub, subs, spec, hours)
    report = EconomicsReport(
        since=since, until=until, hours=hours, requests=total, pools=pool_reports,
        by_kind=by_kind, by_class=by_class, spillovers=dict(sorted(spillovers.items())),
        break_even=breaks, triggers=[], requested_since=requested,
    )
    report.triggers.extend(triggers(report, spec))
    return report


def _break_even(
    by_model_sub: Mapping[tuple[str, str], _Acc],
    subs: Mapping[str, SubstrateSpec],
    spec: EconomicsSpec,
    hours: float,
) -> list[BreakEven]:
    out: list[BreakEven] = []
    models = sorted({m for (m, s) in by_model_sub if s in subs and subs[s].kind == "provider-api"})
    for model in models:
        provider = [a for (m, s), a in by_model_sub.items()
                    if m == model and s in subs and subs[s].kind == "provider-api"]
        spend = sum(a.cost_usd for a in provider) / hours
        tokens = sum(a.tokens for a in provider) / hours
        best: tuple[float, str, float, int, float] | None = None
        for (m, s), acc in by_model_sub.items():
            sub = subs.get(s)
            if (m != model or sub is None or sub.cost.hourly_usd is None
                    or sub.kind == "provider-api" or acc.busy_s <= 0 or acc.tokens <= 0):
                continue
            rate = acc.tokens / acc.busy_s  # tokens per busy request-second
            slots = max(e.max_concurrency for e in sub.endpoints)
            per_endpoint_h = rate * slots * 3600.0 * spec.target_utilisation
            n = max(1, math.ceil(tokens / per_endpoint_h))
            cost = n * sub.cost.hourly_usd
            if best is None or cost < best[0]:
                best = (cost, s, rate, n, cost)
        out.append(BreakEven(
            model=model, provider_usd_per_h=spend, provider_tokens_per_h=tokens,
            owned_pool=best[1] if best else None, tokens_per_busy_s=best[2] if best else None,
            endpoints_needed=best[3] if best else None, owned_usd_per_h=best[4] if best else None,
        ))
    return out


def triggers(report: EconomicsReport, spec: EconomicsSpec) -> list[Trigger]:
    out: list[Trigger] = []
    for p in report.pools:
        if p.days_out_of_band >= spec.out_of_band_days:
            out.append(Trigger(
                "out_of_band", p.name,
                f"utilisation {p.band} the band [{spec.band_low:.0%}, {spec.band_high:.0%}] for "
                f"{p.days_out_of_band} consecutive days (now {p.utilisation:.1%})",
            ))
        if (p.divergence_slope is not None and p.divergence_slope > 0
                and _last_days_covered(list(p.daily_utilisation), p.divergence,
                                       spec.divergence_days)):  # a P99/P50 on each day
            last = list(p.divergence.values())[-1]
            out.append(Trigger(
                "divergence_rising", p.name,
                f"P99/P50 TTFT rising by {p.divergence_slope:.2f} a day (last {last:.1f}x)",
            ))
    for b in report.break_even:
        r = b.ratio
        if r is not None and r > 1 and report.hours >= MIN_BREAK_EVEN_H:
            out.append(Trigger(
                "provider_past_break_even", b.model,
                f"provider spend {b.provider_usd_per_h:.2f} USD/h is {r:.1f}x the "
                f"{b.owned_usd_per_h:.2f} USD/h of {b.endpoints_needed} endpoint(s) of "
                f"{b.owned_pool} at {spec.target_utilisation:.0%} utilisation",
            ))
    return out
