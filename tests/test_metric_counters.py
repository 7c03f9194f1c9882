"""The gateway's running totals kept as plain numbers by the code that counts them (event-loop
lag, send gate, stream-coalescing holds) are Prometheus counters read when /metrics is
collected (`telemetry.metrics.SourcedCounters`), under the names they always had; checked with
prometheus_client's own parsers, and no metric in the registry breaks promtool's counter rule
(a name ends in ``_total`` exactly when it is a counter)."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web
from prometheus_client import Counter, generate_latest
from prometheus_client import metrics as prometheus_metrics
from prometheus_client.metrics_core import Metric
from prometheus_client.openmetrics.exposition import generate_latest as openmetrics_latest
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as parse_openmetrics,
)
from prometheus_client.parser import text_string_to_metric_families

from inferplane.api.app import serve
from inferplane.api.pipeline import Gateway
from inferplane.config.loader import parse_config
from inferplane.telemetry.metrics import GatewayMetrics
from tests.support.procs import free_port
from tests.test_dispatch_gate import KEY, HeldUpstream, config

TOTALS = {  # exposed name -> GatewayMetrics attribute
    "inferplane_event_loop_lag_seconds_total": "loop_lost",
    "inferplane_send_gate_requests_total": "send_gate_requests",
    "inferplane_send_gate_groups_total": "send_gate_groups",
    "inferplane_stream_coalesce_holds_total": "coalesce_holds",
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
                   "inferplane_stream_coalesce_holds_total": 11})
    page = generate_latest(m.registry).decode()
    assert {name: _total(page, name) for name in TOTALS} == {
        "inferplane_event_loop_lag_seconds_total": 0.25,
        "inferplane_send_gate_requests_total": 7.0,
        "inferplane_send_gate_groups_total": 3.0,
        "inferplane_stream_coalesce_holds_total": 11.0,
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


def test_created_series_follow_prometheus_clients_switch(monkeypatch: pytest.MonkeyPatch) -> None:
    """With prometheus_client's ``_created`` series off (PROMETHEUS_DISABLE_CREATED_SERIES,
    `disable_created_metrics`), these counters drop theirs too, like its own counters."""
    monkeypatch.setattr(prometheus_metrics, "_use_created", False)
    m = _wired(dict.fromkeys(TOTALS, 1.0))
    Counter("inferplane_test_requests", "a library counter, for comparison", registry=m.registry)
    page = generate_latest(m.registry).decode()
    assert "_created" not in page
    assert all(_total(page, name) == 1.0 for name in TOTALS)


def test_an_unwired_total_is_not_exported_but_its_name_is_taken() -> None:
    m = GatewayMetrics()  # nothing counts in this process: e.g. no dispatcher
    page = generate_latest(m.registry).decode()
    assert not any(name.removesuffix("_total") in page for name in TOTALS)
    with pytest.raises(ValueError, match="Duplicated timeseries"):
        Counter("inferplane_send_gate_requests", "a clash", registry=m.registry)


def test_a_total_never_goes_back() -> None:
    """A source read lower than before (the loop-lag total counts a late tick that has not run
    yet; a ticker stopped before it ran drops it) is exported as the last total: Prometheus
    would read the drop as a restart."""
    source = dict.fromkeys(TOTALS, 0.0)
    m = _wired(source)
    name = "inferplane_event_loop_lag_seconds_total"
    source[name] = 0.5
    assert _total(generate_latest(m.registry).decode(), name) == 0.5
    source[name] = 0.4
    assert _total(generate_latest(m.registry).decode(), name) == 0.5
    source[name] = 0.6
    assert _total(generate_latest(m.registry).decode(), name) == 0.6


# -- served: GET /metrics of a running gateway --------------------------------------------------


@pytest.fixture
async def upstream() -> AsyncIterator[HeldUpstream]:
    up = HeldUpstream()
    up.hold.set()  # answers at once
    runner = web.AppRunner(up.app())
    await runner.setup()
    up.port = free_port()
    await web.TCPSite(runner, "127.0.0.1", up.port).start()
    try:
        yield up
    finally:
        await runner.cleanup()


async def test_a_served_gateways_metrics_move_with_their_sources(
    upstream: HeldUpstream,
) -> None:
    """With ``send_bursts_together``, requests move the send-gate counters; a stall of the
    gateway's loop moves the loop-lag counter; each scrape shows the sources as they are."""
    text = config(upstream.port)
    assert text.count("gateway: {") == 1
    text = text.replace(
        "gateway: {", "gateway: {send_bursts_together: true, metrics: {public: true}, ")
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
            assert _total(page, "inferplane_stream_coalesce_holds_total") == 0.0  # not streamed
            lost = _total(page, "inferplane_event_loop_lag_seconds_total")
            assert lost > _total(first, "inferplane_event_loop_lag_seconds_total")
            assert lost <= gw.lag.lost_now()
    finally:
        await runner.cleanup()
