"""OpenTelemetry in process, with the SDK's in-memory span exporter and metric reader: one trace
per request through the core (server span; admit, place and upstream children), the GenAI
attributes and metrics, ``traceparent`` in and out, on success, 4xx, upstream failure with
re-placement, streaming, and the Envoy picker. And: off by default, without importing the SDK."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import AsyncIterator
from types import SimpleNamespace
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
)
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from inferplane.api.app import serve
from inferplane.api.pipeline import Gateway
from inferplane.config.loader import parse_config
from inferplane.epp import protocol as P
from inferplane.telemetry.otel import OtelTelemetry, parse_headers
from inferplane.telemetry.tracing import DISABLED
from tests.builders import endpoint, model, pool_fleet, tenant, to_yaml
from tests.support.fake_upstream import build
from tests.support.otlp_receiver import attributes
from tests.support.procs import free_port
from tests.test_epp_stream import body as epp_body
from tests.test_epp_stream import exchange, settled
from tests.test_epp_stream import headers as epp_headers
from tests.test_epp_stream import picker as epp_picker

KEY = "sk-otel"
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
TRACEPARENT = f"00-{TRACE_ID}-00f067aa0ba902b7-01"
CHAT = {"model": "m", "messages": [{"role": "user", "content": "hello there"}], "max_tokens": 5}
SEEN: web.AppKey[list[dict[str, str]]] = web.AppKey("seen", list)


def _upstream(name: str, mode: str) -> web.Application:
    """The test upstream, noting each API request's headers."""
    app = build(name, mode, 0.0)
    app[SEEN] = []

    @web.middleware
    async def note(request: web.Request, handler: Any) -> web.StreamResponse:
        if request.path.startswith("/v1/"):
            request.app[SEEN].append(dict(request.headers))
        return await handler(request)  # type: ignore[no-any-return]

    app.middlewares.append(note)
    return app


def metric_points(tel: OtelTelemetry) -> dict[str, list[Any]]:
    data = tel.metrics_request()
    out: dict[str, list[Any]] = {}
    if data is None:
        return out
    req = ExportMetricsServiceRequest.FromString(data)
    for rm in req.resource_metrics:
        for sm in rm.scope_metrics:
            for m in sm.metrics:
                assert m.histogram.aggregation_temporality == 2  # cumulative
                out.setdefault(m.name, []).extend(
                    SimpleNamespace(attributes=attributes(p.attributes), sum=p.sum,
                                    count=p.count, buckets=list(p.bucket_counts),
                                    bounds=list(p.explicit_bounds))
                    for p in m.histogram.data_points)
    return out


class Stack:
    def __init__(self) -> None:
        self.spans = InMemorySpanExporter()
        self.runners: list[web.AppRunner] = []
        self.apps: dict[str, web.Application] = {}
        self.gw: Gateway

    async def start(self) -> None:
        ports = {}
        for name, mode in (("ok", "ok"), ("bad", "fail500")):
            app = _upstream(name, mode)
            runner = web.AppRunner(app)
            await runner.setup()
            ports[name] = free_port()
            await web.TCPSite(runner, "127.0.0.1", ports[name]).start()
            self.runners.append(runner)
            self.apps[name] = app
        gw_port = free_port()
        config = parse_config(to_yaml(pool_fleet(
            gateway={"port": gw_port, "seed": 1}, substrate={"name": "pool", "kind": "gpu"},
            telemetry={"enabled": True, "tenant_attribute": True},
            endpoints=[endpoint("ok", ports["ok"], models=[model(), model("flaky")]),
                       endpoint("bad", ports["bad"], models=[model("flaky"), model("broken")])],
            tenants=[tenant("t", KEY)])))
        self.gw = Gateway(config)
        self.gw.telemetry.shutdown()  # the OTLP one the file asked for: replaced by in-memory
        self.gw.telemetry = self.tel = OtelTelemetry(config, span_exporter=self.spans)
        self.runners.append(await serve(self.gw, "127.0.0.1", gw_port))
        self.url = f"http://127.0.0.1:{gw_port}/v1/chat/completions"

    async def post(self, body: object, **headers: str) -> tuple[int, bytes, dict[str, str]]:
        h = {"Authorization": f"Bearer {KEY}", **headers}
        async with aiohttp.ClientSession() as s, s.post(self.url, json=body, headers=h) as r:
            return r.status, await r.read(), dict(r.headers)

    def trace(self, trace_id: int | None = None) -> dict[str, list[ReadableSpan]]:
        """The finished spans of one trace (the last server span's when not named), by name
        prefix."""
        spans = list(self.spans.get_finished_spans())
        if trace_id is None:
            server = [s for s in spans if s.kind == SpanKind.SERVER]
            assert server, "no server span"
            trace_id = server[-1].context.trace_id  # type: ignore[union-attr]
        out: dict[str, list[ReadableSpan]] = {}
        for s in spans:
            if s.context is not None and s.context.trace_id == trace_id:
                kind = {SpanKind.SERVER: "server", SpanKind.CLIENT: "upstream"}.get(
                    s.kind, s.name)
                out.setdefault(kind, []).append(s)
        return out

    def metrics(self) -> dict[str, list[Any]]:
        """The GenAI histograms' points, decoded from the OTLP request the exporter would
        send."""
        return metric_points(self.tel)

    async def stop(self) -> None:
        for r in reversed(self.runners):
            await r.cleanup()


@pytest.fixture
async def stack() -> AsyncIterator[Stack]:
    s = Stack()
    await s.start()
    try:
        yield s
    finally:
        await s.stop()


def _parent(child: ReadableSpan, parent: ReadableSpan) -> bool:
    return child.parent is not None and child.parent.span_id == parent.context.span_id  # type: ignore[union-attr]


async def test_a_request_is_one_trace_that_continues_the_callers_and_goes_upstream(
    stack: Stack,
) -> None:
    status, _, headers = await stack.post(CHAT, traceparent=TRACEPARENT)
    assert status == 200
    t = stack.trace(int(TRACE_ID, 16))
    (server,), (admit,), (place,), (up,) = t["server"], t["admit"], t["place"], t["upstream"]
    assert server.parent is not None and server.parent.span_id == 0x00F067AA0BA902B7
    assert server.parent.is_remote
    for child in (admit, place, up):
        assert _parent(child, server)
    assert server.name == "chat m" and up.name == "chat m"
    a = server.attributes or {}
    assert a["gen_ai.operation.name"] == "chat"
    assert a["gen_ai.request.model"] == "m" and a["gen_ai.response.model"] == "m"
    assert a["gen_ai.request.max_tokens"] == 5
    assert a["gen_ai.usage.input_tokens"] == 7 and a["gen_ai.usage.output_tokens"] == 5
    assert a["inferplane.decision_id"] == headers["x-inferplane-decision-id"]
    assert a["inferplane.endpoint"] == "ok" and a["inferplane.pool"] == "pool"
    assert a["inferplane.substrate"] == "gpu" and a["inferplane.workload_class"]
    assert a["inferplane.tenant"] == "t" and a["http.response.status_code"] == 200
    assert "error.type" not in a and server.status.status_code != StatusCode.ERROR
    u = up.attributes or {}
    assert u["server.address"] == "127.0.0.1" and isinstance(u["server.port"], int)
    assert u["inferplane.endpoint"] == "ok" and u["gen_ai.usage.output_tokens"] == 5
    assert (place.attributes or {})["inferplane.decision_id"] == a["inferplane.decision_id"]
    # the upstream request carried the trace on, its parent the upstream span
    sent = stack.apps["ok"][SEEN][-1]
    up_ctx = up.context
    assert up_ctx is not None
    assert sent["traceparent"] == f"00-{TRACE_ID}-{up_ctx.span_id:016x}-01"
    m = stack.metrics()
    usage = {p.attributes["gen_ai.token.type"]: p for p in m["gen_ai.client.token.usage"]}
    assert usage["input"].sum == 7 and usage["output"].sum == 5
    assert usage["input"].attributes["gen_ai.request.model"] == "m"
    (dur,) = m["gen_ai.server.request.duration"]
    assert dur.count == 1 and "error.type" not in dur.attributes
    assert "gen_ai.server.time_to_first_token" not in m  # a non-streamed answer has no TTFT


async def test_a_stream_records_its_first_token_and_usage(stack: Stack) -> None:
    status, data, _ = await stack.post({**CHAT, "stream": True})
    assert status == 200 and data.rstrip().endswith(b"[DONE]")
    t = stack.trace()
    a = t["server"][0].attributes or {}
    assert a["gen_ai.usage.output_tokens"] == 5 and a["inferplane.ttft_s"] > 0
    assert "traceparent" in stack.apps["ok"][SEEN][-1]  # a fresh trace goes upstream too
    m = stack.metrics()
    (ttft,) = m["gen_ai.server.time_to_first_token"]
    assert ttft.count == 1 and ttft.sum > 0
    assert "gen_ai.server.time_per_output_token" not in m  # on the spans only
    assert a["inferplane.tpot_s"] >= 0


async def test_a_4xx_is_a_server_span_with_its_error_type_and_no_placement(
    stack: Stack,
) -> None:
    status, _, _ = await stack.post({**CHAT, "model": "nope"})
    assert status == 404
    t = stack.trace()
    (server,) = t["server"]
    a = server.attributes or {}
    assert a["error.type"] == "model_not_found" and a["http.response.status_code"] == 404
    assert server.status.status_code != StatusCode.ERROR  # the client's error, not ours
    assert "place" not in t and "upstream" not in t
    (dur,) = stack.metrics()["gen_ai.server.request.duration"]
    assert dur.attributes["error.type"] == "model_not_found"
    async with aiohttp.ClientSession() as s, s.post(stack.url, json=CHAT) as r:
        assert r.status == 401
    assert (stack.trace()["server"][0].attributes or {})["error.type"] == "missing_api_key"


async def test_an_upstream_failure_is_a_failed_attempt_then_a_re_placement(
    stack: Stack,
) -> None:
    for _ in range(12):  # until a request lands on the failing endpoint first
        stack.spans.clear()
        status, _, _ = await stack.post({**CHAT, "model": "flaky"})
        assert status == 200
        t = stack.trace()
        if len(t["upstream"]) == 2:
            break
    else:
        pytest.skip("placement never tried the failing endpoint first")
    first, second = sorted(t["upstream"], key=lambda s: s.start_time or 0)
    assert (first.attributes or {})["inferplane.endpoint"] == "bad"
    assert (first.attributes or {})["error.type"] == "http_500"
    assert first.status.status_code == StatusCode.ERROR
    assert (second.attributes or {})["inferplane.endpoint"] == "ok"
    assert (second.attributes or {})["inferplane.attempt"] == 2
    assert second.status.status_code != StatusCode.ERROR
    assert len(t["place"]) == 2
    a = t["server"][0].attributes or {}
    assert a["inferplane.attempts"] == 2 and a["inferplane.endpoint"] == "ok"


async def test_an_upstream_that_fails_every_attempt_is_a_502_error_span(stack: Stack) -> None:
    status, _, _ = await stack.post({**CHAT, "model": "broken"})
    assert status == 502
    t = stack.trace()
    (server,) = t["server"]
    assert server.status.status_code == StatusCode.ERROR
    assert (server.attributes or {})["error.type"] == "upstream_error"
    assert all(s.status.status_code == StatusCode.ERROR for s in t["upstream"])


async def test_the_picker_traces_what_it_sees_and_hands_envoy_the_traceparent() -> None:
    spans = InMemorySpanExporter()
    async with epp_picker() as (p, stub):
        p.telemetry = OtelTelemetry(p.config, span_exporter=spans)
        response = pb.ProcessingRequest(response_headers=pb.HttpHeaders(
            headers=base_pb2.HeaderMap(headers=[
                base_pb2.HeaderValue(key=":status", raw_value=b"200")]),
            end_of_stream=True,
        ))
        answers = await exchange(stub, epp_headers({"traceparent": TRACEPARENT}), epp_body(),
                                 response)
        sets = {h.header.key: h.header.raw_value.decode()
                for h in answers[1].request_body.response.header_mutation.set_headers}
        await settled(p)
        bad = await exchange(stub, epp_headers({"authorization": "Bearer nope"}), epp_body())
        assert bad[1].immediate_response.status.code == 401
    by_name = {s.kind: s for s in spans.get_finished_spans()
               if s.context and s.context.trace_id == int(TRACE_ID, 16)}
    server, up = by_name[SpanKind.SERVER], by_name[SpanKind.CLIENT]
    a = server.attributes or {}
    assert a["inferplane.decision_id"] == sets[P.DECISION_HEADER]
    assert a["http.response.status_code"] == 200 and a["gen_ai.request.model"] == "m"
    up_ctx = up.context
    assert up_ctx is not None
    assert sets["traceparent"] == f"00-{TRACE_ID}-{up_ctx.span_id:016x}-01"
    assert (up.attributes or {})["inferplane.endpoint"] == a["inferplane.endpoint"]
    names = {s.name for s in spans.get_finished_spans()}
    assert {"admit", "place"} <= names
    refused = [s for s in spans.get_finished_spans()
               if (s.attributes or {}).get("error.type") == "invalid_api_key"]
    assert len(refused) == 1


def test_headers_from_the_environment_format() -> None:
    assert parse_headers("api-key=a%20b, X-Team=ml,broken") == {"api-key": "a b", "x-team": "ml"}


def test_off_by_default_and_the_sdk_is_not_imported() -> None:
    code = """
import sys
from inferplane.api.pipeline import Gateway
from inferplane.config.loader import parse_config
gw = Gateway(parse_config('''
substrates:
  - {name: p, kind: gpu, hardware: h100, region: r, jurisdiction: eu, cost: {hourly_usd: 1},
     endpoints: [{name: e, url: "http://127.0.0.1:9", models: [{name: m, profile: llama-3.1-8b,
     max_context: 4096}]}]}
'''))
assert not gw.telemetry.enabled
print(sorted(m for m in sys.modules if m.startswith("opentelemetry.sdk")))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=60)
    assert out.stdout.strip() == "[]"
    assert not DISABLED.enabled
