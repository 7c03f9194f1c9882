"""The picker's ext_proc streams driven directly over gRPC (no Envoy): malformed streams,
streams that end early, both subset-hint encodings. Each ends with nothing held: no flight left
and no reservation."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import orjson
import pytest
from envoy.config.core.v3 import base_pb2
from envoy.service.accesslog.v3 import als_pb2, als_pb2_grpc
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc
from prometheus_client import generate_latest

from inferplane.admission.sqlite_state import SqliteStore
from inferplane.config.loader import parse_config
from inferplane.epp import protocol as P
from inferplane.epp import server as epp_server
from inferplane.epp.server import Picker, serve
from inferplane.fleet.scraper import StaticMetricsSource
from inferplane.ledger.build import build_ledger
from tests.builders import endpoint, model, pool_fleet, tenant, to_yaml
from tests.support.procs import free_port

KEY = "sk-stream"


def fleet_config(c_fields: dict[str, Any] | None = None, **sections: Any) -> str:
    """The picker's fleet file: two engines and two providers; ``c_fields`` adds to endpoint
    ``c``, ``sections`` are further blocks (``gateway``, ``epp``)."""
    return to_yaml(pool_fleet(endpoints=[
        endpoint("a", url="http://10.0.0.1:8000"),
        endpoint("b", url="http://10.0.0.2:8000"),
        endpoint("c", url="https://api.example.com/openai/v1", api_key_env="EPP_TEST_KEY",
                 models=[model(upstream_name="m-hosted")], **(c_fields or {})),
        endpoint("d", url="https://api.anthropic.example", dialect="anthropic"),
    ], tenants=[tenant("t", KEY)], **sections))


CONFIG = fleet_config()
BODY = orjson.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}],
                     "max_tokens": 4})


def headers(extra: dict[str, str] | None = None, *, end: bool = False) -> Any:
    h = {":method": "POST", ":path": "/v1/chat/completions", "authorization": f"Bearer {KEY}",
         **(extra or {})}
    return pb.ProcessingRequest(request_headers=pb.HttpHeaders(
        headers=base_pb2.HeaderMap(headers=[
            base_pb2.HeaderValue(key=k, raw_value=v.encode()) for k, v in h.items()
        ]),
        end_of_stream=end,
    ))


def body(data: bytes = BODY) -> Any:
    return pb.ProcessingRequest(request_body=pb.HttpBody(body=data, end_of_stream=True))


@contextlib.asynccontextmanager
async def picker(config: str = CONFIG) -> AsyncIterator[tuple[Picker, Any]]:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("EPP_TEST_KEY", "sk-hosted")
        p = Picker(parse_config(config), metrics_source=StaticMetricsSource())
    port = free_port()
    server, _ = await serve(p, "127.0.0.1", port)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield p, pb_grpc.ExternalProcessorStub(channel)
    finally:
        await channel.close()
        await server.stop(0)
        await p.stop()


def down(p: Picker, *names: str) -> None:
    """Endpoints fail their probes from now on (and are marked down at once)."""
    source = p._metrics_source
    assert isinstance(source, StaticMetricsSource)
    for name in names:
        source.health[name] = False
        p.live.set_health(name, False)


async def settled(p: Picker, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not p.flights and all(r.inflight == 0 for r in p.live.live.values()):
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"flights left: {list(p.flights)}")


async def exchange(stub: Any, *messages: Any) -> list[Any]:
    """Send the messages on one stream, half-close it, collect every answer."""
    call = stub.Process()
    for m in messages:
        await call.write(m)
    await call.done_writing()
    return [r async for r in call]


def error_of(resp: Any) -> tuple[int, dict[str, Any]]:
    ir = resp.immediate_response
    return ir.status.code, orjson.loads(ir.body)["error"]


async def test_a_body_without_headers_is_a_400_not_a_broken_stream() -> None:
    async with picker() as (p, stub):
        answers = await exchange(stub, body())
        status, err = error_of(answers[0])
        assert status == 400 and "without its headers" in err["message"]
        answers = await exchange(stub, headers(), headers())
        status, err = error_of(answers[1])
        assert status == 400 and "twice" in err["message"]
        await settled(p)


async def test_a_pick_whose_stream_ends_without_an_observer_is_accounted(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A picker stream that ends with no observer ever reporting (most often a client that
    left before the response headers): recorded as a 499 ``no_observer``, not a 502."""
    monkeypatch.setattr(epp_server, "OBSERVER_CLOSE_S", 0.05)  # the observer filter is on
    monkeypatch.setattr(epp_server, "ORPHAN_MARGIN_S", 0.0, raising=False)
    async with picker() as (p, stub):
        answers = await exchange(stub, headers(), body())
        common = answers[1].request_body.response
        sets = {h.header.key: h.header.raw_value.decode()
                for h in common.header_mutation.set_headers}
        did = sets[P.DECISION_HEADER]
        assert sets[P.DESTINATION_KEY] in {"10.0.0.1:8000", "10.0.0.2:8000", "api.example.com"}
        lb = answers[1].dynamic_metadata.fields[P.DESTINATION_NAMESPACE].struct_value
        assert lb.fields[P.DESTINATION_KEY].string_value == sets[P.DESTINATION_KEY]
        removed = set(common.header_mutation.remove_headers)
        assert {"authorization", "cookie", "x-api-key", "openai-organization",
                "x-goog-api-key", "x-goog-user-project", "ocp-apim-subscription-key"} <= removed
        await settled(p)
        rec = p.ledger.get(did)
        assert rec is not None and rec["outcome"]["status"] == 499, rec
        assert rec["outcome"]["error"].startswith("no response observed"), rec
        text = generate_latest(p.metrics.registry).decode()
        assert 'inferplane_epp_flights_reaped_total{reason="no_observer"} 1.0' in text


async def test_a_client_that_leaves_before_the_headers_frees_its_slot_and_blames_no_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A client that leaves before the response headers (an agent's cancel, a client
    timeout): Envoy ends the picker stream and no observer stream ever opens. The endpoint's
    reservation and the tenant's admission slot are released when the picker stream ends, not
    a grace period later; when the grace runs out the pick is recorded without blaming the
    endpoint: nothing in its error rate, no passive-health failure (endpoint ``c`` is
    passively checked here). The code before held both for the grace (5 s) and then fed a 502
    into the error rate and `passive.failed`."""
    monkeypatch.setattr(epp_server, "OBSERVER_CLOSE_S", 60.0)  # the grace outlasts the test
    cfg = fleet_config({"health_check": "passive"})
    async with picker(cfg) as (p, stub):
        down(p, "a", "b")  # only c (a provider endpoint, passive health) is placed on
        flights = []
        for _ in range(4):
            answers = await exchange(stub, headers(), body())
            sets = {h.header.key: h.header.raw_value.decode()
                    for h in answers[1].request_body.response.header_mutation.set_headers}
            f = p.flights[sets[P.DECISION_HEADER]]
            assert f.placement.endpoint_name == "c"
            assert f.placement.endpoint.health_check == "passive"
            flights.append(f)
        deadline = time.monotonic() + 5
        while p.live.live["c"].inflight:  # released at the stream's end (not 60 s later)
            assert time.monotonic() < deadline, p.live.live["c"].inflight
            await asyncio.sleep(0.01)
        # the record still waits for an observer
        assert all(f.ticket.grant is not None and not f.ticket.grant.held for f in flights)
        assert all(not f.done for f in flights) and len(p.flights) == 4
        for f in flights:  # the grace runs out
            p.orphan_check(f)
        await settled(p)
        for f in flights:
            rec = p.ledger.get(f.placement.decision.decision_id)
            assert rec is not None and rec["outcome"]["status"] == 499, rec
        live = p.live.live["c"]
        assert not live.outcomes and live.decayed_errors == 0.0
        assert p.passive.failures.get("c", 0) == 0
        assert not live.ejected
        text = generate_latest(p.metrics.registry).decode()
        assert "inferplane_endpoint_ejections_total{" not in text


async def test_an_observer_stream_that_breaks_accounts_a_499() -> None:
    async with picker() as (p, stub):
        answers = await exchange(stub, headers(), body())
        sets = {h.header.key: h.header.raw_value.decode()
                for h in answers[1].request_body.response.header_mutation.set_headers}
        did = sets[P.DECISION_HEADER]
        call = stub.Process()
        obs = headers({P.DECISION_HEADER: did})
        obs.observability_mode = True
        await call.write(obs)
        resp = pb.ProcessingRequest(observability_mode=True, response_headers=pb.HttpHeaders(
            headers=base_pb2.HeaderMap(headers=[
                base_pb2.HeaderValue(key=":status", raw_value=b"200"),
                base_pb2.HeaderValue(key="content-type", raw_value=b"text/event-stream"),
            ])))
        await call.write(resp)
        chunk = pb.ProcessingRequest(observability_mode=True, response_body=pb.HttpBody(
            body=b'data: {"choices":[{"delta":{"content":"x"}}]}\n\n'))
        await call.write(chunk)
        await asyncio.sleep(0.1)
        call.cancel()  # Envoy, the client or the upstream went away mid-answer
        await settled(p)
        rec = p.ledger.get(did)
        assert rec is not None and rec["outcome"]["status"] == 499
        assert rec["outcome"]["ttft_s"] is not None


@pytest.mark.parametrize("last", [b"data: [DONE]\n\n", b""])
async def test_a_cut_after_the_stream_s_end_blames_no_endpoint(last: bytes) -> None:
    """Envoy's access log reports an upstream that broke the connection after the response
    started. When the stream's end (``[DONE]``) already went by, the client has its whole
    answer: recorded 200, no endpoint blamed. Without it, a 502 against the endpoint."""
    from envoy.data.accesslog.v3 import accesslog_pb2

    async with picker() as (p, stub):
        answers = await exchange(stub, headers(), body())
        sets = {h.header.key: h.header.raw_value.decode()
                for h in answers[1].request_body.response.header_mutation.set_headers}
        did = sets[P.DECISION_HEADER]
        call = stub.Process()
        obs = headers({P.DECISION_HEADER: did})
        obs.observability_mode = True
        await call.write(obs)
        await call.write(pb.ProcessingRequest(observability_mode=True,
                                              response_headers=pb.HttpHeaders(
            headers=base_pb2.HeaderMap(headers=[
                base_pb2.HeaderValue(key=":status", raw_value=b"200"),
                base_pb2.HeaderValue(key="content-type", raw_value=b"text/event-stream"),
            ]))))
        await call.write(pb.ProcessingRequest(observability_mode=True, response_body=pb.HttpBody(
            body=b'data: {"choices":[{"delta":{"content":"x"}}]}\n\n' + last)))
        deadline = time.monotonic() + 5
        f = p.flights[did]
        while f.status is None or f.events is None or (last and not f.events.done):
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)
        entry = accesslog_pb2.HTTPAccessLogEntry()
        entry.request.request_headers[P.DECISION_HEADER] = did
        entry.response.response_code.value = 200
        entry.response.response_code_details = (
            "upstream_reset_after_response_started{protocol_error}")
        p.upstream_broke(entry)
        call.cancel()
        await settled(p)
        rec = p.ledger.get(did)
        assert rec is not None
        if last:
            assert rec["outcome"]["status"] == 200 and not rec["outcome"].get("error"), rec
        else:
            assert rec["outcome"]["status"] == 502, rec
            assert "the connection broke mid-stream" in rec["outcome"]["error"], rec


async def test_an_access_log_entry_before_the_observer_s_head_is_kept_until_its_end() -> None:
    """A busy picker can read Envoy's access log entry of a broken stream before the
    observer's report of the response head: the entry is kept and read when the observer's
    stream ends, a 502 against the endpoint (dropped before: a 499 blaming no one)."""
    from envoy.data.accesslog.v3 import accesslog_pb2

    async with picker() as (p, stub):
        did, call = await _pick_and_observe_silently(stub)
        f = p.flights[did]
        deadline = time.monotonic() + 5
        while not f.observed:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)
        entry = accesslog_pb2.HTTPAccessLogEntry()
        entry.request.request_headers[P.DECISION_HEADER] = did
        entry.response.response_code.value = 200
        entry.response.response_code_details = (
            "upstream_reset_after_response_started{connection_termination}")
        p.upstream_broke(entry)  # before the head: nothing to account yet
        assert not f.done
        await call.write(pb.ProcessingRequest(observability_mode=True,
                                              response_headers=pb.HttpHeaders(
            headers=base_pb2.HeaderMap(headers=[
                base_pb2.HeaderValue(key=":status", raw_value=b"200"),
                base_pb2.HeaderValue(key="content-type", raw_value=b"text/event-stream"),
            ]))))
        await call.write(pb.ProcessingRequest(observability_mode=True, response_body=pb.HttpBody(
            body=b'data: {"choices":[{"delta":{"content":"x"}}]}\n\n')))
        while f.status is None or f.events is None:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)
        await call.done_writing()  # the observer's stream ends without the response's end
        await settled(p)
        rec = p.ledger.get(did)
        assert rec is not None and rec["outcome"]["status"] == 502, rec
        assert "the connection broke mid-stream" in rec["outcome"]["error"], rec


async def test_a_late_observer_still_accounts_and_its_stream_is_ended_by_the_picker(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A busy picker reads an observer's report late: Envoy ended the picker's stream (the
    exchange is over) well before the picker reads the observer's response headers. The
    observer's report still accounts the request (it was accounted 502 "no response observed"
    one second after the picker stream's end, which under load was a third of the requests);
    and once it has seen the response's end the picker ends the observer's stream itself
    (Envoy would otherwise keep it open until its deferred close)."""
    monkeypatch.setattr(epp_server, "ORPHAN_GRACE_S", 0.05)  # the grace without an observer
    async with picker() as (p, stub):
        answers = await exchange(stub, headers(), body())
        sets = {h.header.key: h.header.raw_value.decode()
                for h in answers[1].request_body.response.header_mutation.set_headers}
        did = sets[P.DECISION_HEADER]
        await asyncio.sleep(0.3)  # the observer's report arrives late
        call = stub.Process()
        await call.write(pb.ProcessingRequest(
            observability_mode=True, response_headers=pb.HttpHeaders(
                headers=base_pb2.HeaderMap(headers=[
                    base_pb2.HeaderValue(key=":status", raw_value=b"200"),
                    base_pb2.HeaderValue(key="content-type", raw_value=b"application/json"),
                    base_pb2.HeaderValue(key=P.DECISION_HEADER, raw_value=did.encode()),
                ]))))
        usage = b'"usage": {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}'
        await call.write(pb.ProcessingRequest(observability_mode=True, response_body=pb.HttpBody(
            body=b'{"choices": [], ' + usage + b"}", end_of_stream=True)))
        # no done_writing: the picker ends the stream once the end is accounted
        assert await asyncio.wait_for(call.code(), 5) == grpc.StatusCode.OK
        await settled(p)
        rec = p.ledger.get(did)
        assert rec is not None and rec["outcome"]["status"] == 200, rec
        assert rec["outcome"]["completion_tokens"] == 4
        text = generate_latest(p.metrics.registry).decode()
        assert "inferplane_epp_flights_reaped_total{" not in text


async def _pick_and_observe_silently(stub: Any) -> tuple[str, Any]:
    """A pick, then an observer that attaches (its request headers name the decision) and
    never reports again: the observer stream stays open and silent."""
    answers = await exchange(stub, headers(), body())
    sets = {h.header.key: h.header.raw_value.decode()
            for h in answers[1].request_body.response.header_mutation.set_headers}
    did = sets[P.DECISION_HEADER]
    call = stub.Process()
    obs = headers({P.DECISION_HEADER: did})
    obs.observability_mode = True
    await call.write(obs)
    return did, call


async def test_a_pick_whose_observer_never_reports_is_reaped_recorded_and_settled() -> None:
    """Issue 12 item 4: an observer that attached and then never reported (its stream open
    and silent, an Envoy that hangs) does not keep the pick forever: past ``upstream_timeout_s
    + epp.message_timeout_s`` (Envoy's route timeout ends any answer by then) the reaper
    accounts it as a 504 naming why, releases its endpoint and settles its ticket."""
    cfg = fleet_config(gateway={"upstream_timeout_s": 0.3}, epp={"message_timeout_s": 0.1})
    async with picker(cfg) as (p, stub):
        did, call = await _pick_and_observe_silently(stub)
        f = p.flights[did]
        deadline = time.monotonic() + 5
        while not f.observed:  # the observer's headers reached the picker
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)
        await settled(p)
        rec = p.ledger.get(did)
        assert rec is not None and rec["outcome"]["status"] == 504
        assert "never observed" in rec["outcome"]["error"]
        assert f.ticket.settling is not None
        await f.ticket.settling
        (row,) = await p.admission.usage("t", ["model"])
        assert row["requests"] == 1
        text = generate_latest(p.metrics.registry).decode()
        assert 'inferplane_epp_flights_reaped_total{reason="unobserved"} 1.0' in text
        call.cancel()


async def test_picks_in_the_air_when_the_picker_stops_are_recorded_and_settled(
    tmp_path: Path,
) -> None:
    """Issue 12 item 4: the picker stopping with picks whose end it has not seen accounts them
    (499, "the picker stopped") before its ledger and admission store close. The code before
    accounted them after both had closed: no record, no settle."""
    ledger = tmp_path / "ledger.sqlite"
    cfg = fleet_config(gateway={"ledger_path": str(ledger)})
    monkey = epp_server.OBSERVER_CLOSE_S
    epp_server.OBSERVER_CLOSE_S = 60.0  # its picker stream has ended; no observer yet
    try:
        async with picker(cfg) as (p, stub):
            answers = await exchange(stub, headers(), body())
            sets = {h.header.key: h.header.raw_value.decode()
                    for h in answers[1].request_body.response.header_mutation.set_headers}
            did = sets[P.DECISION_HEADER]
            assert did in p.flights
    finally:
        epp_server.OBSERVER_CLOSE_S = monkey
    config = parse_config(cfg)
    store = SqliteStore(f"{ledger}.admission.sqlite")
    reader = build_ledger(config, "<test>")
    try:
        rec = reader.get(did)
        assert rec is not None and rec["outcome"]["status"] == 499
        assert rec["outcome"]["error"] == "the picker stopped"
        assert [r.requests for r in await store.usage("t")] == [1]
    finally:
        await reader.close()
        await store.close()


async def test_stopping_waits_for_the_flights_in_the_air_then_ends_the_streams() -> None:
    """Envoy keeps its access log stream open while it runs, and an observer stream until its
    response ends: ``server.stop(grace)`` waited its whole grace for them (1.0 s for
    `inferplane epp` with a response in flight behind Envoy, measured). `Picker.stop_grace`
    waits up to its grace while a flight is in the air, so a response that ends within it
    keeps its real record (not 499, "the picker stopped"), then accounts what is left and asks
    the server for no grace: the streams still open end at once."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("EPP_TEST_KEY", "sk-hosted")
        p = Picker(parse_config(CONFIG), metrics_source=StaticMetricsSource())
    port = free_port()
    server, _ = await serve(p, "127.0.0.1", port)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        stub = pb_grpc.ExternalProcessorStub(channel)
        did, observer = await _pick_and_observe_silently(stub)
        logs = als_pb2_grpc.AccessLogServiceStub(channel).StreamAccessLogs()
        await logs.write(als_pb2.StreamAccessLogsMessage())
        deadline = time.monotonic() + 5
        while len(p.streams) < 2 or not p.flights[did].observed:
            assert time.monotonic() < deadline, p.streams
            await asyncio.sleep(0.01)
        stopping = asyncio.create_task(p.stop_grace(60.0))
        for _ in range(5):
            await asyncio.sleep(0)
        assert not stopping.done() and p.ledger.get(did) is None  # the flight is waited for
        await observer.write(pb.ProcessingRequest(
            observability_mode=True, response_headers=pb.HttpHeaders(
                headers=base_pb2.HeaderMap(headers=[
                    base_pb2.HeaderValue(key=":status", raw_value=b"200"),
                    base_pb2.HeaderValue(key="content-type", raw_value=b"application/json"),
                ]))))
        usage = b'"usage": {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}'
        await observer.write(pb.ProcessingRequest(
            observability_mode=True, response_body=pb.HttpBody(
                body=b'{"choices": [], ' + usage + b"}", end_of_stream=True)))
        assert await asyncio.wait_for(stopping, 10) == 0.0
        rec = p.ledger.get(did)
        assert rec is not None and rec["outcome"]["status"] == 200, rec
        # a flight still in the air when the grace is out is accounted as the picker stopped
        did2, observer2 = await _pick_and_observe_silently(stub)
        while did2 not in p.flights or not p.flights[did2].observed:
            assert time.monotonic() < deadline, p.streams
            await asyncio.sleep(0.01)
        assert await p.stop_grace(0.0) == 0.0
        rec = p.ledger.get(did2)
        assert rec is not None and rec["outcome"]["error"] == "the picker stopped", rec
        await server.stop(0.0)  # the streams end now (the server's GOAWAY), none waits
        ended = (grpc.StatusCode.CANCELLED, grpc.StatusCode.UNAVAILABLE)
        assert await observer2.code() in ended and await logs.code() in ended
    finally:
        await channel.close()
        await server.stop(0)
        await p.stop()


async def test_subset_hint_as_a_list_and_provider_endpoints() -> None:
    async with picker() as (p, stub):
        for _ in range(3):
            req = headers()
            hint = req.metadata_context.filter_metadata[P.SUBSET_NAMESPACE]
            hint.fields[P.SUBSET_KEY].list_value.values.add().string_value = "10.0.0.2:8000"
            answers = await exchange(stub, req, body())
            sets = {h.header.key: h.header.raw_value.decode()
                    for h in answers[1].request_body.response.header_mutation.set_headers}
            assert sets[P.DESTINATION_KEY] == "10.0.0.2:8000"
            assert sets[P.CLUSTER_HEADER] == P.ORIGINAL_DST_CLUSTER
        # only c (a hosted OpenAI-dialect API) and d (Anthropic: Envoy cannot translate) are
        # left: c is reached by name, with its base path, its key and its model id
        down(p, "a", "b")
        for _ in range(3):
            answers = await exchange(stub, headers(), body())
            common = answers[1].request_body.response
            sets = {h.header.key: h.header.raw_value.decode()
                    for h in common.header_mutation.set_headers}
            assert sets[P.CLUSTER_HEADER] == P.endpoint_cluster("c")
            assert sets[P.DESTINATION_KEY] == "api.example.com"
            assert sets[":authority"] == "api.example.com"
            assert sets[":path"] == "/openai/v1/chat/completions"
            assert sets["authorization"] == "Bearer sk-hosted"
            assert sets["accept-encoding"] == "identity"  # the observer reads the body
            removed = set(common.header_mutation.remove_headers)
            assert "authorization" not in removed and "openai-project" in removed
            assert orjson.loads(common.body_mutation.body)["model"] == "m-hosted"
        down(p, "c")
        answers = await exchange(stub, headers(), body())
        status, err = error_of(answers[1])
        assert status == 503 and err["code"] == "no_eligible_endpoint"
        for f in list(p.flights.values()):
            p.finish(f, status=200)
        await settled(p)


async def test_grpc_health_services_follow_the_fleet(monkeypatch: pytest.MonkeyPatch) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    monkeypatch.setenv("EPP_TEST_KEY", "sk-hosted")
    pk = Picker(parse_config(CONFIG), metrics_source=StaticMetricsSource())
    port = free_port()
    server, _ = await serve(pk, "127.0.0.1", port)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            stub = health_pb2_grpc.HealthStub(ch)
            serving = health_pb2.HealthCheckResponse.SERVING
            for name in ("liveness", "readiness", "envoy.service.ext_proc.v3.ExternalProcessor"):
                r = await stub.Check(health_pb2.HealthCheckRequest(service=name))
                assert r.status == serving, name
            down(pk, "a", "b", "c", "d")
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:
                r = await stub.Check(health_pb2.HealthCheckRequest(service="readiness"))
                if r.status == health_pb2.HealthCheckResponse.NOT_SERVING:
                    break
                await asyncio.sleep(0.05)
            assert r.status == health_pb2.HealthCheckResponse.NOT_SERVING
            r = await stub.Check(health_pb2.HealthCheckRequest(service="liveness"))
            assert r.status == serving
    finally:
        await server.stop(0)
        await pk.stop()


async def test_an_observed_429_ejects_the_endpoint_for_its_retry_after() -> None:
    async with picker() as (p, stub):
        answers = await exchange(stub, headers(), body())
        sets = {h.header.key: h.header.raw_value.decode()
                for h in answers[1].request_body.response.header_mutation.set_headers}
        did, name = sets[P.DECISION_HEADER], sets[P.ENDPOINT_HEADER]
        await exchange(stub, pb.ProcessingRequest(
            observability_mode=True, response_headers=pb.HttpHeaders(
                headers=base_pb2.HeaderMap(headers=[
                    base_pb2.HeaderValue(key=":status", raw_value=b"429"),
                    base_pb2.HeaderValue(key="content-type", raw_value=b"application/json"),
                    base_pb2.HeaderValue(key="retry-after", raw_value=b"30"),
                    base_pb2.HeaderValue(key=P.DECISION_HEADER, raw_value=did.encode()),
                ]),
                end_of_stream=True,
            )))
        await settled(p)
        rec = p.ledger.get(did)
        assert rec is not None and rec["outcome"]["status"] == 429
        state = {v.name: v.state for v in p.live.snapshot().endpoints}[name]
        assert state.ejected  # out for the Retry-After, as the gateway would do
        # the next pick tells the answer filter when that endpoint is back, and the picked
        # endpoint's own Retry-After default and key (`envoy_config._answer_filter`)
        answers = await exchange(stub, headers(), body())
        sets = {h.header.key: h.header.raw_value.decode()
                for h in answers[1].request_body.response.header_mutation.set_headers}
        assert sets[P.ENDPOINT_HEADER] != name
        answer = answers[1].dynamic_metadata.fields[P.ANSWER_NAMESPACE].struct_value.fields
        assert 28 < answer["others_back_at"].number_value - time.time() <= 30, answer
        assert answer["retry_after_s"].number_value == 5.0  # limits.retry_after_s
        assert ("key" in answer) == (sets[P.ENDPOINT_HEADER] == "c")
        if "key" in answer:
            assert answer["key"].string_value == "sk-hosted"
        for f in list(p.flights.values()):
            p.finish(f, status=200)
