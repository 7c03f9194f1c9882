"""The hand-over of finished requests to the exporter (`OtelTrace.handed`, `records.full`) and
`telemetry.export.export_spans`: what one batch of records becomes when some cannot be
encoded."""

from __future__ import annotations

import logging
from typing import Any

import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from inferplane.telemetry import export
from inferplane.telemetry.otel import OtelTelemetry
from inferplane.telemetry.records import COMPACT, full
from tests.test_otel_encoding import CONFIG, DECISION


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
    assert back[0][16] is back[1][16] and back[0][39] is back[2][39]  # the decision, the fixed
    sent, again = Keep(), Keep()
    export.handle(tel, sent, data)  # type: ignore[arg-type]
    export.export_spans(tel, again, records, 1.0)  # type: ignore[arg-type]
    assert _spans(sent) == _spans(again) and len(_traces(sent)) == 3
    odd = list(records[0])
    odd[12] = _Tier("tier")  # the model tier: a str subclass
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
