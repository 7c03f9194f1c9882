"""OpenTelemetry end to end: a real gateway process exports over OTLP/HTTP (protobuf) and over
OTLP/gRPC to a receiver on loopback, with headers from an environment variable."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.builders import model, pool_fleet, to_yaml
from tests.support.otlp_receiver import GrpcOtlpReceiver, OtlpReceiver, attributes
from tests.support.procs import Proc, free_port

KEY = "sk-otlp"
TRACE_ID = "0af7651916cd43dd8448eb211c80319c"


@pytest.fixture(params=["http/protobuf", "grpc"])
def receiver(request: pytest.FixtureRequest) -> Iterator[OtlpReceiver | GrpcOtlpReceiver]:
    r = (OtlpReceiver() if request.param == "http/protobuf" else GrpcOtlpReceiver()).start()
    try:
        yield r
    finally:
        r.stop()


def _wait(check: object, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():  # type: ignore[operator]
            return
        time.sleep(0.1)
    raise AssertionError("the collector never received it")


def test_a_gateway_process_exports_traces_and_metrics_over_otlp(
    receiver: OtlpReceiver | GrpcOtlpReceiver, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TEST_OTLP_HEADERS", "x-collector-key=s%20ecret")
    up_port, gw_port = free_port(), free_port()
    procs = [Proc(["-m", "tests.support.fake_upstream", "--port", str(up_port), "--mode", "ok",
                   "--name", "up"], tmp_path / "up.log")]
    try:
        procs[0].wait_http(f"http://127.0.0.1:{up_port}/health")
        cfg = tmp_path / "fleet.yaml"
        cfg.write_text(to_yaml(pool_fleet(
            up_port,
            gateway={"port": gw_port},
            telemetry={
                "enabled": True, "service_name": "gw-under-test",
                "endpoint": receiver.endpoint, "protocol": receiver.protocol,
                "headers_env": "TEST_OTLP_HEADERS", "export_interval_s": 0.5,
                "resource_attributes": {"deployment.environment.name": "test"},
            },
            substrate={"cost": {"hourly_usd": 3.0}},
            endpoint_fields={"name": "e1"},
            models=[model(max_context=4096)],
            key=KEY,
        )))
        gw = Proc(["-m", "inferplane.cli", "serve", "--config", str(cfg)], tmp_path / "gw.log")
        procs.append(gw)
        base = f"http://127.0.0.1:{gw_port}"
        gw.wait_http(f"{base}/ready")
        h = {"Authorization": f"Bearer {KEY}",
             "traceparent": f"00-{TRACE_ID}-b7ad6b7169203331-01"}
        body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True}
        r = httpx.post(f"{base}/v1/chat/completions", json=body, headers=h, timeout=10)
        assert r.status_code == 200
        did = r.headers["x-inferplane-decision-id"]
        r = httpx.post(f"{base}/v1/chat/completions", json={**body, "model": "nope"},
                       headers=h, timeout=10)
        assert r.status_code == 404

        def traced() -> bool:
            return sum(s.trace_id.hex() == TRACE_ID for _, s in receiver.spans()) >= 5

        _wait(traced)
        _wait(lambda: {"gen_ai.client.token.usage", "gen_ai.server.time_to_first_token",
                       "gen_ai.server.request.duration"} <= set(receiver.metric_names()))
    finally:
        for p in procs:
            p.stop()
    spans = [(res, s) for res, s in receiver.spans() if s.trace_id.hex() == TRACE_ID]
    res = spans[0][0]
    assert res["service.name"] == "gw-under-test"
    assert res["deployment.environment.name"] == "test"
    assert all(hd.get("x-collector-key") == "s ecret" for hd in receiver.headers)
    servers = {attributes(s.attributes).get("http.response.status_code"): s
               for _, s in spans if s.kind == s.SPAN_KIND_SERVER}
    ok = attributes(servers[200].attributes)
    assert ok["inferplane.decision_id"] == did and ok["gen_ai.usage.output_tokens"] == 5
    assert ok["gen_ai.request.model"] == "m" and ok["gen_ai.operation.name"] == "chat"
    assert servers[200].parent_span_id.hex() == "b7ad6b7169203331"
    assert attributes(servers[404].attributes)["error.type"] == "model_not_found"
    children = {s.name for _, s in spans if s.parent_span_id == servers[200].span_id}
    assert children == {"admit", "place", "chat m"}
    usage = receiver.metric_names()["gen_ai.client.token.usage"]
    types = {attributes(p.attributes)["gen_ai.token.type"]: p.sum
             for p in usage.histogram.data_points}
    assert types["input"] > 0 and types["output"] == 5


def _config(receiver: OtlpReceiver, exporter: str, sample_ratio: float = 1.0) -> Any:
    from inferplane.config.loader import parse_config

    return parse_config(to_yaml(pool_fleet(
        9,
        telemetry={"enabled": True, "endpoint": receiver.endpoint, "exporter": exporter,
                   "export_interval_s": 60, "sample_ratio": sample_ratio},
        substrate={"name": "p", "region": "r", "cost": {"hourly_usd": 1}},
        models=[model(max_context=4096)],
        tenants=[{"name": "t", "api_keys": [f"sha256:{'0' * 64}"]}],
    )))


def _telemetry(receiver: OtlpReceiver, exporter: str, sample_ratio: float = 1.0) -> Any:
    from inferplane.telemetry.otel import OtelTelemetry

    return OtelTelemetry(_config(receiver, exporter, sample_ratio))


def _requests(tel: Any, n: int, trace_id: str) -> None:
    for i in range(n):
        t = tel.request("chat", {"traceparent": f"00-{trace_id}-{i + 1:016x}-01"})
        t.failed(404, "model_not_found")
        t.end()


def test_the_exporter_process_flushes_when_the_gateway_stops(receiver: Any) -> None:
    if receiver.protocol != "http/protobuf":
        pytest.skip("the transport is covered above")
    tel = _telemetry(receiver, "process")
    _requests(tel, 3, TRACE_ID)
    tel.batcher.flush(metrics=False)  # handed to the child process
    child = tel.batcher.child.proc
    assert child is not None and child.poll() is None
    tel.shutdown()  # closes its stdin: it sends what it holds, then exits
    assert child.returncode == 0
    assert sum(s.trace_id.hex() == TRACE_ID for _, s in receiver.spans()) == 3
    assert "gen_ai.server.request.duration" in receiver.metric_names()


def test_a_dead_exporter_process_falls_back_to_the_gateways_thread(receiver: Any) -> None:
    if receiver.protocol != "http/protobuf":
        pytest.skip("the transport is covered above")
    tel = _telemetry(receiver, "process")
    _requests(tel, 1, TRACE_ID)
    tel.batcher.flush(metrics=False)
    child = tel.batcher.child.proc
    child.kill()
    child.wait()
    other = "1" * 32
    _requests(tel, 2, other)
    tel.shutdown()  # the hand-over fails: the gateway exports these itself
    assert tel.batcher.child is None
    assert sum(s.trace_id.hex() == other for _, s in receiver.spans()) == 2


def test_unsampled_requests_hand_over_nothing_but_their_metric_points(receiver: Any) -> None:
    if receiver.protocol != "http/protobuf":
        pytest.skip("the transport is covered above")
    tel = _telemetry(receiver, "process", sample_ratio=0.0)
    for _ in range(5):  # new traces of the gateway's own, none sampled
        t = tel.request("chat", {})
        t.failed(404, "model_not_found")
        t.end()
    assert not tel.batcher.queue  # no record per request: the points are the gateway's
    _requests(tel, 2, TRACE_ID)  # the caller sampled these: their spans go
    assert len(tel.batcher.queue) == 2
    tel.batcher.flush(metrics=True)  # handed to the exporter process: the spans, the metrics
    assert tel.batcher.child is not None and tel.batcher.child.proc is not None
    tel.shutdown()
    spans = receiver.spans()
    assert len(spans) == 2 and all(s.trace_id.hex() == TRACE_ID for _, s in spans)
    (point,) = receiver.metric_names()["gen_ai.server.request.duration"].histogram.data_points
    assert point.count == 7
    assert attributes(point.attributes) == {"gen_ai.operation.name": "chat",
                                            "error.type": "model_not_found"}


@pytest.mark.parametrize("exporter", ["process", "thread"])
def test_common_requests_travel_as_records_and_are_laid_out(receiver: Any, exporter: str) -> None:
    """A sampled request of the common shape is queued as its record when it ends; the exporter
    process (or the gateway's thread) encodes it by its kind's layout (`records.encode_trace`),
    and the receiver decodes the four spans with their attributes."""
    if receiver.protocol != "http/protobuf":
        pytest.skip("the transport is covered above")
    from inferplane.api.pipeline import Gateway
    from inferplane.telemetry.otel import OtelTelemetry

    config = _config(receiver, exporter)
    gw = Gateway(config)
    try:
        profile = gw.classify("chat", {"model": "m", "messages": [
            {"role": "user", "content": "hi"}]}, {}, config.tenants[0])
        decision = gw.decide(profile)
    finally:
        gw.telemetry.shutdown()
    tel = OtelTelemetry(config)
    for i in range(3):
        t = tel.request("chat", {"traceparent": f"00-{TRACE_ID}-{i + 1:016x}-01"})
        t.classified(profile, 16)
        with t.stage("admit"):
            pass
        with t.stage("place"):
            t.placed(decision)
        t.upstream_started(decision.picked.endpoint, "m")
        t.finished(status=200, error=None, prompt_tokens=7, completion_tokens=5 + i,
                   ttft_s=0.01, tpot_s=None)
        t.end()
    assert len(tel.batcher.queue) == 3
    tel.shutdown()
    spans = [s for _, s in receiver.spans() if s.trace_id.hex() == TRACE_ID]
    assert sorted(s.name for s in spans) == ["admit"] * 3 + ["chat m"] * 6 + ["place"] * 3
    servers = sorted((s for s in spans if s.kind == s.SPAN_KIND_SERVER),
                     key=lambda s: s.parent_span_id)
    assert [s.parent_span_id.hex() for s in servers] == [f"{i + 1:016x}" for i in range(3)]
    for i, s in enumerate(servers):
        a = attributes(s.attributes)
        assert a["gen_ai.usage.output_tokens"] == 5 + i and a["inferplane.ttft_s"] == 0.01
        assert a["inferplane.decision_id"] == decision.decision_id
        assert a["inferplane.attempts"] == 1 and "inferplane.tpot_s" not in a
