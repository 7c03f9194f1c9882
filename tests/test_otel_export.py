"""The hand-over of finished requests to the exporter (`OtelTrace.handed`, `records.full`) and
`telemetry.export.export_spans`: what one batch of records becomes when some cannot be
encoded."""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import pickle
from typing import Any

import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from inferplane.config.loader import parse_config
from inferplane.placement.framework import Spillover
from inferplane.telemetry import export
from inferplane.telemetry.otel import OtelTelemetry
from inferplane.telemetry.records import COMPACT, full
from tests.builders import model, pool_fleet, to_yaml
from tests.test_otel_encoding import CONFIG, DECISION, PROFILE


class Keep:
    def __init__(self) -> None:
        self.bodies: list[bytes] = []

    def send(self, signal: str, body: bytes) -> None:
        assert signal == "traces"
        self.bodies.append(body)


@pytest.fixture(scope="module")
def tel() -> OtelTelemetry:
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    return OtelTelemetry(CONFIG, span_exporter=InMemorySpanExporter())


def _handed(tel: OtelTelemetry) -> tuple[Any, ...]:
    return _request(tel).handed()


def _request(tel: OtelTelemetry) -> Any:
    t = tel.request("chat", {})
    with t.stage("admit"):
        pass
    with t.stage("place"):
        t.placed(DECISION)
    t.upstream_started(DECISION.picked.endpoint, "m")
    t.upstream_headers()
    t.finished(status=200, error=None, prompt_tokens=3, completion_tokens=4, ttft_s=0.01,
               tpot_s=0.002)
    t.end()
    return t


def _spans(keep: Keep) -> list[tuple[int, str]]:
    """(trace id, name) of every span sent (its own ids are random)."""
    return [(int.from_bytes(s.trace_id, "big"), s.name) for body in keep.bodies
            for s in ExportTraceServiceRequest.FromString(body).resource_spans[0]
            .scope_spans[0].spans]


def _traces(keep: Keep) -> list[int]:
    return sorted({trace for trace, _ in _spans(keep)})


def test_a_record_that_cannot_be_encoded_costs_only_its_own_spans(
        tel: OtelTelemetry, caplog: pytest.LogCaptureFixture) -> None:
    good = [_handed(tel) for _ in range(3)]
    bad = list(good[1])
    bad[1] = "not a trace id"  # no encoder takes it
    keep = Keep()
    with caplog.at_level(logging.WARNING, "inferplane.telemetry"):
        skipped = export.export_spans(tel, keep, [good[0], tuple(bad), good[2]],  # type: ignore[arg-type]
                                      1.0)
    assert skipped == 1
    assert _traces(keep) == sorted([good[0][1], good[2][1]])
    assert "1 of 3 requests not traced" in caplog.text


def test_a_record_its_layout_fails_on_is_encoded_field_by_field(
        tel: OtelTelemetry, monkeypatch: pytest.MonkeyPatch) -> None:
    records = [_handed(tel) for _ in range(3)]
    whole = Keep()
    assert export.export_spans(tel, whole, records, 1.0) == 0  # type: ignore[arg-type]
    real = export.encode_record

    def fails_on_the_second(tel: OtelTelemetry, r: Any, out: list[bytes]) -> None:
        real(tel, r, out)
        if r is records[1]:
            raise ValueError("half-way")  # after appending: the half is not kept

    monkeypatch.setattr(export, "encode_record", fails_on_the_second)
    keep = Keep()
    assert export.export_spans(tel, keep, records, 1.0) == 0  # type: ignore[arg-type]
    assert _spans(keep) == _spans(whole) and len(_traces(keep)) == 3


def test_compact_and_full_records_are_told_apart_by_their_tag_not_their_length(
        tel: OtelTelemetry) -> None:
    t = _request(tel)
    handed, record = t.handed(), t.record()
    assert handed[0] == COMPACT and full(handed) == record
    padded = record + (None,) * (len(handed) - len(record))  # a record as long as a compact
    assert full(padded) is padded
    longer = (*handed, None)  # a compact record with one more value is still one
    assert full(longer) == record


def test_a_request_with_a_time_that_is_no_fixed64_is_handed_over_as_its_full_record(
        tel: OtelTelemetry) -> None:
    """A compact record carries its eight times packed as fixed64 (`records.TIMES`): a request
    with a time outside 0 .. 2**64 - 1 is handed over as its full record instead, and
    `records.compact` makes no compact record of it either."""
    from inferplane.telemetry.records import compact, expand

    t = _request(tel)
    handed = t.handed()
    assert handed[0] == COMPACT and type(handed[6]) is bytes and len(handed) == 40
    assert expand(handed) == t.record() and compact(t.record()) == handed
    for end in (2**64, -1):
        t.end_ns = end
        assert t.handed() == t.record() and t.handed()[0] is True
        assert compact(t.record()) is None


class _Tier(str):
    """A str subclass: a value marshal does not write (pickle does)."""


def test_a_batch_is_handed_over_marshalled_and_decoded_alike(tel: OtelTelemetry) -> None:
    """`export.encode`: a batch of records goes marshalled (its attribute groups kept shared, so
    the exporter finds them by identity), decodes to equal records and encodes to the same
    bytes; a batch with a value marshal cannot write, and the metrics, go pickled."""
    records = [_handed(tel) for _ in range(3)]
    data = export.encode(("spans", records))
    assert data[:1] == export.MARSHALLED
    kind, back = export.decode(data)
    assert kind == "spans" and back == records
    assert back[0][15] is back[1][15] and back[0][34] is back[2][34]  # the decision, the fixed
    sent, again = Keep(), Keep()
    export.handle(tel, sent, data)  # type: ignore[arg-type]
    export.export_spans(tel, again, records, 1.0)  # type: ignore[arg-type]
    assert _spans(sent) == _spans(again) and len(_traces(sent)) == 3
    odd = list(records[0])
    odd[11] = _Tier("tier")  # the model tier: a str subclass
    data = export.encode(("spans", [tuple(odd)]))
    assert data[:1] != export.MARSHALLED and export.decode(data) == ("spans", [tuple(odd)])
    snapshot = tel.metrics_snapshot()
    data = export.encode(("metrics", snapshot))
    assert data[:1] != export.MARSHALLED and export.decode(data)[0] == "metrics"


def test_the_request_path_appends_below_a_full_batch() -> None:
    """`notes.QUEUED_INLINE` (the notes' inline hand-over) is `export.BATCH` - 1: a full batch
    still goes through `Batcher.add`, which wakes the batcher."""
    from inferplane.telemetry import notes

    assert notes.QUEUED_INLINE == export.BATCH - 1


THREADED = parse_config(to_yaml(pool_fleet(
    9,
    telemetry={"enabled": True, "exporter": "thread", "tenant_attribute": True},
    substrate={"name": "p", "region": "r", "cost": {"hourly_usd": 1}},
    models=[model(max_context=4096)],
    tenants=[{"name": "t", "api_keys": [f"sha256:{'0' * 64}"]}],
)))
"""Every request sampled (the default ratio), exported by a batcher thread (not started here)."""


class _Refused(Exception):
    code = "rate_limited"


def _batched() -> tuple[OtelTelemetry, export.Batcher]:
    """An `OtelTelemetry` whose batcher counts as started but has no thread: what the request
    path hands it stays in its queue."""
    tel = OtelTelemetry(THREADED)
    batcher = tel.batcher
    assert batcher is not None and not batcher.started
    batcher.started = True
    batcher._thread = object()  # type: ignore[assignment]
    return tel, batcher


def _every_kind(tel: OtelTelemetry) -> None:
    """Requests the way the gateway notes them (as tests/support/otel_notes_dump.py drives
    them): the common one, a caller's sampled trace with a failed attempt re-placed with a
    spillover and a stage inside a stage, an upstream error, a refusal at admission (a stage's
    error), nothing to place on with an attempt never accounted, a caller's unsampled trace."""
    endpoint = DECISION.picked.endpoint
    spilled = copy.copy(DECISION)
    spilled.spillover = Spillover(reason="preferred endpoints full (1 of 1)", preferred="x",
                                  chosen="e", from_region="r", to_region="r")
    unplaced = copy.copy(DECISION)
    unplaced.picked = None
    trace = "4bf92f3577b34da6a3ce929d0e0e4736"

    def sent(t: Any, decision: Any) -> None:
        t.classified(PROFILE, 16)
        with t.stage("admit"):
            pass
        with t.stage("place"):
            t.placed(decision)
        t.upstream_started(endpoint, "m")
        t.upstream_headers()

    t = tel.request("chat", {"host": "127.0.0.1:8080"})
    sent(t, DECISION)
    t.finished(status=200, error=None, prompt_tokens=7, completion_tokens=5, ttft_s=0.0125,
               tpot_s=0.002)
    t.end()
    t = tel.request("chat", {"traceparent": f"00-{trace}-00f067aa0ba902b7-01",
                             "tracestate": "vendor=abc", "host": "gw.example:8443"})
    sent(t, DECISION)
    t.upstream_failed("upstream_error", 500)
    with t.stage("place"):
        with t.stage("filter"):
            pass
        t.placed(spilled)
    t.upstream_started(endpoint, "m")
    t.finished(status=200, error=None, prompt_tokens=1234, completion_tokens=567,
               ttft_s=0.25, tpot_s=0.0171)
    t.end()
    t = tel.request("completions", {"host": "gw.example"})
    sent(t, DECISION)
    t.finished(status=504, error="upstream timed out", prompt_tokens=3, completion_tokens=None,
               ttft_s=None, tpot_s=None)
    t.end()
    t = tel.request("embeddings", {"traceparent": f"ff-{trace}-00f067aa0ba902b7-01"})
    t.classified(PROFILE, None)
    try:
        with t.stage("admit"):
            raise _Refused
    except _Refused:
        t.failed(429, "rate_limited")
    t.end()
    t = tel.request("chat", {})
    t.classified(PROFILE, 32)
    with t.stage("admit"):
        pass
    with contextlib.suppress(KeyError), t.stage("place"):
        t.placed(unplaced)
        raise KeyError("no endpoint")
    t.upstream_started(endpoint, "m")
    t.end()
    t = tel.request("chat", {"traceparent": f"00-{trace}-00f067aa0ba902b8-00"})
    sent(t, DECISION)
    t.finished(status=200, error=None, prompt_tokens=1, completion_tokens=1, ttft_s=None,
               tpot_s=None)
    t.end()


_PLAIN = (str, bytes, int, float, bool, type(None))


def _not_plain(value: Any, where: str) -> list[str]:
    """Where ``value`` holds anything but an exact str/bytes/int/float/bool/None or a tuple of
    those."""
    if type(value) is tuple:
        return [bad for i, v in enumerate(value) for bad in _not_plain(v, f"{where}[{i}]")]
    return [] if type(value) in _PLAIN else [f"{where}: {type(value).__qualname__}"]


def test_the_records_the_request_path_hands_over_hold_only_exact_plain_values() -> None:
    """The marshalled hand-over (`export.encode`) keeps a value's type only for exact plain
    types: marshal writes any buffer (bytearray, memoryview, a numpy scalar) as bytes, silently,
    and a subclass of a plain type sends the whole batch pickled. So every value of every record
    the request path queues must be an exact str, bytes (a compact record's times), int, float,
    bool, None or tuple of those: a new field of another type fails here rather than change type
    in the exporter."""
    tel, batcher = _batched()
    _every_kind(tel)
    handed = list(batcher.queue)
    batcher.queue.clear()
    assert len(handed) == 5  # the caller's unsampled trace is not handed over
    assert sum(h[0] == COMPACT for h in handed) >= 2  # and the others are full records
    assert [bad for i, h in enumerate(handed) for bad in _not_plain(h, f"record {i}")] == []
    data = export.encode(("spans", handed))
    assert data[:1] == export.MARSHALLED and export.decode(data) == ("spans", handed)
    assert _not_plain((bytearray(b"x"),), "r") == ["r[0]: bytearray"]  # the check itself
    assert _not_plain(((_Tier("t"),),), "r") == ["r[0][0]: _Tier"]
    assert _not_plain((True, 1, 1.5, None, "s", b"t", ((),)), "r") == []


def test_a_started_batcher_is_handed_a_record_inline_woken_at_a_full_batch_and_full_drops() -> None:
    """`OtelTelemetry`'s request path (`notes.OtelTrace.end`): a started batcher below
    `notes.QUEUED_INLINE` queued records gets the record by an append, without `Batcher.add`;
    at `export.BATCH` - 1 queued it goes through `add`, which wakes the batcher; at
    `export.QUEUE_MAX` the record is dropped and counted. An unstarted batcher is started by
    `add`."""
    from inferplane.telemetry import notes

    tel, batcher = _batched()
    added: list[int] = []
    real_add = batcher.add

    def add(record: Any) -> None:
        added.append(len(batcher.queue))
        real_add(record)

    batcher.add = add  # type: ignore[method-assign]
    q = batcher.queue

    def one() -> None:
        assert _placed(tel, DECISION).sampled

    one()
    assert len(q) == 1 and q[0][0] == COMPACT and added == []  # appended inline
    q.extend([None] * (export.BATCH - 3))  # type: ignore[list-item]
    one()  # BATCH - 2 queued before it: still inline, not woken
    assert len(q) == export.BATCH - 1 and added == [] and not batcher._wake.is_set()
    one()  # BATCH - 1 queued: a full batch, through `add`, which wakes the batcher
    assert len(q) == export.BATCH and added == [export.BATCH - 1] and batcher._wake.is_set()
    assert q[-1][0] == COMPACT and notes.QUEUED_INLINE == export.BATCH - 1
    batcher._wake.clear()
    q.extend([None] * (export.QUEUE_MAX - len(q)))  # type: ignore[list-item]
    one()
    assert len(q) == export.QUEUE_MAX and batcher.dropped == 1 and added[-1] == export.QUEUE_MAX
    q.clear()
    batcher.started = False
    started: list[bool] = []
    batcher.start = lambda: started.append(True)  # type: ignore[method-assign]
    one()  # not started: through `add`, which starts it
    assert len(q) == 1 and added[-1] == 0 and started == [True]
    q.clear()


def _stream(*messages: bytes) -> io.BytesIO:
    return io.BytesIO(b"".join(len(m).to_bytes(4, "big") + m for m in messages))


def test_an_exporter_process_of_other_code_than_the_gateways_drops_what_it_is_handed(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """`export.run_exporter`: the gateway hands over its `LAYOUT` with the config (`hello`);
    the exporter process exports the records only when it is its own, else (a package
    upgraded between the gateway's start and its exporter's) logs one error and reads and drops
    every message, as for a gateway that sends no layout."""
    tel, batcher = _batched()
    _every_kind(tel)
    records = list(batcher.queue)
    batcher.queue.clear()
    batch = export.encode(("spans", records))
    handled: list[bytes] = []
    monkeypatch.setattr(export, "handle", lambda tel, sender, data: handled.append(data))
    with caplog.at_level(logging.ERROR, "inferplane.telemetry"):
        export.run_exporter(_stream(export.hello(THREADED), batch, batch))
    assert handled == [batch, batch] and not caplog.records
    for first in (pickle.dumps(("0123456789abcdef", THREADED)), pickle.dumps(THREADED),
                  b"\x80not a pickle"):
        caplog.clear()
        stream = _stream(first, batch, export.encode(("metrics", tel.metrics_snapshot())))
        with caplog.at_level(logging.ERROR, "inferplane.telemetry"):
            export.run_exporter(stream)
        assert handled == [batch, batch]  # nothing more exported
        assert stream.read() == b""  # every message read (the gateway's pipe does not fill)
        assert len(caplog.records) == 1 and "is not this process's" in caplog.text
        assert export.LAYOUT in caplog.text


def test_the_layout_is_the_hash_of_the_sources_that_make_and_read_the_records(
        monkeypatch: pytest.MonkeyPatch) -> None:
    assert export.layout() == export.LAYOUT and len(export.LAYOUT) == 16
    monkeypatch.setattr(export, "LAYOUT_SOURCES", export.LAYOUT_SOURCES[:-1])
    assert export.layout() != export.LAYOUT
    monkeypatch.setattr(export, "LAYOUT_SOURCES", ("no such module.py",))
    assert export.layout().startswith("version ")


@pytest.mark.parametrize("spill", [None, "saturated"])
def test_a_queued_compact_record_is_untracked_by_the_first_young_collection(
        tel: OtelTelemetry, spill: str | None) -> None:
    """A compact record holds no tuple made for its request (the place stage's attributes are
    its candidates count: `records.placement` makes them again), so the garbage collector
    untracks it in the first collection that sees it: a record queued for the batcher is not
    traversed again by each young collection until an older generation's untracks it."""
    import gc

    decision = copy.copy(DECISION)
    if spill is not None:
        decision.spillover = Spillover(reason=spill, preferred="x", chosen="e",
                                       from_region="r", to_region="r")
    for _ in range(2):  # the shared attribute groups: made, then untracked (long-lived)
        gc.collect()
        _placed(tel, decision)
    gc.collect()
    gc.collect()
    enabled = gc.isenabled()
    gc.disable()
    try:
        handed = [_placed(tel, decision).handed() for _ in range(5)]
        assert all(h[0] == COMPACT for h in handed)
        assert all(gc.is_tracked(h) for h in handed)  # a new tuple: tracked until collected
        gc.collect(0)
        assert not any(gc.is_tracked(h) for h in handed)
    finally:
        if enabled:
            gc.enable()
    assert full(handed[0])[22][1][4] == (
        ("inferplane.decision_id", decision.decision_id),
        ("inferplane.candidates", len(decision.candidates)),
        *((("inferplane.spillover.reason", spill),) if spill is not None else ()))


def _placed(tel: OtelTelemetry, decision: Any) -> Any:
    t = tel.request("chat", {})
    with t.stage("admit"):
        pass
    with t.stage("place"):
        t.placed(decision)
    t.upstream_started(decision.picked.endpoint, "m")
    t.finished(status=200, error=None, prompt_tokens=3, completion_tokens=4, ttft_s=0.01,
               tpot_s=0.002)
    t.end()
    return t
