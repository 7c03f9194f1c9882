"""The gateway's running totals kept as plain numbers by the code that counts them (event-loop
lag, send gate, stream-coalescing holds, engine scrapes and health probes) are Prometheus
counters read when /metrics is collected (`telemetry.metrics.SourcedCounters`), under the names
they always had; checked with prometheus_client's own parsers, and no metric in the registry
breaks promtool's counter rule (a name ends in ``_total`` exactly when it is a counter)."""

from __future__ import annotations

import asyncio
import re
import time

import aiohttp
import prometheus_client
import pytest
from prometheus_client import Counter, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.openmetrics.exposition import generate_latest as openmetrics_latest
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as parse_openmetrics,
)
from prometheus_client.parser import text_string_to_metric_families

from inferplane.api.app import serve
from inferplane.api.pipeline import Gateway
from inferplane.config.loader import parse_config
from inferplane.telemetry.metrics import GatewayMetrics, created_series
from tests import test_send_gate
from tests.support.held_upstream import KEY, HeldUpstream, config
from tests.support.procs import free_port

TOTALS = {  # exposed name -> GatewayMetrics attribute
    "inferplane_event_loop_lag_seconds_total": "loop_lost",
    "inferplane_send_gate_requests_total": "send_gate_requests",
    "inferplane_send_gate_groups_total": "send_gate_groups",
    "inferplane_stream_coalesce_holds_total": "coalesce_holds",
    "inferplane_engine_scrapes_total": "engine_scrapes",
    "inferplane_health_probes_total": "health_probes",
}


def _wired(source: dict[str, float]) -> GatewayMetrics:
    m = GatewayMetrics()
    for name, attr in TOTALS.items():
        getattr(m, attr).count_from(lambda name=name: source[name])
    return m


def _types(page: str) -> dict[str, str]:
    """``# TYPE`` of each metric name on a text-format page."""
    return dict(re.findall(r"^# TYPE (\S+) (\S+)$", page, re.M))


def _families(page: str) -> dict[str, Metric]:
    return {f.name: f for f in text_string_to_metric_families(page)}


def _total(page: str, name: str) -> float:
    """The one sample named ``name`` of a counter family on a text-format page."""
    family = _families(page)[name.removesuffix("_total")]
    assert family.type == "counter"
    [sample] = [s for s in family.samples if s.name == name]
    assert sample.labels == {}
    return sample.value


def test_the_totals_are_counters_under_their_names_read_at_each_collect() -> None:
    source = dict.fromkeys(TOTALS, 0.0)
    before = time.time()
    m = _wired(source)
    after = time.time()
    page = generate_latest(m.registry).decode()
    types = _types(page)
    for name in TOTALS:
        assert types[name] == "counter"
        assert _total(page, name) == 0.0
        # ``_created`` as prometheus_client's own counters export it: a gauge beside the family
        base = name.removesuffix("_total")
        assert types[base + "_created"] == "gauge"
        [created] = _families(page)[base + "_created"].samples
        assert before <= created.value <= after
    source.update({"inferplane_event_loop_lag_seconds_total": 0.25,
                   "inferplane_send_gate_requests_total": 7,
                   "inferplane_send_gate_groups_total": 3,
                   "inferplane_stream_coalesce_holds_total": 11,
                   "inferplane_engine_scrapes_total": 40,
                   "inferplane_health_probes_total": 4})
    page = generate_latest(m.registry).decode()
    assert {name: _total(page, name) for name in TOTALS} == {
        "inferplane_event_loop_lag_seconds_total": 0.25,
        "inferplane_send_gate_requests_total": 7.0,
        "inferplane_send_gate_groups_total": 3.0,
        "inferplane_stream_coalesce_holds_total": 11.0,
        "inferplane_engine_scrapes_total": 40.0,
        "inferplane_health_probes_total": 4.0,
    }
    # the lines a scraper greps for (bench/peers/cpu_per_request.py, bench/soak.py) are unchanged
    assert re.search(r"^inferplane_stream_coalesce_holds_total 11\.0$", page, re.M)
    assert re.search(r"^inferplane_event_loop_lag_seconds_total 0\.25$", page, re.M)


def test_every_total_in_the_registry_is_a_counter_and_every_counter_a_total() -> None:
    """promtool check metrics' counter rule over the whole registry (not promtool itself: it
    is not installed here): a counter's name ends in _total, and no other type's does. The four
    totals were gauges named ..._total before."""
    m = _wired(dict.fromkeys(TOTALS, 1.0))
    types = _types(generate_latest(m.registry).decode())
    assert set(TOTALS) <= set(types)
    bad = {name: typ for name, typ in types.items()
           if name.endswith("_total") != (typ == "counter")}
    assert bad == {}


def test_the_openmetrics_form_is_a_counter_too() -> None:
    """The gateway serves the text format only; a scraper rendering the registry as
    OpenMetrics gets families named without _total, of type counter, with ``_total`` and
    ``_created`` samples (and the loop lag's unit)."""
    m = _wired(dict.fromkeys(TOTALS, 2.0))
    families = {f.name: f for f in parse_openmetrics(openmetrics_latest(m.registry).decode())}
    for name in TOTALS:
        family = families[name.removesuffix("_total")]
        assert family.type == "counter"
        assert sorted(s.name for s in family.samples) == [
            name.removesuffix("_total") + "_created", name]
        assert [s.value for s in family.samples if s.name == name] == [2.0]
    assert families["inferplane_event_loop_lag_seconds"].unit == "seconds"


def test_created_series_follow_prometheus_clients_switch() -> None:
    """With prometheus_client's ``_created`` series off (PROMETHEUS_DISABLE_CREATED_SERIES,
    `disable_created_metrics`), these counters drop theirs too, like its own counters; turned
    back on, they have them again (the switch is read at each collect)."""
    m = _wired(dict.fromkeys(TOTALS, 1.0))
    Counter("inferplane_test_requests", "a library counter, for comparison", registry=m.registry)
    was_on = created_series()
    try:
        prometheus_client.enable_created_metrics()
        on = generate_latest(m.registry).decode()
        prometheus_client.disable_created_metrics()
        off = generate_latest(m.registry).decode()
    finally:  # as it was (off where the environment says PROMETHEUS_DISABLE_CREATED_SERIES)
        if was_on:
            prometheus_client.enable_created_metrics()
        else:
            prometheus_client.disable_created_metrics()
    assert "inferplane_test_requests_created" in _types(on)
    for name in TOTALS:
        assert name.removesuffix("_total") + "_created" in _types(on)
    assert "_created" not in off
    assert all(_total(off, name) == 1.0 for name in TOTALS)


def test_an_unwired_total_is_not_exported_but_its_name_is_taken() -> None:
    m = GatewayMetrics()  # nothing counts in this process: e.g. no dispatcher
    page = generate_latest(m.registry).decode()
    assert not any(name.removesuffix("_total") in page for name in TOTALS)
    with pytest.raises(ValueError, match="Duplicated timeseries"):
        Counter("inferplane_send_gate_requests", "a clash", registry=m.registry)


def test_a_total_is_exported_as_read_so_a_source_that_restarts_shows_as_a_reset() -> None:
    """No clamp: a source that went back to 0 (an object replaced, counting anew) is exported
    as it is, which Prometheus reads as a counter reset, instead of a flat line at the old
    total that would hide the new increments. (The loop-lag source never goes down:
    test_looplag.py's test_stopping_the_ticker_books_a_pending_late_tick.)"""
    source = dict.fromkeys(TOTALS, 0.0)
    m = _wired(source)
    for name in TOTALS:
        source[name] = 5.0
        assert _total(generate_latest(m.registry).decode(), name) == 5.0
        source[name] = 1.0
        assert _total(generate_latest(m.registry).decode(), name) == 1.0


# -- served: GET /metrics of a running gateway --------------------------------------------------


upstream = test_send_gate.upstream  # the fixture: an upstream that answers at once


async def test_a_served_gateways_metrics_move_with_their_sources(
    upstream: HeldUpstream,
) -> None:
    """With ``send_bursts_together``, requests move the send-gate counters; a stall of the
    gateway's loop moves the loop-lag counter; each scrape shows the sources as they are."""
    text = config(upstream.port, send_bursts_together=True, metrics={"public": True})
    gw = Gateway(parse_config(text))
    port = free_port()
    runner = await serve(gw, "127.0.0.1", port)
    base = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {KEY}"}) as http:

            async def scrape() -> str:
                async with http.get(base + "/metrics") as r:
                    assert r.status == 200
                    return await r.text()

            async def chat(i: int) -> None:
                body = {"model": "m", "max_tokens": 5,
                        "messages": [{"role": "user", "content": f"prompt {i}"}]}
                async with http.post(base + "/v1/chat/completions", json=body) as r:
                    assert r.status == 200, await r.text()

            first = await scrape()
            assert {name: _types(first)[name] for name in TOTALS} == dict.fromkeys(
                TOTALS, "counter")
            assert _total(first, "inferplane_send_gate_requests_total") == 0.0
            assert _total(first, "inferplane_send_gate_groups_total") == 0.0

            await asyncio.gather(*(chat(i) for i in range(3)))
            time.sleep(0.3)  # the loop stalls: a tick due meanwhile (every 0.1 s) runs late
            page = await scrape()
            assert _total(page, "inferplane_send_gate_requests_total") == gw.turn_gate.held == 3
            assert _total(page, "inferplane_send_gate_groups_total") == gw.turn_gate.groups >= 1
            # nothing streamed; the holds counter moving is test_stream_coalesce.py's check
            assert _total(page, "inferplane_stream_coalesce_holds_total") == 0.0
            # the tick due during the stall was due at most one interval after it began, and
            # has run late (or is pending) since: at least 0.3 s less one interval, however
            # loaded the host (lateness only adds)
            rose = (_total(page, "inferplane_event_loop_lag_seconds_total")
                    - _total(first, "inferplane_event_loop_lag_seconds_total"))
            assert rose >= 0.3 - gw.lag.interval_s - 1e-6
    finally:
        await runner.cleanup()


async def test_a_served_gateway_counts_its_scrapes_and_probes_of_the_engines(
    upstream: HeldUpstream,
) -> None:
    """What the gateway asks of the engines besides the requests it routes: every /metrics
    page it asks an engine for and every health probe it sends, from its scraper's own counts
    (the start-up scrape and probe included)."""
    gw = Gateway(parse_config(config(upstream.port, metrics={"public": True})))
    port = free_port()
    runner = await serve(gw, "127.0.0.1", port)
    try:
        scraper = gw.scraper
        assert scraper is not None and scraper.scrapes >= 1 and scraper.probes >= 1  # prime
        deadline = time.monotonic() + 10
        while scraper.scrapes < 3 and time.monotonic() < deadline:  # every 0.05 s, or backed off
            await asyncio.sleep(0.05)
        assert scraper.scrapes >= 3
        async with aiohttp.ClientSession() as http:
            lo = (scraper.scrapes, scraper.probes)
            async with http.get(f"http://127.0.0.1:{port}/metrics") as r:
                assert r.status == 200
                page = await r.text()
            hi = (scraper.scrapes, scraper.probes)
        assert lo[0] <= _total(page, "inferplane_engine_scrapes_total") <= hi[0]
        assert lo[1] <= _total(page, "inferplane_health_probes_total") <= hi[1]
    finally:
        await runner.cleanup()


async def test_the_served_page_has_no_created_series() -> None:
    """The gateway's and the picker's page (`Core.metrics_page`) leaves out prometheus_client's
    ``_created`` samples even where the library writes them: every other family and sample is
    there. (51 such series on the quickstart's page; one per endpoint and labelled family at
    2,000 endpoints.)"""
    from tests.builders import MINIMAL_YAML

    gw = Gateway(parse_config(MINIMAL_YAML, "fleet.yaml"))
    for kind in ("error_rate", "stale", "ttft"):
        gw.metrics.endpoint_ejections.labels("e", kind).inc()
    was_on = created_series()
    try:
        prometheus_client.enable_created_metrics()
        served = gw.metrics_page().decode()
        full = generate_latest(gw.metrics.registry).decode()
    finally:
        if not was_on:
            prometheus_client.disable_created_metrics()
    assert "_created" in full and "_created" not in served

    def names(page: str) -> set[str]:
        return {s.name for f in text_string_to_metric_families(page) for s in f.samples}

    assert names(served) == {n for n in names(full) if not n.endswith("_created")}
    assert 'inferplane_endpoint_ejections_total{endpoint="e",reason_kind="ttft"} 1.0' in served
