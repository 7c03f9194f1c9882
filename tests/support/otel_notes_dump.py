"""A fixed sequence of request traces through `OtelTelemetry` (no server, no exporter), and a
canonical dump of what the notes (`inferplane.telemetry.notes`, compiled by mypyc in the
optional build) hand over: every record the batcher is given (compact or not: `records.full` of
it), every outgoing ``traceparent``, and the GenAI metric points. `tests/test_compiled.py` runs
it with the compiled build and with ``INFERPLANE_PURE=1`` and compares the two dumps.

The id and clock sources are made deterministic the same way in both runs: ``time.time_ns`` is a
counter installed before inferplane is imported (the notes bind it at import: `notes._now`) and
reset once the setup is done, and ``random``'s global generator (`notes._bits`) is reseeded
then. Run as ``PYTHONPATH=src python tests/support/otel_notes_dump.py``.
"""

from __future__ import annotations

import copy
import random
import sys
import time
from typing import Any

_clock = [0]


def _time_ns() -> int:
    _clock[0] += 1_000_003  # ~1 ms a reading, not round: float durations keep their digits
    return _clock[0]


time.time_ns = _time_ns  # before any inferplane import: the notes keep this function

from inferplane import compiled  # noqa: E402
from inferplane.api.pipeline import Gateway  # noqa: E402
from inferplane.config.loader import parse_config  # noqa: E402
from inferplane.placement.framework import Spillover  # noqa: E402
from inferplane.telemetry import notes  # noqa: E402
from inferplane.telemetry.otel import OtelTelemetry  # noqa: E402
from inferplane.telemetry.records import COMPACT, full  # noqa: E402

CONFIG = """
telemetry: {enabled: true, sample_ratio: 0.5, exporter: thread, tenant_attribute: true}
substrates:
  - {name: p, kind: gpu, hardware: h100, region: r, jurisdiction: eu, cost: {hourly_usd: 1},
     endpoints: [{name: e, url: "http://127.0.0.1:9", models: [{name: m,
     profile: llama-3.1-8b, max_context: 4096}]}]}
tenants: [{name: t, api_keys: ["sha256:%s"]}]
""" % ("0" * 64)
TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
SAMPLED_PARENT = {"traceparent": f"00-{TRACE}-00f067aa0ba902b7-01",
                  "tracestate": "vendor=abc, other=x y", "host": "gw.example:8443"}
UNSAMPLED_PARENT = {"traceparent": f"00-{TRACE}-00f067aa0ba902b8-00", "host": "gw.example"}
BAD_PARENT = {"traceparent": f"ff-{TRACE}-00f067aa0ba902b7-01", "host": "127.0.0.1:8080"}
LOCAL = {"host": "127.0.0.1:8080"}


class Refused(Exception):
    code = "rate_limited"


def drive(tel: OtelTelemetry, gw: Gateway, out: list[str]) -> int:
    """The sequence; returns how many traces were sampled."""
    profile = gw.classify("chat", {"model": "m", "messages": [
        {"role": "user", "content": "hi"}]}, {}, gw.config.tenants[0])
    decision = gw.decide(profile)
    assert decision.picked is not None
    decision.decision_id = "d-1"  # (random otherwise)
    endpoint = decision.picked.endpoint
    spilled = copy.copy(decision)
    spilled.decision_id = "d-2"
    spilled.spillover = Spillover(reason="preferred endpoints full (1 of 1)", preferred="x",
                                  chosen="e", from_region="r", to_region="r")
    unplaced = copy.copy(decision)
    unplaced.decision_id = "d-3"
    unplaced.picked = None
    _clock[0] = 0
    random.seed(20261204)
    traces: list[Any] = []

    def start(api: str, headers: dict[str, str]) -> Any:
        t = tel.request(api, headers)
        traces.append(t)
        return t

    def headers(t: Any) -> None:
        out.append(f"headers {sorted(t.upstream_headers().items())}")

    def sent(t: Any, prompt_tokens: int | None) -> None:
        """Classified, admitted, placed on ``decision``, its upstream call started."""
        t.classified(profile, prompt_tokens)
        with t.stage("admit"):
            pass
        with t.stage("place"):
            t.placed(decision)
        t.upstream_started(endpoint, "m")
        headers(t)

    # 1. the common request: two stages, one attempt, a streamed answer (compact hand-over)
    for _ in range(6):  # own traces, half sampled (sample_ratio 0.5, seeded ids)
        t = start("chat", LOCAL)
        sent(t, 16)
        t.finished(status=200, error=None, prompt_tokens=7, completion_tokens=5,
                   ttft_s=0.0125, tpot_s=0.002)
        t.end()
    # 2. a caller's sampled trace (tracestate): a failed attempt, re-placed (spillover), a good
    # one, streamed usage; `end` twice
    t = start("chat", SAMPLED_PARENT)
    sent(t, None)
    t.upstream_failed("upstream_error", 500)
    with t.stage("place"):
        with t.stage("filter"):  # a stage inside the open one
            pass
        t.placed(spilled)
    t.upstream_started(endpoint, "m")
    headers(t)
    t.finished(status=200, error=None, prompt_tokens=1234, completion_tokens=567,
               ttft_s=0.3333333333333333, tpot_s=0.0171)
    t.end()
    t.end()
    # 3. a caller's unsampled trace: metrics only, the traceparent passed on unsampled
    t = start("completions", UNSAMPLED_PARENT)
    sent(t, 8)
    t.finished(status=504, error="upstream timed out", prompt_tokens=3, completion_tokens=None,
               ttft_s=None, tpot_s=None)
    t.end()
    # 4. an invalid traceparent (a trace of our own), refused at admission (a stage's error)
    for _ in range(3):
        t = start("embeddings", BAD_PARENT)
        t.classified(profile, None)
        try:
            with t.stage("admit"):
                raise Refused
        except Refused:
            t.failed(429, "rate_limited")
        t.end()
        t.end()
    # 5. nothing to place on; then an attempt never accounted (ended without `finished`)
    for _ in range(4):
        t = start("chat", LOCAL)
        t.classified(profile, 32)
        with t.stage("admit"):
            pass
        try:
            with t.stage("place"):
                t.placed(unplaced)
                raise KeyError("no endpoint")
        except KeyError:
            pass
        t.upstream_started(endpoint, "m")
        headers(t)
        t.end()
    for t in traces:
        out.append(f"trace sampled={t.sampled} remote={t.remote} "
                   f"trace={t.trace_id:032x} span={t.span_id:016x} parent={t.parent_id:016x}")
    return sum(t.sampled for t in traces)


def main() -> None:
    config = parse_config(CONFIG)
    gw = Gateway(config)
    gw.telemetry.shutdown()
    tel = OtelTelemetry(config, exporter="thread")
    batcher = tel.batcher
    assert batcher is not None
    batcher._thread = object()  # type: ignore[assignment]  # no thread: the queue is read here
    batcher.started = True
    out: list[str] = [f"build {compiled.status().mode} {notes.__file__}"]
    sampled = drive(tel, gw, out)
    handed = list(batcher.queue)
    batcher.queue.clear()
    for h in handed:
        out.append(f"record compact={h[0] == COMPACT} {full(h)!r}")
    histograms, _, _ = tel.metrics_snapshot()
    points = 0
    for hist in histograms:
        for key, p in sorted(hist.points.items(), key=repr):
            if p[1]:
                points += 1
                out.append(f"point {hist.name} {key!r} {p[:5]!r}")
    out.append(f"sampled {sampled} records {len(handed)} points {points}")
    sys.stdout.write("\n".join(out[1:]) + "\n")
    sys.stderr.write(out[0] + "\n")


if __name__ == "__main__":
    main()
