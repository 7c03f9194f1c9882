"""The Envoy picker serves its Prometheus page (issue 13 follow-ups): ``epp.metrics_port`` (or
``inferplane epp --metrics-port``) opens a ``GET /metrics`` listener on ``epp.metrics_host``
(127.0.0.1 unless set), with no key, like the gateway's ``gateway.metrics.port``. The page has
the picker's own families (decisions by result, pick latency, reaped flights) beside the
core's (placements, ejections, endpoint health). Over real gRPC and HTTP on loopback."""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from inferplane.config.loader import parse_config
from inferplane.epp.server import Exchange, Picker, serve
from inferplane.errors import ConfigError
from inferplane.fleet.scraper import StaticMetricsSource
from tests.support.procs import free_port
from tests.test_epp_stream import body, error_of, exchange, fleet_config, headers
from tests.test_epp_stream import picker as stream_picker


def picker(metrics_port: int | None) -> contextlib.AbstractAsyncContextManager[
        tuple[Picker, Any]]:
    """test_epp_stream's picker with ``epp.metrics_port`` set where given."""
    epp: dict[str, Any] = {} if metrics_port is None else {"metrics_port": metrics_port}
    return stream_picker(fleet_config(epp=epp))


def _samples(page: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(page) for s in f.samples}


async def _get(url: str) -> tuple[int, str, str]:
    async with aiohttp.ClientSession() as s, s.get(url) as r:
        return r.status, r.headers.get("Content-Type", ""), await r.text()


async def test_the_picker_serves_its_page_with_its_own_families() -> None:
    mport = free_port()
    async with picker(mport) as (_p, stub):
        routed = await exchange(stub, headers(), body())
        assert routed[1].WhichOneof("response") == "request_body"
        refused = await exchange(stub, headers({"authorization": "Bearer nope"}), body())
        assert error_of(refused[1])[0] == 401
        models = await exchange(stub, headers({":method": "GET", ":path": "/v1/models"},
                                              end=True))
        assert models[0].immediate_response.status.code == 200
        status, ctype, page = await _get(f"http://127.0.0.1:{mport}/metrics")
    assert status == 200 and ctype.startswith("text/plain")
    samples = _samples(page)
    assert samples[("inferplane_epp_decisions_total",
                    (("api", "chat"), ("result", "routed")))] == 1.0
    assert samples[("inferplane_epp_decisions_total", (("api", "chat"), ("result", "401")))] == 1
    assert samples[("inferplane_epp_decisions_total",
                    (("api", "models"), ("result", "200")))] == 1.0
    assert samples[("inferplane_epp_pick_seconds_count", ())] == 2.0  # the two with a body
    types = {f.name: f.type for f in text_string_to_metric_families(page)}
    assert types["inferplane_epp_decisions"] == "counter"
    assert types["inferplane_epp_pick_seconds"] == "histogram"
    assert types["inferplane_epp_flights_reaped"] == "counter"
    assert types["inferplane_endpoint_ejections"] == "counter"
    # the core's gauges are set from live state when the page is read, as on the gateway's
    assert ("inferplane_endpoint_healthy", (("endpoint", "a"),)) in samples
    assert samples[("inferplane_placement_plugin_seconds_count",
                    next(k[1] for k in samples
                         if k[0] == "inferplane_placement_plugin_seconds_count"))] >= 1


async def test_no_listener_unless_a_metrics_port_is_set() -> None:
    """``epp.metrics_port`` unset: the picker listens for gRPC only (several pickers on one
    host, as the benchmarks run them, do not contend for a port)."""
    async with picker(None) as (p, _stub):
        assert p.metrics_runner is None


async def test_the_listener_binds_loopback_by_default_and_stops_with_the_picker() -> None:
    mport = free_port()
    async with picker(mport) as (p, _stub):
        assert p.config.epp.metrics_host == "127.0.0.1"
        assert p.metrics_runner is not None
        addresses = p.metrics_runner.addresses
        assert [a[0] for a in addresses] == ["127.0.0.1"]
        status, ctype, text = await _get(f"http://127.0.0.1:{mport}/nothing")
        # the gateway's metrics listener's answer (`api.metrics_listener`): OpenAI-shaped
        assert status == 404 and ctype.startswith("application/json")
        assert json.loads(text)["error"]["message"] == "no route GET /nothing"
    with pytest.raises(aiohttp.ClientConnectionError):
        await _get(f"http://127.0.0.1:{mport}/metrics")


async def test_a_metrics_port_in_use_is_a_start_up_error_naming_it() -> None:
    blocker = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    taken = blocker.sockets[0].getsockname()[1]
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("EPP_TEST_KEY", "sk-hosted")
            p = Picker(parse_config(fleet_config(epp={"metrics_port": taken})),
                       metrics_source=StaticMetricsSource())
        with pytest.raises(OSError, match=r"epp\.metrics_port"):
            await serve(p, "127.0.0.1", free_port())
    finally:
        blocker.close()
        await blocker.wait_closed()


def test_a_metrics_port_on_the_pickers_own_port_is_a_config_error() -> None:
    """Refused when the file is read, naming ``metrics_port``, not later by gRPC's bind."""
    for hosts in ({}, {"host": "0.0.0.0"}, {"metrics_host": "0.0.0.0"}):
        with pytest.raises(ConfigError, match="metrics_port 9100 is the picker's gRPC port"):
            parse_config(fleet_config(epp={"port": 9100, "metrics_port": 9100, **hosts}))
    ok = parse_config(fleet_config(epp={"port": 9100, "metrics_port": 9100,
                                        "host": "127.0.0.1", "metrics_host": "127.0.0.2"}))
    assert ok.epp.metrics_port == 9100


@pytest.mark.parametrize("where", ["pick", "_route"])
async def test_a_bug_in_the_pick_is_counted_as_a_500_and_timed(
        where: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Before a flight is reserved (``pick``, answered 500) and after (``_route``: nothing is
    answered, Envoy's message timeout decides): one ``result="500"`` and one pick observed."""

    def boom(*_: Any, **__: Any) -> Any:
        raise RuntimeError("a bug")

    if where == "pick":
        async def aboom(*_: Any) -> Any:
            boom()
        monkeypatch.setattr(Exchange, "pick", aboom)
    else:
        monkeypatch.setattr(Exchange, "_route", boom)
    mport = free_port()
    async with picker(mport) as (_p, stub):
        answers = await exchange(stub, headers(), body())
        _, _, page = await _get(f"http://127.0.0.1:{mport}/metrics")
    if where == "pick":
        assert error_of(answers[-1])[0] == 500
    else:
        assert all(a.WhichOneof("response") != "immediate_response" for a in answers)
    samples = _samples(page)
    assert samples[("inferplane_epp_decisions_total", (("api", "chat"), ("result", "500")))] == 1
    assert samples[("inferplane_epp_pick_seconds_count", ())] == 1.0
