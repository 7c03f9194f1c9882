"""The economics report as text, as Prometheus gauges, and read from a configured ledger."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import orjson
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector, CollectorRegistry

from inferplane.config.schema import FleetConfig
from inferplane.economics.analysis import EconomicsReport, analyse
from inferplane.ledger.query import Query
from inferplane.ledger.tools import Source, export_rows

log = logging.getLogger("inferplane.economics")


def records(source: Source, since: float, until: float) -> Iterator[tuple[float, dict[str, Any]]]:
    """``(at_unix, record)`` of every record in the window, streamed from the ledger."""
    with export_rows(source, Query(tenant=None, since=since, until=until)) as rows:
        for row in rows:
            yield row.at_unix, orjson.loads(row.text)


def _holds_records_before(source: Source, at: float) -> bool:
    with export_rows(source, Query(tenant=None, until=at)) as rows:
        return next(iter(rows), None) is not None


def from_ledger(
    config: FleetConfig, source: Source, *, since: float | None = None,
    until: float | None = None,
) -> EconomicsReport:
    """The report over the last ``economics.window_days`` (or ``since``…``until``); over the
    ledger's span from its first record when it holds none before the window (a young
    ledger's missing days are no data, not idle ones)."""
    end = until if until is not None else time.time()
    start = since if since is not None else end - config.economics.window_days * 86400.0
    young = not _holds_records_before(source, start)
    return analyse(records(source, start, end), config, since=start, until=end,
                   starts_in_window=young)


def _when(at: float) -> str:
    return datetime.fromtimestamp(at, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _span(hours: float) -> str:
    return (f"{hours / 24:.1f} days" if hours >= 48 else f"{hours:.1f} h" if hours >= 1
            else f"{hours * 60:.1f} min")


def _money(x: float | None, unit: str = "") -> str:
    return "-" if x is None else f"{x:,.4f}{unit}" if x < 1 else f"{x:,.2f}{unit}"


def lines(r: EconomicsReport) -> list[str]:
    """A plain-text report (what `inferplane economics` prints)."""
    span = f"{r.hours:.1f} h" if r.hours >= 1 else f"{r.hours * 60:.1f} min"
    asked = _span((r.until - (r.requested_since or r.since)) / 3600)
    if r.ledger_span and r.hours <= 0:
        span = f"no records in the {asked} asked for"
    elif r.ledger_span:
        span += (f" (the ledger's span: its first record is at {_when(r.since)}, inside the "
                 f"{asked} asked for; the days before "
                 "it are no data, not idle)")
    out = [f"window: {span}, {r.requests} served requests", "",
           f"{'pool':<22}{'kind':<18}{'class':<10}{'util':>7}{'band':>8}{'days out':>9}"
           f"{'tokens':>12}{'USD':>11}{'USD/1M tok':>12}{'P99/P50':>9}"]
    for p in r.pools:
        usd = p.owned_usd if p.owned_usd is not None else p.attributed_usd
        div = list(p.divergence.values())[-1] if p.divergence else None
        out.append(
            f"{p.name:<22}{p.kind:<18}{p.capacity_class:<10}{p.utilisation:>7.1%}{p.band:>8}"
            f"{p.days_out_of_band:>9}{p.tokens:>12,}{_money(usd):>11}"
            f"{_money(p.usd_per_mtok):>12}{'-' if div is None else f'{div:.1f}x':>9}"
        )
    out += ["", "cost per 1M tokens by substrate kind (attributed; owned = every hour of every "
            "hourly endpoint):"]
    for kind, u in r.by_kind.items():
        jpt = u["joules_per_token"]
        out.append(f"  {kind:<16} attributed {_money(u['usd_per_mtok']):>10}   owned "
                   f"{_money(u['owned_usd_per_mtok']):>10}   tokens {int(u['tokens'] or 0):,}"
                   f"   {'-' if jpt is None else f'{jpt:.2f}'} J/token")
    out += ["", "cost per 1M tokens by workload class (attributed):"]
    for cls, u in r.by_class.items():
        out.append(f"  {cls:<16} {_money(u['usd_per_mtok']):>10}   requests "
                   f"{int(u['requests'] or 0):,}")
    out += ["", "spillovers by reason: " + (", ".join(f"{k} {v}" for k, v in r.spillovers.items())
                                           or "none")]
    out += ["", "repatriation break-even (provider spend vs owned endpoints at the target "
            "utilisation):"]
    if not r.break_even:
        out.append("  no provider traffic in the window")
    for b in r.break_even:
        if b.owned_usd_per_h is None:
            out.append(f"  {b.model}: provider {_money(b.provider_usd_per_h)} USD/h; no owned "
                       "pool serving it has measured throughput to size against")
            continue
        verdict = "owned capacity pays off" if (b.ratio or 0) > 1 else "the provider is cheaper"
        out.append(
            f"  {b.model}: provider {_money(b.provider_usd_per_h)} USD/h for "
            f"{b.provider_tokens_per_h:,.0f} tokens/h vs {b.endpoints_needed} x {b.owned_pool} "
            f"= {_money(b.owned_usd_per_h)} USD/h (ratio {b.ratio:.2f}: {verdict})"
        )
    out += ["", "reassessment triggers:"]
    out += [f"  [{t.kind}] {t.subject}: {t.detail}" for t in r.triggers] or ["  none"]
    return out


# Every family the collector exports: (name, help, labels). `EconomicsCollector.describe` names
# them (the registry refuses another metric of these names) and docs/metrics.md lists them
# (scripts/gen_metrics_docs.py).
FAMILIES: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("inferplane_economics_pool_utilisation",
     "Busy share (0-1) of each pool's concurrency envelope over the economics window, by pool "
     "and substrate kind", ("pool", "kind")),
    ("inferplane_economics_pool_days_out_of_band",
     "Consecutive days (ending today) each pool's utilisation was outside its band "
     "(economics.band_low, band_high)", ("pool",)),
    ("inferplane_economics_usd_per_mtok",
     "US dollars per million tokens by substrate kind, basis attributed (the requests' "
     "attributed cost) or owned (every hour of hourly endpoints, idle ones included)",
     ("kind", "basis")),
    ("inferplane_economics_joules_per_token",
     "Energy per token by substrate kind, in joules (live power, else envelope or rating)",
     ("kind",)),
    ("inferplane_economics_break_even_ratio",
     "Provider spend per hour / the hourly cost of owned endpoints that could carry it, by "
     "model (> 1: owning would be cheaper)", ("model",)),
    ("inferplane_economics_ttft_divergence_slope",
     "Least-squares slope per day of each pool's daily TTFT P99/P50 (> 0: queueing grows)",
     ("pool",)),
    ("inferplane_economics_trigger",
     "1 for each reassessment trigger that fires, by kind (out_of_band, "
     "provider_past_break_even, divergence_rising) and subject (a pool or a model)",
     ("kind", "subject")),
)


class EconomicsCollector(Collector):
    """Prometheus gauges of the latest report (alert on ``inferplane_economics_trigger``)."""

    def __init__(self) -> None:
        self.report: EconomicsReport | None = None
        self.computed_at: float | None = None

    def describe(self) -> Iterator[GaugeMetricFamily]:
        for name, help_, labels in FAMILIES:
            yield GaugeMetricFamily(name, help_, labels=labels)

    def collect(self) -> Iterator[GaugeMetricFamily]:
        r = self.report
        if r is None:
            return
        util, days, unit, energy, ratio, slope, trig = self.describe()
        for p in r.pools:
            util.add_metric([p.name, p.kind], p.utilisation)
            days.add_metric([p.name], float(p.days_out_of_band))
            if p.divergence_slope is not None:
                slope.add_metric([p.name], p.divergence_slope)
        for kind, u in r.by_kind.items():
            for basis, key in (("attributed", "usd_per_mtok"), ("owned", "owned_usd_per_mtok")):
                if u[key] is not None:
                    unit.add_metric([kind, basis], float(u[key] or 0.0))
            if u["joules_per_token"] is not None:
                energy.add_metric([kind], float(u["joules_per_token"] or 0.0))
        for b in r.break_even:
            if b.ratio is not None:
                ratio.add_metric([b.model], b.ratio)
        for t in r.triggers:
            trig.add_metric([t.kind, t.subject], 1.0)
        yield from (util, days, unit, energy, ratio, slope, trig)


class EconomicsRefresher:
    """The gateway's economics gauges: every ``economics.refresh_s`` the report over the last
    ``window_days`` is recomputed from the configured ledger (in a worker thread, so the event
    loop keeps serving) and published through an `EconomicsCollector` in ``registry``."""

    def __init__(self, config: FleetConfig, source: Source, registry: CollectorRegistry) -> None:
        self.config = config
        self.source = source
        self.collector = EconomicsCollector()
        registry.register(self.collector)
        self._task: asyncio.Task[None] | None = None

    async def refresh(self) -> None:
        report = await asyncio.to_thread(from_ledger, self.config, self.source)
        self.collector.report, self.collector.computed_at = report, time.time()

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop())

    async def _loop(self) -> None:
        while True:
            try:
                await self.refresh()
            except Exception as exc:  # an unreadable ledger must not stop the gateway
                log.warning("economics gauges not refreshed: %s", exc)
            await asyncio.sleep(self.config.economics.refresh_s)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None


def refresher_for(
    config: FleetConfig, file: str, registry: CollectorRegistry
) -> EconomicsRefresher | None:
    """A refresher when gauges are wanted (``economics.refresh_s`` > 0) and the ledger is one
    that can be read back (a file or PostgreSQL); else None."""
    from inferplane.ledger.tools import SourceError, source_from_config

    if config.economics.refresh_s <= 0:
        return None
    try:
        source = source_from_config(config, file)
    except SourceError:
        return None  # records kept in memory only: nothing to read back
    return EconomicsRefresher(config, source, registry)
