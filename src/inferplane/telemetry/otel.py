"""The OpenTelemetry side of `telemetry.tracing`: per-request traces and GenAI metrics, exported
over OTLP (OpenTelemetry GenAI semantic conventions, development status; names as of semconv
1.37+: ``gen_ai.operation.name``, ``gen_ai.provider.name``, ``gen_ai.request.model``,
``gen_ai.response.model``, ``gen_ai.usage.input_tokens``, ``gen_ai.usage.output_tokens``,
``gen_ai.request.max_tokens``, ``gen_ai.token.type``, ``server.address``, ``server.port``,
``error.type``).

Imported only when ``telemetry.enabled`` (`tracing.build_telemetry`).

How it stays cheap (docs/observability.md, "Cost"): the request path creates no span objects. An
`OtelTrace` notes timestamps (``time.time_ns``) and the few values the spans carry as the request
goes; when it ends it is appended to a queue. A background thread (`Batcher`) turns the queued
requests into spans (`SpanData`), encodes them in batches straight to OTLP protobuf
(`telemetry.otlp`), aggregates the GenAI histograms, and sends both over OTLP/HTTP or OTLP/gRPC.
Sampling follows the SDK's ``ParentBased(TraceIdRatioBased(sample_ratio))`` exactly; W3C
``traceparent``/``tracestate`` are read from the caller and written to the upstream.

Given an SDK ``SpanExporter`` (a test's ``InMemorySpanExporter``), each request's spans are
handed to it as SDK ``ReadableSpan`` objects as the request ends, and the metrics are aggregated
at once (`OtelTelemetry.metrics_request` reads them); nothing is sent anywhere.
"""

from __future__ import annotations

import logging
import os
import random
import re
import threading
import time
from collections import deque
from collections.abc import Mapping
from types import TracebackType
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit

from inferplane.telemetry.otlp import (
    NO_ATTRS,
    SPAN_KIND,
    Attrs,
    GrpcSender,
    Histogram,
    HttpSender,
    SpanData,
    SpanEncoder,
    encode_metrics,
    send_with_retry,
)
from inferplane.telemetry.tracing import RequestTrace, Telemetry

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import ReadableSpan
    from opentelemetry.sdk.trace.export import SpanExporter

    from inferplane.config.schema import FleetConfig, TelemetrySpec
    from inferplane.fleet.model import Endpoint
    from inferplane.placement.framework import Decision
    from inferplane.placement.profile import RequestProfile

log = logging.getLogger("inferplane.telemetry")

SCOPE = "inferplane"
OPERATION = {"chat": "chat", "completions": "text_completion", "embeddings": "embeddings"}
"""``gen_ai.operation.name`` per API."""

# bucket boundaries the GenAI metrics conventions recommend
DURATION_BUCKETS = (0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48,
                    40.96, 81.92)
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5,
                5.0, 7.5, 10.0)
TOKEN_BUCKETS = (1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304,
                 16777216, 67108864)

_STATUS_ERRORS = {499: "client_disconnected", 502: "upstream_error", 504: "upstream_timeout"}
_TRACEPARENT = re.compile(
    r"^\s*([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?\s*$"
)
_PROVIDER_HOSTS = (
    ("api.openai.com", "openai"),
    (".openai.azure.com", "azure.ai.openai"),
    (".services.ai.azure.com", "azure.ai.inference"),
    ("generativelanguage.googleapis.com", "gcp.gemini"),
    ("aiplatform.googleapis.com", "gcp.vertex_ai"),
    ("api.mistral.ai", "mistral_ai"),
    ("api.groq.com", "groq"),
    ("api.deepseek.com", "deepseek"),
    ("api.perplexity.ai", "perplexity"),
    ("api.x.ai", "x_ai"),
    ("api.cohere.com", "cohere"),
    ("api.cohere.ai", "cohere"),
)
"""Hosted APIs by host, with their ``gen_ai.provider.name`` well-known value."""

_bits = random.getrandbits  # the SDK's id source too (reseeded in a forked child)

QUEUE_MAX = 16384
"""Finished requests waiting for the batcher; past it, requests are not traced (counted)."""
BATCH = 512
"""Requests per encoded batch; a full one wakes the batcher early."""


def parse_headers(raw: str) -> dict[str, str]:
    """OTLP exporter headers written as ``k=v,k2=v2`` (values URL-encoded, as
    ``OTEL_EXPORTER_OTLP_HEADERS``); malformed entries are skipped."""
    out: dict[str, str] = {}
    for item in raw.split(","):
        key, sep, value = item.partition("=")
        if sep and key.strip():
            out[key.strip().lower()] = unquote(value.strip())
    return out


def _address(url: str) -> tuple[str | None, int | None]:
    parts = urlsplit(url)
    try:
        port = parts.port
    except ValueError:
        port = None
    if port is None and parts.scheme in ("http", "https"):
        port = 443 if parts.scheme == "https" else 80
    return parts.hostname, port


def _host_port(host: str | None) -> tuple[str | None, int | None]:
    if not host:
        return None, None
    name, sep, port = host.rpartition(":")
    if sep and port.isdigit() and (name.endswith("]") or ":" not in name):
        return name.strip("[]"), int(port)
    return host.strip("[]"), None


def provider_name(endpoint: Endpoint) -> str:
    """``gen_ai.provider.name`` of an endpoint: its ``provider`` when the fleet file names one;
    ``anthropic`` for the Anthropic dialect; for a provider-api substrate the well-known value of
    its host (``openai`` for api.openai.com, ``azure.ai.openai``, ``gcp.gemini`` …), else
    ``openai`` (the API it speaks); for a self-hosted engine its engine (``vllm``, ``sglang``,
    ``openai-compatible``)."""
    spec = endpoint.spec
    if spec.provider:
        return spec.provider
    if spec.dialect == "anthropic":
        return "anthropic"
    if endpoint.substrate.kind == "provider-api":
        host = (urlsplit(spec.url).hostname or "").lower()
        for suffix, name in _PROVIDER_HOSTS:
            if host == suffix or (suffix.startswith(".") and host.endswith(suffix)):
                return name
        return "openai"
    return spec.engine


def _exporter_headers(spec: TelemetrySpec) -> dict[str, str]:
    return parse_headers(os.environ.get(spec.headers_env, "")) if spec.headers_env else {}


def _sender(spec: TelemetrySpec) -> HttpSender | GrpcSender:
    headers = _exporter_headers(spec)
    if spec.protocol == "grpc":
        return GrpcSender(spec.endpoint, headers, spec.timeout_s)
    return HttpSender(spec.endpoint, headers, spec.timeout_s)


class _EndpointInfo:
    """What an endpoint's spans and metric points carry, worked out once."""

    __slots__ = ("_attempt", "attempts", "decisions", "fixed", "provider")

    def __init__(self, endpoint: Endpoint) -> None:
        address, port = _address(endpoint.url)
        self.provider = provider_name(endpoint)
        fixed: list[tuple[str, Any]] = [
            ("gen_ai.provider.name", self.provider),
            ("inferplane.endpoint", endpoint.name),
            ("inferplane.pool", endpoint.substrate.name),
            ("inferplane.substrate", endpoint.substrate.kind),
        ]
        self.fixed = tuple(fixed)
        if address:
            fixed.append(("server.address", address))
        if port:
            fixed.append(("server.port", port))
        self.attempts: dict[tuple[str, str], Attrs] = {}  # (operation, model): attempt spans'
        self.decisions: dict[str, Attrs] = {}  # policy: the server span's placement attributes
        self._attempt = tuple(fixed)

    def attempt(self, op: str, model: str) -> Attrs:
        a = self.attempts.get((op, model))
        if a is None:
            a = self.attempts[(op, model)] = Attrs(
                (("gen_ai.operation.name", op), ("gen_ai.request.model", model), *self._attempt))
        return a

    def decision(self, policy: str) -> Attrs:
        a = self.decisions.get(policy)
        if a is None:
            a = self.decisions[policy] = Attrs((("inferplane.policy", policy), *self.fixed))
        return a


class OtelTelemetry(Telemetry):
    """Per-request traces and GenAI metrics, exported over OTLP by a background thread (or
    handed to an SDK ``span_exporter``: tests)."""

    enabled = True

    def __init__(self, config: FleetConfig, *, span_exporter: SpanExporter | None = None) -> None:
        from opentelemetry.sdk.resources import Resource  # OTEL_RESOURCE_ATTRIBUTES merged in

        spec = self.spec = config.telemetry
        self.resource = Resource.create(
            {"service.name": spec.service_name, **spec.resource_attributes}
        )
        self.resource_attrs: dict[str, Any] = dict(self.resource.attributes)
        self.encoder = SpanEncoder(self.resource_attrs, SCOPE)
        self.sample_bound = round(spec.sample_ratio * (1 << 64))
        self.tenant_attribute = spec.tenant_attribute
        self.trace_spans = spec.traces
        self.started_ns = time.time_ns()
        self.duration = Histogram(
            "gen_ai.server.request.duration", "s",
            "Generative AI server request duration (to the last byte)", DURATION_BUCKETS)
        self.ttft = Histogram(
            "gen_ai.server.time_to_first_token", "s",
            "Time to generate the first token, for successful streamed responses", TTFT_BUCKETS)
        self.tokens = Histogram(
            "gen_ai.client.token.usage", "{token}", "Input and output tokens used per request",
            TOKEN_BUCKETS)
        self.histograms = (self.duration, self.ttft, self.tokens) if spec.metrics else ()
        self._endpoints: dict[str, _EndpointInfo] = {}
        self._servers: dict[tuple[Any, ...], Attrs] = {}
        self.span_exporter = span_exporter
        self.batcher: Batcher | None = None
        if span_exporter is None:
            self.batcher = Batcher(self, _sender(spec), spec)

    def endpoint_info(self, endpoint: Endpoint) -> _EndpointInfo:
        info = self._endpoints.get(endpoint.name)
        if info is None:
            info = self._endpoints[endpoint.name] = _EndpointInfo(endpoint)
        return info

    def server_attrs(self, t: OtelTrace) -> Attrs:
        """The server span's attributes that repeat from request to request (cached)."""
        key = (t.op, t.server_address, t.server_port, t.model, t.model_tier, t.class_, t.tenant)
        a = self._servers.get(key)
        if a is None:
            pairs: list[tuple[str, Any]] = [("gen_ai.operation.name", t.op)]
            if t.server_address:
                pairs.append(("server.address", t.server_address))
            if t.server_port:
                pairs.append(("server.port", t.server_port))
            if t.model is not None:
                pairs.append(("gen_ai.request.model", t.model))
                if t.model_tier is not None:
                    pairs.append(("inferplane.model_tier", t.model_tier))
                pairs.append(("inferplane.workload_class", t.class_))
                if t.tenant is not None:
                    pairs.append(("inferplane.tenant", t.tenant))
            if len(self._servers) >= 4096:
                self._servers.clear()
            a = self._servers[key] = Attrs(pairs)
        return a

    def request(
        self,
        api: str,
        headers: Mapping[str, str],
        *,
        server_address: str | None = None,
        server_port: int | None = None,
    ) -> RequestTrace:
        if server_address is None:
            server_address, server_port = _host_port(
                headers.get("host") or headers.get(":authority")
            )
        return OtelTrace(self, api, headers, server_address, server_port)

    def ended(self, trace: OtelTrace) -> None:
        """A request ended: queue it for the batcher, or process it now (an SDK exporter)."""
        if self.batcher is not None:
            self.batcher.add(trace)
            return
        self.record_metrics(trace)
        if trace.sampled and self.trace_spans and self.span_exporter is not None:
            self.span_exporter.export([to_readable(s, self) for s in trace.spans()])

    def record_metrics(self, t: OtelTrace) -> None:
        if not self.histograms:
            return
        base: list[tuple[str, Any]] = [("gen_ai.operation.name", t.op)]
        if t.provider is not None:
            base.append(("gen_ai.provider.name", t.provider))
        if t.model is not None:
            base.append(("gen_ai.request.model", t.model))
        if t.response_model is not None:
            base.append(("gen_ai.response.model", t.response_model))
        key = tuple(base)
        if t.error_type is not None:
            self.duration.record((t.end_ns - t.start_ns) / 1e9,
                                 (*key, ("error.type", t.error_type)))
        else:
            self.duration.record((t.end_ns - t.start_ns) / 1e9, key)
            if t.ttft_s is not None:
                self.ttft.record(t.ttft_s, key)
        if t.prompt_tokens is not None:
            self.tokens.record(t.prompt_tokens, (*key, ("gen_ai.token.type", "input")))
        if t.completion_tokens is not None:
            self.tokens.record(t.completion_tokens, (*key, ("gen_ai.token.type", "output")))

    def metrics_request(self) -> bytes | None:
        """The GenAI histograms so far as an ``ExportMetricsServiceRequest`` (None: empty)."""
        return encode_metrics(self.resource_attrs, SCOPE, self.histograms, self.started_ns,
                              time.time_ns())

    def shutdown(self) -> None:
        if self.batcher is not None:
            self.batcher.shutdown()
        elif self.span_exporter is not None:
            self.span_exporter.shutdown()


class Batcher:
    """The background thread: every ``min(5 s, export_interval_s)`` (or when `BATCH` requests
    are waiting) it encodes the finished requests' spans and sends them; every
    ``export_interval_s`` it sends the GenAI histograms. Started by the first request (so a
    process that forks after building the gateway gets its own thread)."""

    def __init__(self, tel: OtelTelemetry, sender: HttpSender | GrpcSender,
                 spec: TelemetrySpec) -> None:
        self.tel = tel
        self.sender = sender
        self.delay_s = min(5.0, spec.export_interval_s)
        self.metrics_interval_s = spec.export_interval_s
        self.timeout_s = spec.timeout_s
        self.queue: deque[OtelTrace] = deque()
        self.dropped = 0
        self._wake = threading.Event()
        self._stop = False
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()  # one drain at a time (the thread, or the shutdown)
        self._next_metrics = time.monotonic() + self.metrics_interval_s
        os.register_at_fork(after_in_child=self._forked)

    def _forked(self) -> None:
        self.queue.clear()
        self._thread = None
        self._lock = threading.Lock()
        self._wake = threading.Event()

    def add(self, trace: OtelTrace) -> None:
        q = self.queue
        if len(q) >= QUEUE_MAX:
            self.dropped += 1
            return
        q.append(trace)
        if self._thread is None:
            self._start()
        elif len(q) >= BATCH:
            self._wake.set()

    def _start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="inferplane-otlp", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop:
            self._wake.wait(self.delay_s)
            self._wake.clear()
            if self._stop:
                return
            try:
                self.flush(metrics=time.monotonic() >= self._next_metrics)
            except Exception:  # an export bug must not stop the exports
                log.exception("OTLP batcher failed")

    def flush(self, *, metrics: bool) -> None:
        with self._lock:
            tel, q = self.tel, self.queue
            spans: list[SpanData] = []
            requests = 0
            while q:
                t = q.popleft()
                tel.record_metrics(t)
                if t.sampled and tel.trace_spans:
                    spans.extend(t.spans())
                    requests += 1
                    if requests >= BATCH:
                        send_with_retry(self.sender, "traces", tel.encoder.request(spans),
                                        self.timeout_s)
                        spans, requests = [], 0
            if spans:
                send_with_retry(self.sender, "traces", tel.encoder.request(spans),
                                self.timeout_s)
            if metrics:
                self._next_metrics = time.monotonic() + self.metrics_interval_s
                body = tel.metrics_request()
                if body is not None:
                    send_with_retry(self.sender, "metrics", body, self.timeout_s)

    def shutdown(self) -> None:
        self._stop = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(self.timeout_s + 5)
        try:
            self.flush(metrics=True)
        finally:
            self.sender.close()
        if self.dropped:
            log.warning("OTLP: %d requests were not traced (the export queue was full)",
                        self.dropped)


class _Stage:
    """An ``admit`` or ``place`` stage of a trace: its span's times, error and attributes."""

    __slots__ = ("attrs", "end_ns", "error_type", "name", "span_id", "start_ns", "trace")

    def __init__(self, trace: OtelTrace, name: str) -> None:
        self.trace = trace
        self.name = name
        self.attrs: tuple[tuple[str, Any], ...] = ()
        self.error_type: str | None = None
        self.start_ns = self.end_ns = 0
        self.span_id = 0

    def __enter__(self) -> None:
        self.start_ns = time.time_ns()
        self.trace.open_stage = self

    def __exit__(self, et: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.end_ns = time.time_ns()
        t = self.trace
        t.open_stage = None
        t.stages.append(self)
        if exc is not None:
            self.error_type = _error_type(exc)


class _Attempt:
    """One upstream attempt (a CLIENT span)."""

    __slots__ = ("end_ns", "error_type", "fixed", "model", "number", "span_id", "start_ns",
                 "status", "usage")

    def __init__(self, span_id: int, fixed: Attrs, model: str, number: int) -> None:
        self.span_id = span_id
        self.fixed = fixed
        self.model = model
        self.number = number
        self.start_ns = time.time_ns()
        self.end_ns = 0
        self.error_type: str | None = None
        self.status: int | None = None
        self.usage: tuple[tuple[str, Any], ...] = ()


class _NoStage:
    __slots__ = ()

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


_NO_STAGE = _NoStage()


class OtelTrace(RequestTrace):
    """One request: ``{operation} {model}`` (SERVER), with children ``admit`` and ``place``
    (INTERNAL) and one ``{operation} {upstream model}`` (CLIENT) per attempt. Only notes
    values and times; `spans` builds the spans (in the batcher's thread)."""

    __slots__ = (
        "attempt", "attempts", "class_", "completion_tokens", "decision", "decision_id", "end_ns",
        "ended",
        "error", "error_type", "max_tokens", "model", "model_tier", "op", "open_stage",
        "parent_id", "prompt_tokens", "provider", "remote", "response_model", "sampled",
        "server_address", "server_port", "span_id", "spill", "stages", "start_ns", "status", "tel",
        "tenant", "tpot_s", "trace_id", "trace_state", "tracestate_header", "ttft_s",
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
        self.start_ns = time.time_ns()
        self.end_ns = 0
        self.server_address, self.server_port = server_address, server_port
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
            self.trace_id = _bits(128) or 1
            self.parent_id = 0
            self.remote = False
            self.sampled = (self.trace_id & 0xFFFFFFFFFFFFFFFF) < tel.sample_bound
        self.model: str | None = None
        self.model_tier: str | None = None
        self.class_: str | None = None
        self.tenant: str | None = None
        self.max_tokens: int | None = None
        self.decision = NO_ATTRS
        self.decision_id: str | None = None
        self.spill: str | None = None
        self.provider: str | None = None
        self.response_model: str | None = None
        self.stages: list[_Stage] = []
        self.open_stage: _Stage | None = None
        self.attempts: list[_Attempt] = []
        self.attempt: _Attempt | None = None
        self.status: int | None = None
        self.error: str | None = None
        self.error_type: str | None = None
        self.prompt_tokens: int | None = None
        self.completion_tokens: int | None = None
        self.ttft_s: float | None = None
        self.tpot_s: float | None = None
        self.ended = False

    def _trace_state(self, raw: str) -> None:
        from opentelemetry.trace.span import TraceState

        state = TraceState.from_header([raw])
        if state:
            self.trace_state = ",".join(f"{k}={v}" for k, v in state.items())
            self.tracestate_header = state.to_header()

    def stage(self, name: str) -> Any:
        if not self.sampled:  # an unsampled trace: its children would not be either
            return _NO_STAGE
        return _Stage(self, name)

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
        if decision.picked is not None:
            info = self.tel.endpoint_info(decision.picked.endpoint)
            self.decision = info.decision(decision.policy)
        else:
            self.decision = Attrs((("inferplane.policy", decision.policy),))
        self.decision_id = decision.decision_id
        self.spill = decision.spillover.reason if decision.spillover is not None else None
        stage = self.open_stage
        if stage is not None:
            attrs: tuple[tuple[str, Any], ...] = (
                ("inferplane.decision_id", decision.decision_id),
                ("inferplane.candidates", len(decision.candidates)))
            if self.spill is not None:
                attrs = (*attrs, ("inferplane.spillover.reason", self.spill))
            stage.attrs = attrs

    def upstream_started(self, endpoint: Endpoint, model: str) -> None:
        info = self.tel.endpoint_info(endpoint)
        self.provider = info.provider
        self.response_model = endpoint.upstream_model(model)
        self.attempt = a = _Attempt(_bits(64) or 1, info.attempt(self.op, self.response_model),
                                    self.response_model, len(self.attempts) + 1)
        self.attempts.append(a)

    def upstream_headers(self) -> Mapping[str, str]:
        if not self.sampled and not self.remote:
            return {}  # a trace of our own that is not sampled: nothing downstream to join
        # a caller's unsampled trace still passes on (sampled flag off)
        parent = self.attempt.span_id if self.attempt is not None and self.sampled else \
            self.span_id
        out = {"traceparent":
               f"00-{self.trace_id:032x}-{parent:016x}-{'01' if self.sampled else '00'}"}
        if self.tracestate_header:
            out["tracestate"] = self.tracestate_header
        return out

    def upstream_failed(self, error_type: str, status: int | None = None) -> None:
        a, self.attempt = self.attempt, None
        if a is not None:
            a.end_ns = time.time_ns()
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
        self.prompt_tokens, self.completion_tokens = prompt_tokens, completion_tokens
        self.ttft_s, self.tpot_s = ttft_s, tpot_s
        a, self.attempt = self.attempt, None
        if a is not None:
            a.end_ns = time.time_ns()
            a.status = status
            a.usage = self._usage()
            a.error_type = self.error_type

    def failed(self, status: int, error_type: str) -> None:
        self.status = status
        self.error_type = error_type

    def end(self) -> None:
        if self.ended:
            return
        self.ended = True
        self.end_ns = time.time_ns()
        a = self.attempt
        if a is not None:  # never accounted (a bug, or a stop): still ends
            self.upstream_failed(self.error_type or "not_accounted")
        self.tel.ended(self)

    # -- in the batcher's thread -------------------------------------------------------------
    def _usage(self) -> tuple[tuple[str, Any], ...]:
        usage: list[tuple[str, Any]] = []
        if self.status is not None:
            usage.append(("http.response.status_code", self.status))
        if self.response_model is not None:
            usage.append(("gen_ai.response.model", self.response_model))
        if self.prompt_tokens is not None:
            usage.append(("gen_ai.usage.input_tokens", self.prompt_tokens))
        if self.completion_tokens is not None:
            usage.append(("gen_ai.usage.output_tokens", self.completion_tokens))
        if self.ttft_s is not None:
            usage.append(("inferplane.ttft_s", self.ttft_s))
        if self.tpot_s is not None:
            usage.append(("inferplane.tpot_s", self.tpot_s))
        return tuple(usage)

    def spans(self) -> list[SpanData]:
        """The request's spans, children first, the server span last."""
        tid, sid, op, state = self.trace_id, self.span_id, self.op, self.trace_state
        out: list[SpanData] = []
        for st in self.stages:
            st.span_id = _bits(64) or 1
            attrs: tuple[tuple[str, Any], ...] = st.attrs
            if st.error_type is not None:
                attrs = (*attrs, ("error.type", st.error_type))
            out.append(SpanData(tid, st.span_id, sid, False, state, st.name,
                                SPAN_KIND["internal"], st.start_ns, st.end_ns, (), attrs,
                                st.error_type is not None, None))
        for a in self.attempts:
            attrs = (("inferplane.attempt", a.number), *a.usage)
            err = a.error_type
            if err is not None:
                if a.status is not None and not a.usage:
                    attrs = (*attrs, ("http.response.status_code", a.status))
                attrs = (*attrs, ("error.type", err))
            out.append(SpanData(tid, a.span_id, sid, False, state, f"{op} {a.model}",
                                SPAN_KIND["client"], a.start_ns, a.end_ns or self.end_ns,
                                (a.fixed,), attrs, err is not None,
                                self.error if a.usage else None))
        server: list[tuple[str, Any]] = []
        name = op
        if self.model is not None:
            name = f"{op} {self.model}"
            if self.max_tokens is not None:
                server.append(("gen_ai.request.max_tokens", self.max_tokens))
        if self.decision_id is not None:
            server.append(("inferplane.decision_id", self.decision_id))
        if self.spill is not None:
            server.append(("inferplane.spillover.reason", self.spill))
        if self.attempts:
            server.append(("inferplane.attempts", len(self.attempts)))
        if self.attempts and self.attempts[-1].usage:
            server += self.attempts[-1].usage
        elif self.status is not None:
            server.append(("http.response.status_code", self.status))
        error = False
        if self.error_type is not None:
            server.append(("error.type", self.error_type))
            error = self.status is not None and self.status >= 500
        out.append(SpanData(tid, sid, self.parent_id, self.remote, state, name,
                            SPAN_KIND["server"], self.start_ns, self.end_ns,
                            (self.tel.server_attrs(self), self.decision), server, error,
                            self.error if error else None))
        return out


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


def to_readable(s: SpanData, tel: OtelTelemetry) -> ReadableSpan:
    """An SDK ``ReadableSpan`` of the same span (for SDK span exporters)."""
    from opentelemetry.sdk.trace import ReadableSpan
    from opentelemetry.sdk.util.instrumentation import InstrumentationScope
    from opentelemetry.trace import SpanContext, SpanKind, Status, StatusCode, TraceFlags
    from opentelemetry.trace.span import TraceState

    state = TraceState([tuple(kv.split("=", 1)) for kv in s.trace_state.split(",")]  # type: ignore[misc]
                       ) if s.trace_state else None
    flags = TraceFlags(TraceFlags.SAMPLED)
    parent = (SpanContext(s.trace_id, s.parent_id, is_remote=s.parent_remote, trace_flags=flags,
                          trace_state=state) if s.parent_id else None)
    kind = {1: SpanKind.INTERNAL, 2: SpanKind.SERVER, 3: SpanKind.CLIENT}[s.kind]
    return ReadableSpan(
        name=s.name,
        context=SpanContext(s.trace_id, s.span_id, is_remote=False, trace_flags=flags,
                            trace_state=state),
        parent=parent,
        resource=tel.resource,
        attributes={**{k: v for a in s.fixed for k, v in a.pairs}, **dict(s.attributes)},
        kind=kind,
        status=Status(StatusCode.ERROR, s.message) if s.error else Status(StatusCode.UNSET),
        start_time=s.start_ns,
        end_time=s.end_ns,
        instrumentation_scope=InstrumentationScope(SCOPE),
    )


def _error_type(exc: BaseException) -> str:
    code = getattr(exc, "code", None) or getattr(exc, "error_type", None)
    return code if isinstance(code, str) else type(exc).__name__
