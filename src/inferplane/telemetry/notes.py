"""One request's trace as the request path sees it: the no-op `RequestTrace` (telemetry off) and
OpenTelemetry's `OtelTrace`, which only notes timestamps and values as the request goes and, when
it ends, appends its GenAI metric values and hands its record over (docs/observability.md,
"Cost").

This module holds everything the request path runs per request and nothing else, so that the
optional mypyc build (``scripts/compile_native.py``, `inferplane.compiled`) compiles it: its
classes are then native classes (an attribute is a field of a C struct, a method call a C call)
and the notes cost a fraction of the interpreter's instructions. Pure Python otherwise, with the
same behaviour. What the request path calls here once per process or per new kind of request
(`OtelTelemetry`'s caches, the batcher, the encoders) stays in `telemetry.otel` and
`telemetry.export`, interpreted; this module imports no OpenTelemetry package at import time
(the disabled gateway imports it too, `telemetry.tracing`).

The core finds the request's trace in a context variable that the front end sets for the
request's task (`RequestTrace.activate`, `current_trace`).
"""

from __future__ import annotations

import random
import re
import struct
import time
from collections.abc import Mapping
from contextvars import ContextVar, Token
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final

from inferplane.telemetry.records import COMPACT as _COMPACT
from inferplane.telemetry.records import TIMES as _TIMES
from inferplane.telemetry.records import Pairs, Record

if TYPE_CHECKING:
    from inferplane.fleet.model import Endpoint
    from inferplane.placement.framework import Decision
    from inferplane.placement.profile import RequestProfile
    from inferplane.telemetry.otel import OtelTelemetry
    from inferplane.telemetry.otlp import SpanData

OPERATION: Final = {"chat": "chat", "completions": "text_completion", "embeddings": "embeddings"}
"""``gen_ai.operation.name`` per API."""

PENDING_MAX: Final = 65536
"""Requests' metric values a series keeps pending at most; past it the request path folds."""

QUEUED_INLINE: Final = 511
"""`export.BATCH` - 1: below this many queued records a started batcher is handed a record by an
append to its queue here (`OtelTrace.end`), else by `export.Batcher.add` (which then starts it,
wakes it at a full batch, or drops the record past `export.QUEUE_MAX`)."""

_STATUS_ERRORS: Final = {499: "client_disconnected", 502: "upstream_error", 504: "upstream_timeout"}
_TRACEPARENT = re.compile(
    r"^\s*([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?\s*$"
)
# module constants are `Final`: compiled, they are C statics, not a dict lookup per use
_bits: Final = random.getrandbits  # the SDK's id source too (reseeded in a forked child)
_now: Final = time.time_ns
COMPACT: Final = _COMPACT
_pack_times: Final = _TIMES.pack


class _NoStage:
    """The stage of a trace that notes nothing: a context manager that does nothing."""

    __slots__ = ()

    def __enter__(self) -> None:
        return None

    def __exit__(self, et: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        return None


_NO_STAGE: Final = _NoStage()


class RequestTrace:
    """One request's trace: a server span with child spans for admit, place and each upstream
    attempt. This base class records nothing."""

    __slots__ = ()

    def activate(self) -> Token[RequestTrace]:
        """Make this the current request's trace (for the core's stages) in this context."""
        return _current.set(self)

    @staticmethod
    def deactivate(token: Token[RequestTrace]) -> None:
        _current.reset(token)

    def stage(self, name: str) -> Any:
        """A context manager: a child span (``admit``, ``place``) around the block; an
        exception marks it."""
        return _NO_STAGE

    def classified(self, profile: RequestProfile, max_tokens: int | None) -> None:
        """The request's model, class, tenant and token limit are known."""

    def placed(self, decision: Decision) -> None:
        """A placement decision was made (one per attempt)."""

    def upstream_started(self, endpoint: Endpoint, model: str) -> None:
        """An attempt on ``endpoint`` begins (the upstream call, or Envoy's in epp mode)."""

    def upstream_headers(self) -> Mapping[str, str]:
        """W3C trace-context headers for the upstream request (empty when not tracing)."""
        return {}

    def upstream_failed(self, error_type: str, status: int | None = None) -> None:
        """The current attempt failed before the first byte (it will be re-placed or fail)."""

    def finished(
        self,
        *,
        status: int,
        error: str | None,
        prompt_tokens: int | None,
        completion_tokens: int | None,
        ttft_s: float | None,
        tpot_s: float | None,
    ) -> None:
        """The answer is accounted: end the upstream span, record the usage metrics."""

    def failed(self, status: int, error_type: str) -> None:
        """The request ends with an error answer (a 4xx, a 503 no-endpoint, a 502 …)."""

    def end(self) -> None:
        """End the server span and record the request duration (idempotent)."""


NOOP = RequestTrace()
_current: ContextVar[RequestTrace] = ContextVar("inferplane_request_trace", default=NOOP)


def current_trace() -> RequestTrace:
    """The trace of the request being handled in this context (`NOOP` outside one)."""
    return _current.get()


class _Stage:
    """A stage of a trace opened inside another (the gateway's ``admit`` and ``place`` are not:
    the trace is their context manager itself, `OtelTrace.stage`): its span's times, error and
    attributes. On exit the stage it was opened in is the open one again."""

    __slots__ = ("attrs", "name", "outer", "start_ns", "trace")

    def __init__(self, trace: OtelTrace, name: str) -> None:
        self.trace = trace
        self.name = name
        self.attrs: Pairs = ()
        self.start_ns = 0
        self.outer: OtelTrace | _Stage | None = None

    def __enter__(self) -> None:
        self.start_ns = _now()
        t = self.trace
        self.outer = t.open_stage
        t.open_stage = self

    def __exit__(self, et: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        t = self.trace
        t.open_stage, self.outer = self.outer, None
        t.stages.append((self.name, self.start_ns, _now(),
                         None if exc is None else _error_type(exc), self.attrs))


class _Attempt:
    """One upstream attempt (a CLIENT span)."""

    __slots__ = ("end_ns", "error_type", "finished", "fixed", "model", "number", "span_id",
                 "start_ns", "status")

    def __init__(self, span_id: int, fixed: Pairs, model: str, number: int) -> None:
        self.span_id = span_id
        self.fixed = fixed
        self.model = model
        self.number = number
        self.start_ns = _now()
        self.end_ns = 0
        self.error_type: str | None = None
        self.status: int | None = None
        self.finished = False


class OtelTrace(RequestTrace):
    """One request: ``{operation} {model}`` (SERVER), with children ``admit`` and ``place``
    (INTERNAL) and one ``{operation} {upstream model}`` (CLIENT) per attempt. Only notes
    values and times; `spans` builds the spans (in the batcher's thread)."""

    __slots__ = (
        "attempt", "attempts", "attrs", "candidates", "class_", "completion_tokens", "decision",
        "decision_id", "end_ns",
        "error", "error_type", "max_tokens", "model", "model_tier", "op", "open_stage",
        "parent_id", "place_attrs", "prompt_tokens", "provider", "remote", "response_model",
        "sampled",
        "server_address", "server_port", "span_id", "spill", "stage_name", "stage_start",
        "stages", "start_ns", "status", "tel", "tenant", "tpot_s", "trace_id", "trace_state",
        "tracestate_header", "ttft_s",
    )

    def __init__(
        self,
        tel: OtelTelemetry,
        api: str,
        headers: Mapping[str, str],
        server_address: str | None,
        server_port: int | None,
    ) -> None:
        self.tel = tel
        self.op = OPERATION.get(api, api)
        self.start_ns = _now()
        self.end_ns = 0  # not ended yet
        self.server_address = server_address
        self.server_port = server_port
        self.span_id = _bits(64) or 1
        self.trace_state = ""
        self.tracestate_header: str | None = None
        parent = headers.get("traceparent")
        context = _parse_traceparent(parent) if parent else None
        if context is not None:  # the caller's trace, and its sampling decision
            self.trace_id, self.parent_id, flags = context
            self.remote = True
            self.sampled = bool(flags & 1)
            state = headers.get("tracestate")
            if state:
                self._trace_state(state)
        else:
            self.trace_id = trace_id = _bits(128) or 1
            self.parent_id = 0
            self.remote = False
            self.sampled = (trace_id & 0xFFFFFFFFFFFFFFFF) < tel.sample_bound
        self.model: str | None = None
        self.model_tier: str | None = None
        self.class_: str | None = None
        self.tenant: str | None = None
        self.max_tokens: int | None = None
        self.decision: Pairs = ()
        self.decision_id: str | None = None
        self.spill: str | None = None
        # the placement attributes the last decision gave the stage open then, and its
        # candidates' count (`handed`: the compact record carries the count, not the tuple)
        self.place_attrs: Pairs | None = None
        self.candidates = 0
        self.provider: str | None = None
        self.response_model: str | None = None
        self.stages: list[tuple[Any, ...]] = []
        self.open_stage: OtelTrace | _Stage | None = None  # the innermost open stage
        self.stage_name: str | None = None  # the trace's own stage (`stage`): its name, start
        self.stage_start = 0
        self.attrs: Pairs = ()  # and its span's attributes
        self.attempts: list[_Attempt] = []
        self.attempt: _Attempt | None = None
        self.status: int | None = None
        self.error: str | None = None
        self.error_type: str | None = None
        self.prompt_tokens: int | None = None
        self.completion_tokens: int | None = None
        self.ttft_s: float | None = None
        self.tpot_s: float | None = None

    def _trace_state(self, raw: str) -> None:
        from opentelemetry.trace.span import TraceState

        state = TraceState.from_header([raw])
        if state:
            self.trace_state = ",".join(f"{k}={v}" for k, v in state.items())
            self.tracestate_header = state.to_header()

    def stage(self, name: str) -> Any:
        """The trace itself (no object per stage), or a `_Stage` for one inside the open one."""
        if not self.sampled:  # an unsampled trace: its children would not be either
            return _NO_STAGE
        if self.stage_name is not None:
            return _Stage(self, name)
        self.stage_name = name
        return self

    def __enter__(self) -> None:
        self.stage_start = _now()
        self.open_stage = self

    def __exit__(self, et: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.open_stage = None
        self.stages.append((self.stage_name, self.stage_start, _now(),
                            None if exc is None else _error_type(exc), self.attrs))
        self.stage_name = None
        self.attrs = ()

    def classified(self, profile: RequestProfile, max_tokens: int | None) -> None:
        self.model = profile.model_alias or profile.model  # what the client asked for
        if profile.model_alias is not None:
            self.model_tier = profile.model
        self.class_ = profile.workload_class
        self.max_tokens = max_tokens
        if self.tel.tenant_attribute:
            self.tenant = profile.tenant

    def placed(self, decision: Decision) -> None:
        if not self.sampled:
            return
        picked = decision.picked
        policy = decision.policy
        if picked is not None:
            tel = self.tel
            info = tel._endpoints.get(picked.name) or tel.endpoint_info(picked.endpoint)
            self.decision = info.decisions.get(policy) or info.decision(policy)
        else:
            self.decision = (("inferplane.policy", policy),)
        self.decision_id = decision_id = decision.decision_id
        spillover = decision.spillover
        self.spill = spill = spillover.reason if spillover is not None else None
        stage = self.open_stage
        if stage is not None:
            self.candidates = n = len(decision.candidates)
            if spill is None:
                attrs: Pairs = (("inferplane.decision_id", decision_id),
                                ("inferplane.candidates", n))
            else:
                attrs = (("inferplane.decision_id", decision_id), ("inferplane.candidates", n),
                         ("inferplane.spillover.reason", spill))
            stage.attrs = self.place_attrs = attrs
        else:
            self.place_attrs = None

    def upstream_started(self, endpoint: Endpoint, model: str) -> None:
        tel = self.tel
        info = tel._endpoints.get(endpoint.name) or tel.endpoint_info(endpoint)
        self.provider = info.provider
        # the endpoint's name for the model, as its info keeps it (an interpreted method call
        # saved: ≈ 3,000 instructions, half this method's)
        upstream = info.upstream.get(model) if info.endpoint is endpoint else None
        if upstream is None:
            upstream = info.upstream_model(endpoint, model)
        self.response_model = upstream
        if not self.sampled:  # no attempt spans: the metrics need only the two above
            return
        op = self.op
        fixed = info.attempts.get((op, upstream)) or info.attempt(op, upstream)
        self.attempt = a = _Attempt(_bits(64) or 1, fixed, upstream, len(self.attempts) + 1)
        self.attempts.append(a)

    def upstream_headers(self) -> Mapping[str, str]:
        if not self.sampled:
            if not self.remote:
                return {}  # a trace of our own that is not sampled: nothing downstream to join
            # a caller's unsampled trace still passes on (sampled flag off)
            out = {"traceparent": _traceparent(self.trace_id, self.span_id, "00")}
        else:
            a = self.attempt
            parent = a.span_id if a is not None else self.span_id
            out = {"traceparent": _traceparent(self.trace_id, parent, "01")}
        if self.tracestate_header:
            out["tracestate"] = self.tracestate_header
        return out

    def upstream_failed(self, error_type: str, status: int | None = None) -> None:
        a = self.attempt
        if a is not None:
            self.attempt = None
            a.end_ns = _now()
            a.error_type = error_type
            a.status = status

    def finished(
        self,
        *,
        status: int,
        error: str | None,
        prompt_tokens: int | None,
        completion_tokens: int | None,
        ttft_s: float | None,
        tpot_s: float | None,
    ) -> None:
        self.status = status
        self.error = error
        if error is not None or status >= 400:
            self.error_type = _STATUS_ERRORS.get(status, str(status))
        self.prompt_tokens = prompt_tokens
        self.completion_tokens = completion_tokens
        self.ttft_s = ttft_s
        self.tpot_s = tpot_s
        a = self.attempt
        if a is not None:
            self.attempt = None
            a.end_ns = _now()
            a.status = status
            a.finished = True
            a.error_type = self.error_type

    def failed(self, status: int, error_type: str) -> None:
        self.status = status
        self.error_type = error_type

    def end(self) -> None:
        """The request ended: its metric values are noted (`observe`); if it is sampled, its
        record is queued for the batcher (`handed`), or its spans handed to the SDK exporter now
        (tests)."""
        if self.end_ns:
            return
        self.end_ns = _now()
        if self.attempt is not None:  # never accounted (a bug, or a stop): still ends
            self.upstream_failed(self.error_type or "not_accounted")
        tel = self.tel
        if tel.histograms:
            self.observe()
        batcher = tel.batcher
        if self.sampled and tel.trace_spans:
            if batcher is not None:  # encoded by the exporter (process, or thread)
                queue = batcher.queue
                if batcher.started and len(queue) < QUEUED_INLINE:
                    queue.append(self.handed())  # `Batcher.add`'s common case, without its call
                else:
                    batcher.add(self.handed())
            elif tel.span_exporter is not None:
                tel.export_now(self.record())
        elif batcher is not None and not batcher.started:
            batcher.start()  # the metrics' exports

    def observe(self) -> None:
        """The GenAI metric points of the finished request: request duration (with
        ``error.type`` on an error), time to first token (successful streams) and input/output
        token usage, each attributed with the operation, provider, request and response model.
        Each value is appended to its point's pending list: no lock (an append is atomic under
        the GIL; the batcher's `Histogram.fold` takes what is there: see its docstring)."""
        tel = self.tel
        error_type = self.error_type
        key = (self.op, self.provider, self.model, self.response_model, error_type)
        series = tel._series.get(key)
        if series is None:
            series = tel.new_series(key)
        durations = series[0]
        durations.append((self.end_ns - self.start_ns) / 1e9)
        ttft = self.ttft_s
        if ttft is not None and error_type is None:
            series[1].append(ttft)
        prompt = self.prompt_tokens
        if prompt is not None:
            series[2].append(prompt)
        completion = self.completion_tokens
        if completion is not None:
            series[3].append(completion)
        if len(durations) >= PENDING_MAX:  # no batcher folding them (or one far behind)
            tel.fold()

    def record(self) -> Record:
        """The request as one flat tuple of plain values (see `records.R_SAMPLED` …): cheap to
        keep, to pickle for the exporter process, and all `records.spans_of` needs."""
        return (
            self.sampled, self.trace_id, self.span_id, self.parent_id, self.remote,
            self.trace_state, self.start_ns, self.end_ns,
            (self.op, self.server_address, self.server_port, self.model, self.model_tier,
             self.class_, self.tenant),
            self.max_tokens, self.decision, self.decision_id, self.spill, self.status,
            self.error, self.error_type, self.prompt_tokens, self.completion_tokens, self.ttft_s,
            self.tpot_s, self.response_model, self.provider, tuple(self.stages),
            tuple([(a.span_id, a.fixed, a.model, a.number, a.start_ns, a.end_ns, a.error_type,
                    a.status, a.finished) for a in self.attempts]),
        )

    def handed(self) -> tuple[Any, ...]:
        """What the batcher hands over: the record, compact (tagged `records.COMPACT`: flat,
        so cheaper to build and to marshal) when the request had two stages and one attempt,
        the second stage with the attributes its placement gave it, as almost every request
        has. The compact record holds that stage's candidates count instead of its attribute
        tuple (`records.expand` makes it again from the count, the decision id and the
        spillover reason): with no tuple made for this request in it, the garbage collector
        untracks the queued record in the first collection that sees it, instead of keeping
        it, a 40-value tuple to traverse, until an older generation's collection. Its eight
        times are one `bytes` value (`records.TIMES`; the full record when one is no fixed64)."""
        stages, attempts = self.stages, self.attempts
        if len(stages) != 2 or len(attempts) != 1:
            return self.record()
        a = attempts[0]
        s0, s1 = stages
        if s1[4] is not self.place_attrs:
            return self.record()
        try:
            times = _pack_times(self.start_ns, self.end_ns, s0[1], s0[2], s1[1], s1[2],
                                a.start_ns, a.end_ns)
        except struct.error:
            return self.record()
        return (
            COMPACT, self.trace_id, self.span_id, self.parent_id, self.remote, self.trace_state,
            times, self.op, self.server_address, self.server_port, self.model, self.model_tier,
            self.class_, self.tenant, self.max_tokens, self.decision, self.decision_id,
            self.spill, self.status, self.error, self.error_type, self.prompt_tokens,
            self.completion_tokens, self.ttft_s, self.tpot_s, self.response_model, self.provider,
            s0[0], s0[3], s0[4], s1[0], s1[3], self.candidates,
            a.span_id, a.fixed, a.model, a.number, a.error_type, a.status, a.finished,
        )

    def spans(self) -> list[SpanData]:
        """The request's spans so far (`records.spans_of` its record)."""
        from inferplane.telemetry.records import spans_of

        return spans_of(self.tel, self.record())


def _traceparent(trace_id: int, span_id: int, flags: str) -> str:
    """A W3C ``traceparent`` (version 00): the ids as fixed-width lowercase hex. Their bytes'
    `hex` (compiled: ≈ 0.5x the instructions of ``"%032x-%016x" %``, whose formatting of each
    int, zero-padded, was ≈ 1,800 instructions)."""
    return f"00-{trace_id.to_bytes(16, 'big').hex()}-{span_id.to_bytes(8, 'big').hex()}-{flags}"


def _parse_traceparent(value: str) -> tuple[int, int, int] | None:
    """(trace id, parent span id, flags) of a valid W3C ``traceparent``, else None (as the
    SDK's propagator: version ``ff``, zero ids, or trailing data on version 00 are invalid)."""
    m = _TRACEPARENT.match(value)
    if m is None:
        return None
    version, trace, span, flags, rest = m.groups()
    if version == "ff" or (version == "00" and rest):
        return None
    trace_id, span_id = int(trace, 16), int(span, 16)
    if not trace_id or not span_id:
        return None
    return trace_id, span_id, int(flags, 16)


def _error_type(exc: BaseException) -> str:
    code = getattr(exc, "code", None) or getattr(exc, "error_type", None)
    return code if isinstance(code, str) else type(exc).__name__
