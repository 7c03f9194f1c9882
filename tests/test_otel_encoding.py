"""The hand-written OTLP encoding (`telemetry.otlp`) against the OpenTelemetry SDK's own: the same
spans, encoded by both, parse as equal ``ExportTraceServiceRequest`` messages; metrics parse as
the OTLP histograms they should be; W3C ``traceparent`` parsing follows the SDK propagator."""

from __future__ import annotations

import contextlib
import pickle
import random
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from inferplane.config.loader import parse_config
from inferplane.telemetry.otel import OtelTelemetry, _parse_traceparent
from inferplane.telemetry.otlp import Attrs, Histogram, SpanData, varint
from inferplane.telemetry.records import (
    COMPACT,
    R_ATTEMPTS,
    R_STAGES,
    encode_record,
    encode_trace,
    expand,
    full,
    spans_of,
    to_readable,
)
from inferplane.telemetry.records import encode_spans as encode_fields
from tests.builders import model, pool_fleet, to_yaml
from tests.support.otlp_receiver import attributes

CONFIG = parse_config(to_yaml(pool_fleet(
    9,
    telemetry={"enabled": True, "service_name": "enc",
               "resource_attributes": {"deployment.environment.name": "t"}},
    substrate={"name": "p", "region": "r", "cost": {"hourly_usd": 1}},
    models=[model(max_context=4096)],
    tenants=[{"name": "t", "api_keys": [f"sha256:{'0' * 64}"]}],
)))


def _placed() -> tuple[Any, Any]:
    from inferplane.api.pipeline import Gateway

    gw = Gateway(CONFIG)
    try:
        profile = gw.classify("chat", {"model": "m", "messages": [
            {"role": "user", "content": "hi"}]}, {}, gw.config.tenants[0])
        return profile, gw.decide(profile)
    finally:
        gw.telemetry.shutdown()


PROFILE, DECISION = _placed()


@pytest.fixture(scope="module")
def tel() -> OtelTelemetry:
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    return OtelTelemetry(CONFIG, span_exporter=InMemorySpanExporter())


def both(tel: OtelTelemetry, spans: list[SpanData]) -> tuple[ExportTraceServiceRequest, ...]:
    ours = ExportTraceServiceRequest.FromString(tel.encoder.request(spans))
    sdk = encode_spans([to_readable(s, tel) for s in spans])
    return ours, ExportTraceServiceRequest.FromString(sdk.SerializeToString())


values = st.one_of(
    st.text(max_size=40), st.booleans(), st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.floats(allow_nan=False), st.integers(min_value=0, max_value=2**40),
)
keys = st.text(min_size=1, max_size=30)
span_data = st.builds(
    SpanData,
    trace_id=st.integers(min_value=1, max_value=2**128 - 1),
    span_id=st.integers(min_value=1, max_value=2**64 - 1),
    parent_id=st.one_of(st.just(0), st.integers(min_value=1, max_value=2**64 - 1)),
    parent_remote=st.booleans(),
    trace_state=st.sampled_from(["", "congo=t61rcWkgMzE", "a=1,b=2"]),
    name=st.text(max_size=60),
    kind=st.sampled_from([1, 2, 3]),
    start_ns=st.integers(min_value=0, max_value=2**63),
    end_ns=st.integers(min_value=0, max_value=2**63),
    fixed=st.lists(st.dictionaries(keys, values, max_size=5).map(
        lambda d: Attrs(tuple(d.items()))), max_size=2).map(tuple),
    attributes=st.dictionaries(keys, values, max_size=8).map(lambda d: tuple(d.items())),
    error=st.booleans(),
    message=st.one_of(st.none(), st.text(max_size=50)),
).filter(lambda s: not (s.parent_remote and not s.parent_id))


@settings(max_examples=60, deadline=None)
@given(st.lists(span_data, min_size=1, max_size=6))
def test_any_batch_encodes_as_the_sdk_would(tel: OtelTelemetry, spans: list[SpanData]) -> None:
    # attribute keys unique across a span's fixed groups and its own (as the trace builds them)
    clean = []
    for s in spans:
        seen: set[str] = set()
        fixed = []
        for a in s.fixed:
            fixed.append(Attrs(tuple((k, v) for k, v in a.pairs if k not in seen)))
            seen |= {k for k, _ in a.pairs}
        attrs = tuple((k, v) for k, v in s.attributes if k not in seen)
        clean.append(s._replace(fixed=tuple(fixed), attributes=attrs,
                                message=s.message if s.error else None))
    ours, sdk = both(tel, clean)
    assert ours == sdk


def test_a_real_request_trace_encodes_as_the_sdk_would(tel: OtelTelemetry) -> None:
    from inferplane.api.pipeline import Gateway

    gw = Gateway(CONFIG)
    try:
        tenant = gw.config.tenants[0]
        profile = gw.classify("chat", {"model": "m", "messages": [
            {"role": "user", "content": "hi"}]}, {}, tenant)
        decision = gw.decide(profile)
        assert decision.picked is not None
        headers = {"host": "gw:8080", "traceparent":
                   "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
                   "tracestate": "congo=t61rcWkgMzE,rojo=00f067aa0ba902b7"}
        t = tel.request("chat", headers)
        t.classified(profile, 16)
        with t.stage("admit"):
            pass
        with t.stage("place"):
            t.placed(decision)
        t.upstream_started(decision.picked.endpoint, "m")
        t.upstream_failed("http_503", 503)
        t.upstream_started(decision.picked.endpoint, "m")
        out = dict(t.upstream_headers())
        t.finished(status=200, error=None, prompt_tokens=7, completion_tokens=5, ttft_s=0.01,
                   tpot_s=0.002)
        t.end()
    finally:
        gw.telemetry.shutdown()
    spans = t.spans()  # type: ignore[attr-defined]
    ours, sdk = both(tel, spans)
    assert ours == sdk
    decoded = ours.resource_spans[0].scope_spans[0].spans
    assert [s.name for s in decoded] == ["admit", "place", "chat m", "chat m", "chat m"]
    server = decoded[-1]
    a = attributes(server.attributes)
    assert a["gen_ai.provider.name"] == "vllm" and a["inferplane.attempts"] == 2
    assert server.parent_span_id.hex() == "b7ad6b7169203331"
    assert server.trace_state == "congo=t61rcWkgMzE,rojo=00f067aa0ba902b7"
    assert out["tracestate"] == "congo=t61rcWkgMzE,rojo=00f067aa0ba902b7"
    attempt = decoded[3].span_id.hex()
    assert out["traceparent"] == f"00-0af7651916cd43dd8448eb211c80319c-{attempt}-01"
    failed = attributes(decoded[2].attributes)
    assert failed["error.type"] == "http_503" and failed["http.response.status_code"] == 503
    assert decoded[2].status.code == 2 and decoded[3].status.code == 0
    res = attributes(ours.resource_spans[0].resource.attributes)
    assert res["service.name"] == "enc" and res["deployment.environment.name"] == "t"


scenarios = st.fixed_dictionaries({
    "traceparent": st.sampled_from(
        [None, "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"]),
    "tracestate": st.sampled_from([None, "congo=t61rcWkgMzE,rojo=00f067aa0ba902b7"]),
    "host": st.sampled_from([None, "gw:8080", "[::1]:9", "gateway.example"]),
    "classified": st.booleans(),
    "max_tokens": st.one_of(st.none(), st.integers(min_value=0, max_value=2**40)),
    "admit_error": st.booleans(),
    "failures": st.lists(st.tuples(st.sampled_from(["http_503", "connect", "timeout"]),
                                   st.sampled_from([None, 429, 503])), max_size=3),
    "end": st.sampled_from(["finished", "failed", "unaccounted"]),
    "status": st.sampled_from([200, 400, 499, 502, 504]),
    "error": st.one_of(st.none(), st.text(max_size=20)),
    "tokens": st.tuples(*[st.one_of(st.none(), st.integers(min_value=0, max_value=2**40))] * 2),
    "times": st.tuples(*[st.one_of(st.none(), st.floats(min_value=0, max_value=1e3))] * 2),
})


class _Refused(Exception):
    code = "rate_limit_exceeded"


@settings(max_examples=80, deadline=None)
@given(scenarios, st.integers(min_value=0, max_value=2**32))
def test_records_encode_as_their_spans_do(tel: OtelTelemetry, sc: dict[str, Any],
                                          seed: int) -> None:
    """The exporter's direct encoding of a request (`records.encode_spans`) is byte for byte the
    encoding of the spans `spans_of` builds (which the tests above hold to the SDK's), over
    requests of every shape: continued or new traces, errors in a stage, failed attempts and
    re-placements, 4xx/5xx, streams with TTFT, never-accounted attempts."""
    headers = {k: v for k, v in (("traceparent", sc["traceparent"]),
                                 ("tracestate", sc["tracestate"]), ("host", sc["host"])) if v}
    t = tel.request("chat", headers)
    if sc["classified"]:
        t.classified(PROFILE, sc["max_tokens"])
    with contextlib.suppress(_Refused), t.stage("admit"):
        if sc["admit_error"]:
            raise _Refused
    for error_type, status in [*sc["failures"], (None, None)]:
        with t.stage("place"):
            t.placed(DECISION)
        t.upstream_started(DECISION.picked.endpoint, "m")
        if error_type is not None:
            t.upstream_failed(error_type, status)
    t.upstream_headers()
    if sc["end"] == "finished":
        t.finished(status=sc["status"], error=sc["error"], prompt_tokens=sc["tokens"][0],
                   completion_tokens=sc["tokens"][1], ttft_s=sc["times"][0],
                   tpot_s=sc["times"][1])
    elif sc["end"] == "failed":
        t.failed(sc["status"], "upstream_error")
    t.end()
    record = t.record()  # type: ignore[attr-defined]
    handed = t.handed()  # type: ignore[attr-defined]  # what the batcher hands over
    assert (handed[0] == COMPACT) == (len(record[R_STAGES]) == 2
                                      and len(record[R_ATTEMPTS]) == 1)
    assert (expand(handed) if handed[0] == COMPACT else handed) == full(handed) == record
    random.seed(seed)  # the stage spans' ids: drawn in the same order by both
    spans = spans_of(tel, record)
    random.seed(seed)
    body: list[bytes] = []
    encode_fields(tel, record, body)
    assert tel.encoder.wrap(body) == tel.encoder.request(spans)
    random.seed(seed)
    encoded = encode_trace(tel, record)
    common = (not sc["admit_error"] and not sc["failures"] and sc["end"] == "finished"
              and sc["status"] < 400 and sc["error"] is None)
    assert (encoded is not None) == common  # the common shape by its kind's layout
    if encoded is not None:
        assert encoded == b"".join(body)
    random.seed(seed)
    either: list[bytes] = []
    encode_record(tel, record, either)  # what the exporter does: the layout, or field by field
    assert b"".join(either) == b"".join(body)


def test_a_stage_inside_another_is_a_span_of_its_own(tel: OtelTelemetry) -> None:
    """The trace is its own stages' context manager (`OtelTrace.stage`); a stage opened inside
    one gets an object of its own, its own times and error, and the placement's attributes when
    it is the innermost open one."""
    t = tel.request("chat", {})
    with t.stage("admit"):
        with contextlib.suppress(_Refused), t.stage("inner"):
            t.placed(DECISION)
            raise _Refused
        with t.stage("place"):
            pass
    with t.stage("place"):
        t.placed(DECISION)
    t.end()
    stages = t.record()[R_STAGES]  # type: ignore[attr-defined]
    assert [(s[0], s[3]) for s in stages] == [("inner", "rate_limit_exceeded"), ("place", None),
                                              ("admit", None), ("place", None)]
    assert [dict(s[4]).get("inferplane.decision_id") for s in stages] == [
        DECISION.decision_id, None, None, DECISION.decision_id]
    assert all(s[1] <= s[2] for s in stages) and stages[2][1] <= stages[0][1]


def test_the_outer_stage_is_open_again_when_an_inner_one_ends(tel: OtelTelemetry) -> None:
    """After a nested stage exits, the placement's attributes go to the stage it was opened in
    (two levels deep too), not to none."""
    t = tel.request("chat", {})
    with t.stage("admit"):
        with t.stage("inner"):
            with t.stage("innermost"):
                pass
            t.placed(DECISION)
        with t.stage("other"):
            pass
        t.placed(DECISION)
    t.end()
    stages = {s[0]: dict(s[4]) for s in t.record()[R_STAGES]}  # type: ignore[attr-defined]
    assert [name for name, attrs in stages.items()
            if attrs.get("inferplane.decision_id") == DECISION.decision_id] == ["inner", "admit"]


common_requests = st.fixed_dictionaries({
    "traceparent": st.sampled_from(
        [None, "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"]),
    "tracestate": st.sampled_from([None, "congo=t61rcWkgMzE,rojo=00f067aa0ba902b7", "a=b"]),
    "host": st.sampled_from([None, "gw:8080", "[::1]:9", "gateway.example"]),
    "classified": st.booleans(),
    "max_tokens": st.one_of(st.none(), st.integers(min_value=0, max_value=2**40)),
    "status": st.sampled_from([200, 201, 299]),
    "tokens": st.tuples(*[st.one_of(st.none(), st.integers(min_value=0, max_value=2**63 - 1))]
                        * 2),
    "times": st.tuples(*[st.one_of(st.none(), st.floats(allow_nan=False))] * 2),
    "api": st.sampled_from(["chat", "completions", "embeddings"]),
    "end_ns": st.one_of(st.none(), st.integers(min_value=0, max_value=2**64 - 1)),
})


@settings(max_examples=120, deadline=None)
@given(common_requests, st.integers(min_value=0, max_value=2**32))
def test_common_requests_are_encoded_as_their_records_are(tel: OtelTelemetry, sc: dict[str, Any],
                                                         seed: int) -> None:
    """`records.encode_trace` (the exporter's encoding of a request of the common shape, one
    struct layout per kind) gives the bytes `encode_spans` gives of its record, for every token
    count, time, trace context and status of that shape, and so does its compact record after
    the hand-over's pickling (new objects for its attribute groups); the same request again, with
    other ids and times, reuses the kind's layout (`SpanEncoder.shapes` does not grow), and so
    does the compact record after pickling."""
    def request() -> Any:
        headers = {k: v for k, v in (("traceparent", sc["traceparent"]),
                                     ("tracestate", sc["tracestate"]), ("host", sc["host"]))
                   if v}
        t = tel.request(sc["api"], headers)
        if sc["classified"]:
            t.classified(PROFILE, sc["max_tokens"])
        with t.stage("admit"):
            pass
        with t.stage("place"):
            t.placed(DECISION)
        t.upstream_started(DECISION.picked.endpoint, "m")
        t.upstream_headers()
        t.finished(status=sc["status"], error=None, prompt_tokens=sc["tokens"][0],
                   completion_tokens=sc["tokens"][1], ttft_s=sc["times"][0],
                   tpot_s=sc["times"][1])
        t.end()
        if sc["end_ns"] is not None:  # any time fits its fixed64
            t.end_ns = t.attempts[0].end_ns = sc["end_ns"]
        return t

    kinds: list[Any] | None = None  # the layouts' keys once this request's kind has one
    for _ in range(2):
        t = request()
        random.seed(seed)
        encoded = encode_trace(tel, t.record())
        if kinds is None:
            kinds = list(tel.encoder.shapes)
        assert list(tel.encoder.shapes) == kinds  # the second request: the same layout
        random.seed(seed)
        body: list[bytes] = []
        encode_fields(tel, t.record(), body)
        assert encoded is not None and encoded == b"".join(body)
        random.seed(seed)
        handed = pickle.loads(pickle.dumps([t.handed()], protocol=pickle.HIGHEST_PROTOCOL))
        again: list[bytes] = []
        encode_record(tel, handed[0], again)  # compact, its groups new objects
        assert again == [encoded]
        assert list(tel.encoder.shapes) == kinds  # unpickled, it still finds its kind's layout
        decoded = ExportTraceServiceRequest.FromString(tel.encoder.wrap([encoded]))
        spans = decoded.resource_spans[0].scope_spans[0].spans
        assert [s.name for s in spans][:2] == ["admit", "place"] and len(spans) == 4
        assert all(s.trace_id == t.trace_id.to_bytes(16, "big") for s in spans)


def test_a_kinds_layout_is_not_found_for_another_value_of_its_groups(tel: OtelTelemetry) -> None:
    """`records._group` stands an attribute group in the layouts' keys as a token (an int) per
    value; when its tables are cleared (past 256 groups) the values seen next get new tokens,
    never one that another value's layout was made with: a request whose decision attributes
    differ from the first one's is not laid out by the first one's layout."""
    for policy in ("first", "second"):
        t = tel.request("chat", {})
        t.classified(PROFILE, 16)
        with t.stage("admit"):
            pass
        with t.stage("place"):
            t.placed(DECISION)
        t.upstream_started(DECISION.picked.endpoint, "m")
        t.upstream_headers()
        t.finished(status=200, error=None, prompt_tokens=3, completion_tokens=4, ttft_s=0.01,
                   tpot_s=0.002)
        t.end()
        t.decision = (("inferplane.policy", policy),)  # type: ignore[attr-defined]
        tel.encoder.groups.clear()  # as `_group` clears them past 256 groups
        tel.encoder.typed.clear()
        random.seed(7)
        encoded = encode_trace(tel, t.record())  # type: ignore[attr-defined]
        random.seed(7)
        body: list[bytes] = []
        encode_fields(tel, t.record(), body)  # type: ignore[attr-defined]
        assert encoded is not None and encoded == b"".join(body)
        assert policy.encode() in encoded


def test_metrics_are_cumulative_explicit_bucket_histograms(tel: OtelTelemetry) -> None:
    h = Histogram("x", "s", "d", (0.1, 1.0))
    for v in (0.05, 0.1, 0.5, 2.0):
        h.record(v, (("k", "a"),))
    h.record(1.0, (("k", "b"),))
    tel.histograms = (h,)
    data = tel.metrics_request()
    assert data is not None
    req = ExportMetricsServiceRequest.FromString(data)
    (metric,) = req.resource_metrics[0].scope_metrics[0].metrics
    assert metric.name == "x" and metric.unit == "s"
    assert metric.histogram.aggregation_temporality == 2
    points = {attributes(p.attributes)["k"]: p for p in metric.histogram.data_points}
    a = points["a"]
    # bucket i holds (bounds[i-1], bounds[i]]: 0.1 falls in the first
    assert list(a.bucket_counts) == [2, 1, 1] and a.count == 4 and a.sum == pytest.approx(2.65)
    assert a.min == 0.05 and a.max == 2.0 and list(a.explicit_bounds) == [0.1, 1.0]
    assert list(points["b"].bucket_counts) == [0, 1, 0]


@settings(max_examples=80, deadline=None)
@given(st.lists(st.tuples(st.one_of(st.floats(allow_nan=False, allow_infinity=False,
                                              min_value=-1e12, max_value=1e12),
                                    st.integers(min_value=0, max_value=2**40)),
                          st.booleans()), max_size=60))
def test_pending_values_fold_as_their_adds_would(values: list[tuple[float, bool]]) -> None:
    """A point's values appended on the request path and folded in bulk (`Histogram.fold`,
    whenever the batcher folds: the booleans) give the buckets, count, sum, min and max that
    adding each as it came (`otlp.add`) gives."""
    import sys

    one, bulk = Histogram("x", "s", "d", (0.5, 1, 16, 1e6)), Histogram("x", "s", "d",
                                                                      (0.5, 1, 16, 1e6))
    key = (("k", "v"),)
    for value, fold in values:
        one.record(value, key)
        bulk.point(key)[5].append(value)
        if fold:
            bulk.fold()
    bulk.fold()
    a, b = one.points.get(key), bulk.points.get(key)
    if not values:
        assert a is None and b is None
        return
    assert a is not None and b is not None and b[5] == []
    assert a[0] == b[0] and a[1] == b[1] and a[3] == b[3] and a[4] == b[4]
    if sys.version_info < (3, 12):  # sum() adds left to right there, as `add` does
        assert a[2] == b[2]
    else:  # 3.12's sum of floats compensates: closer to the exact sum, not always equal
        assert b[2] == pytest.approx(a[2], rel=1e-9, abs=1e-6)


def _metrics_with_proto_classes(resource: dict[str, Any], scope: str, histograms: list[Histogram],
                                start_ns: int, now_ns: int) -> ExportMetricsServiceRequest:
    """The request opentelemetry-proto's message classes build of the same histograms."""
    from opentelemetry.proto.common.v1.common_pb2 import AnyValue, InstrumentationScope, KeyValue
    from opentelemetry.proto.metrics.v1 import metrics_pb2 as M
    from opentelemetry.proto.resource.v1.resource_pb2 import Resource

    def kvs(pairs: Any) -> list[Any]:
        out = []
        for k, v in pairs:
            value = (AnyValue(bool_value=v) if isinstance(v, bool) else
                     AnyValue(int_value=v) if isinstance(v, int) else
                     AnyValue(double_value=v) if isinstance(v, float) else
                     AnyValue(string_value=v))
            out.append(KeyValue(key=k, value=value))
        return out

    metrics = [M.Metric(name=h.name, description=h.description, unit=h.unit,
                        histogram=M.Histogram(data_points=[
                            M.HistogramDataPoint(
                                attributes=kvs(key), start_time_unix_nano=start_ns,
                                time_unix_nano=now_ns, count=p[1], sum=p[2],
                                bucket_counts=p[0], explicit_bounds=h.bounds, min=p[3], max=p[4])
                            for key, p in h.points.items() if p[1]],
                            aggregation_temporality=2))
               for h in histograms if any(p[1] for p in h.points.values())]
    return ExportMetricsServiceRequest(resource_metrics=[M.ResourceMetrics(
        resource=Resource(attributes=kvs(resource.items())),
        scope_metrics=[M.ScopeMetrics(scope=InstrumentationScope(name=scope), metrics=metrics)])])


metric_values = st.one_of(st.floats(allow_nan=False, allow_infinity=False),
                          st.integers(min_value=0, max_value=2**53))
attribute_sets = st.lists(st.tuples(keys, st.one_of(
    st.text(max_size=20), st.booleans(), st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.floats(allow_nan=False))), max_size=4, unique_by=lambda kv: kv[0]).map(tuple)


@settings(max_examples=80, deadline=None)
@given(st.lists(st.tuples(st.sampled_from([0, 1, 2]), attribute_sets, metric_values),
                max_size=30),
       st.dictionaries(keys, st.text(max_size=20), max_size=3),
       st.integers(min_value=0, max_value=2**64 - 1), st.integers(min_value=0, max_value=2**64 - 1),
       st.booleans())
def test_metrics_encode_as_the_proto_classes_would(observations: list[Any], resource: Any,
                                                   start_ns: int, now_ns: int,
                                                   empty_point: bool) -> None:
    """The hand-written ``ExportMetricsServiceRequest`` (`otlp.encode_metrics`) parses as equal
    to what opentelemetry-proto's message classes make of the same histograms (the encoding
    before it: empty points and histograms left out, every other point with its attributes,
    counts, sum, bounds, min and max)."""
    from inferplane.telemetry.otlp import encode_metrics

    hs = [Histogram("a.duration", "s", "seconds", (0.1, 1.0, 10.0)),
          Histogram("b.tokens", "{token}", "tokens", (1, 4, 16, 64)),
          Histogram("c", "", "", (0.5,))]
    for i, pairs, value in observations:
        hs[i].record(value, pairs)
    if empty_point:
        hs[2].point((("k", "never"),))
    data = encode_metrics(resource, "scope", hs, start_ns, now_ns)
    expected = _metrics_with_proto_classes(resource, "scope", hs, start_ns, now_ns)
    if not observations:
        assert data is None
        return
    assert data is not None
    assert ExportMetricsServiceRequest.FromString(data) == expected


@pytest.mark.parametrize("value", [
    "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
    "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00",
    " 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01 ",
    "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
    "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
    "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
    "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
    "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
    "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
    "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
    "garbage",
])
def test_traceparent_is_parsed_as_the_sdk_propagator_does(value: str) -> None:
    from opentelemetry.trace import get_current_span

    ctx = TraceContextTextMapPropagator().extract({"traceparent": value})
    sc = get_current_span(ctx).get_span_context()
    expected = (sc.trace_id, sc.span_id, int(sc.trace_flags)) if sc.is_valid else None
    assert _parse_traceparent(value) == expected


def test_varints() -> None:
    for n in (0, 1, 127, 128, 300, 16383, 16384, 2**35, 2**64 - 1):
        data, shift, got = varint(n), 0, 0
        for b in data:
            got |= (b & 0x7F) << shift
            shift += 7
        assert got == n and all(b & 0x80 for b in data[:-1]) and not data[-1] & 0x80


def test_provider_names_follow_the_genai_conventions() -> None:
    from inferplane.fleet.model import Fleet
    from inferplane.telemetry.otel import provider_name

    config = parse_config("""
substrates:
  - name: own
    kind: gpu
    hardware: h100
    region: r
    jurisdiction: eu
    cost: {hourly_usd: 1}
    endpoints:
      - {name: v, url: "http://127.0.0.1:9", models: M}
      - {name: s, engine: sglang, url: "http://127.0.0.1:8", models: M}
  - name: hosted
    kind: provider-api
    hardware: provider-api
    region: r
    jurisdiction: eu
    cost: {input_per_mtok: 1, output_per_mtok: 1}
    endpoints:
      - {name: oa, url: "https://api.openai.com/v1", models: M}
      - {name: az, url: "https://x.openai.azure.com/openai/v1", models: M}
      - {name: an, url: "https://api.anthropic.com", dialect: anthropic, models: M}
      - {name: other, url: "https://llm.example.com/v1", models: M}
      - {name: named, provider: aws.bedrock, url: "https://b.example.com", models: M}
""".replace("M}", "[{name: m, profile: llama-3.1-8b, max_context: 4096}]}"))
    fleet = Fleet.from_config(config)
    names = {e.name: provider_name(e) for e in fleet.endpoints}
    assert names == {"v": "vllm", "s": "sglang", "oa": "openai", "az": "azure.ai.openai",
                     "an": "anthropic", "other": "openai", "named": "aws.bedrock"}


_VALUE_FIELDS = {bool: "bool_value", int: "int_value", float: "double_value"}


@pytest.mark.parametrize("values", [(True, 1, 1.0), (1.0, 1, True), (1, True, 1.0)])
def test_equal_values_of_other_types_are_cached_apart(tel: OtelTelemetry,
                                                      values: tuple[Any, ...]) -> None:
    """1, 1.0 and True are equal and hash alike but encode as int, double and bool: the caches
    of encoded attributes (`encode_metrics`' points', `OtelTelemetry.attrs`, `encode_trace`'s
    kinds) keep each value's own type, whichever came first."""
    from inferplane.telemetry.otlp import attribute, encode_metrics

    for v in values:
        h = Histogram("typed", "s", "d", (1.0,))
        h.record(0.5, (("k", v),))
        data = encode_metrics({}, "s", [h], 0, 1)
        assert data is not None
        req = ExportMetricsServiceRequest.FromString(data)
        (point,) = req.resource_metrics[0].scope_metrics[0].metrics[0].histogram.data_points
        assert point.attributes[0].value.WhichOneof("value") == _VALUE_FIELDS[type(v)]

        assert tel.attrs((("typed.k", v),)).data == attribute("typed.k", v)

        t = tel.request("chat", {})
        t.classified(PROFILE, 16)
        with t.stage("admit"):
            pass
        with t.stage("place"):
            t.placed(DECISION)
            assert t.open_stage is t  # the trace's own stage
            t.attrs = (t.attrs[0], ("inferplane.candidates", v))
        t.upstream_started(DECISION.picked.endpoint, "m")
        t.upstream_headers()
        t.finished(status=200, error=None, prompt_tokens=3, completion_tokens=4, ttft_s=0.01,
                   tpot_s=0.002)
        t.end()
        random.seed(7)
        encoded = encode_trace(tel, t.record())
        random.seed(7)
        body: list[bytes] = []
        encode_fields(tel, t.record(), body)
        if type(v) is int:
            assert encoded is not None and encoded == b"".join(body)
        else:  # not the attributes a placement gives (`records.placement`): no compact record,
            # so no kind's layout; the hand-over's record is encoded field by field
            assert encoded is None and t.handed()[0] != COMPACT  # type: ignore[attr-defined]
        random.seed(7)
        handed: list[bytes] = []
        encode_record(tel, t.handed(), handed)  # type: ignore[attr-defined]
        assert b"".join(handed) == b"".join(body)


@pytest.mark.parametrize("run", range(3))  # a race shows only sometimes: three tries
def test_pending_values_are_conserved_while_the_batcher_folds(run: int) -> None:
    """Request threads append to points' pending lists with no lock (as `OtelTrace.observe`
    does) and make new points (under a lock, as `OtelTelemetry.new_series`) while another
    thread folds (`Histogram.fold`, lock-free under the GIL) and copies (under that lock) in a
    loop: once everything is folded, every point's count, bucket total, sum (integers: exact),
    min and max are those of the values appended to it, none lost and none counted twice."""
    import sys
    import threading

    h = Histogram("x", "s", "d", (10, 100, 1000))
    shared = [(("k", str(i)),) for i in range(3)]
    for key in shared:
        h.point(key)
    n, writers = 50_000, 4
    appended: dict[Any, list[int]] = {key: [] for key in shared}
    mirrors: list[dict[Any, list[int]]] = [{} for _ in range(writers)]

    def write(w: int) -> None:
        own = (("w", str(w)),)
        mine = mirrors[w]
        start.wait()
        with lock:  # `own` is made while the folder runs
            lists = [h.point(key)[5] for key in (*shared, own)]
        for i in range(n):
            j = (w + i) % 4
            lists[j].append(i)
            mine.setdefault((*shared, own)[j], []).append(i)

    start = threading.Barrier(writers + 1)  # the writers and this thread, the folder
    lock = threading.Lock()  # `OtelTelemetry.metrics_lock`: points made, points copied
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as CPython will
    try:
        threads = [threading.Thread(target=write, args=(w,)) for w in range(writers)]
        for thread in threads:
            thread.start()
        folds = 0
        start.wait()
        while any(thread.is_alive() for thread in threads):
            h.fold()  # no lock, as the batcher's
            folds += 1
            if folds % 8 == 0:
                with lock:
                    h.copy()
        for thread in threads:
            thread.join()
    finally:
        sys.setswitchinterval(interval)
    h.fold()
    assert folds > 1
    for mine in mirrors:
        for key, vals in mine.items():
            appended.setdefault(key, []).extend(vals)
    assert set(h.points) == set(appended) and len(appended) == 3 + writers
    for key, vals in appended.items():
        p = h.points[key]
        assert p[5] == [] and p[1] == len(vals) == sum(p[0])
        assert p[2] == sum(vals) and p[3] == min(vals) and p[4] == max(vals)
