"""The OpenTelemetry side of `telemetry.tracing`: per-request traces and GenAI metrics, exported
over OTLP (OpenTelemetry GenAI semantic conventions, development status; names as of semconv
1.37+: ``gen_ai.operation.name``, ``gen_ai.provider.name``, ``gen_ai.request.model``,
``gen_ai.response.model``, ``gen_ai.usage.input_tokens``, ``gen_ai.usage.output_tokens``,
``gen_ai.request.max_tokens``, ``gen_ai.token.type``, ``server.address``, ``server.port``,
``error.type``).

Imported only when ``telemetry.enabled`` (`tracing.build_telemetry`).

How it stays cheap (docs/observability.md, "Cost"): the request path creates no span objects. An
`OtelTrace` notes timestamps (``time.time_ns``) and the few values the spans carry as the request
goes; when it ends, its GenAI metric values are appended to their histogram points' pending lists
(`OtelTelemetry.observe`; the batcher thread folds them into the buckets in bulk) and, if it is
sampled, its record (a tuple of plain values, `telemetry.records`) is queued; an unsampled
request leaves nothing else behind. A background thread (`telemetry.export.Batcher`) hands the
queued records, and every ``export_interval_s`` a copy of the histograms, pickled, to the
exporter process (``telemetry.exporter: process``, the default), which encodes the records'
spans (`records.encode_record`: the common shape by one precompiled `struct` layout per kind of
request), encodes the histograms (`telemetry.otlp`) and sends all over OTLP/HTTP or OTLP/gRPC;
with ``exporter: thread`` the thread does that itself.
Sampling follows the SDK's ``ParentBased(TraceIdRatioBased(sample_ratio))`` exactly; W3C
``traceparent``/``tracestate`` are read from the caller and written to the upstream.

Given an SDK ``SpanExporter`` (a test's ``InMemorySpanExporter``), each request's spans are
handed to it as SDK ``ReadableSpan`` objects as the request ends, and the metrics are folded
when read (`OtelTelemetry.metrics_request`); nothing is sent anywhere.
"""

from __future__ import annotations

import logging
import random
import re
import threading
import time
from collections.abc import Mapping
from types import TracebackType
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit

from inferplane.telemetry.export import Batcher, ExporterProcess, sender_for
from inferplane.telemetry.otlp import (
    Attrs,
    Histogram,
    SpanData,
    SpanEncoder,
    encode_metrics,
    typed_key,
)
from inferplane.telemetry.records import (
    COMPACT,
    SCOPE,
    Pairs,
    Record,
    spans_of,
    to_readable,
)
from inferplane.telemetry.tracing import RequestTrace, Telemetry

if TYPE_CHECKING:
    from opentelemetry.sdk.trace.export import SpanExporter

    from inferplane.config.schema import FleetConfig
    from inferplane.fleet.model import Endpoint, Fleet
    from inferplane.placement.framework import Decision
    from inferplane.placement.profile import RequestProfile

log = logging.getLogger("inferplane.telemetry")

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
PENDING_MAX = 65536
"""Requests' metric values a series keeps pending at most; past it the request path folds."""



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
        # (operation, model): attempt spans'; policy: the server span's placement attributes
        self.attempts: dict[tuple[str, str], Pairs] = {}
        self.decisions: dict[str, Pairs] = {}
        self._attempt = tuple(fixed)

    def attempt(self, op: str, model: str) -> Pairs:
        a = self.attempts.get((op, model))
        if a is None:
            a = self.attempts[(op, model)] = (
                ("gen_ai.operation.name", op), ("gen_ai.request.model", model), *self._attempt)
        return a

    def decision(self, policy: str) -> Pairs:
        a = self.decisions.get(policy)
        if a is None:
            a = self.decisions[policy] = (("inferplane.policy", policy), *self.fixed)
        return a


class OtelTelemetry(Telemetry):
    """Per-request traces and GenAI metrics, exported over OTLP by a background thread (or
    handed to an SDK ``span_exporter``: tests). ``exporter``: ``process`` or ``thread`` (the
    fleet file's ``telemetry.exporter`` when None), or ``none`` (the exporter process's own: no
    batcher)."""

    enabled = True

    def __init__(self, config: FleetConfig, *, span_exporter: SpanExporter | None = None,
                 exporter: str | None = None) -> None:
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
        self.metrics_lock = threading.Lock()  # a point made (request path), points copied
        self.fold_lock = threading.Lock()  # one `fold` at a time
        # (operation, provider, model, response model, error type) -> its metric points'
        # pending values (duration, time to first token, input and output tokens)
        self._series: dict[tuple[Any, ...], tuple[list[Any], ...]] = {}
        self._endpoints: dict[str, _EndpointInfo] = {}
        self._fleet: Mapping[str, Endpoint] | None = None  # the reloaded fleet's endpoints
        self._servers: dict[tuple[Any, ...], Attrs] = {}
        self._attrs: dict[tuple[tuple[Any, ...], ...], Attrs] = {}
        self._hosts: dict[str | None, tuple[str | None, int | None]] = {}  # Host: address, port
        self.span_exporter = span_exporter
        self.batcher: Batcher | None = None
        if span_exporter is None and exporter != "none":
            if (exporter or spec.exporter) == "process":
                self.batcher = Batcher(self, None, spec, child=ExporterProcess(config))
            else:
                self.batcher = Batcher(self, sender_for(spec), spec)

    def endpoint_info(self, endpoint: Endpoint) -> _EndpointInfo:
        """What ``endpoint``'s spans and metric points carry, cached by its name until the
        fleet is reloaded (`fleet_changed`)."""
        info = self._endpoints.get(endpoint.name)
        if info is None:
            info = _EndpointInfo(endpoint)
            fleet = self._fleet
            current = endpoint if fleet is None else fleet.get(endpoint.name)
            # a request placed on the old fleet before a reload: its endpoint's info not kept
            if current is endpoint or (current is not None and current.same_definition(endpoint)):
                self._endpoints[endpoint.name] = info
        return info

    def fleet_changed(self, fleet: Fleet) -> None:
        self._fleet = fleet.by_name
        self._endpoints = {}

    def attrs(self, pairs: Pairs) -> Attrs:
        """``pairs`` encoded (cached by value and, for values that are no string, by type:
        `otlp.typed_key`)."""
        key = typed_key(pairs)
        a = self._attrs.get(key)
        if a is None:
            if len(self._attrs) >= 4096:
                self._attrs.clear()
            a = self._attrs[key] = Attrs(pairs)
        return a

    def server_attrs(self, key: tuple[Any, ...]) -> Attrs:
        """The server span's attributes that repeat from request to request (cached): ``key``
        is (operation, server address, port, model, model tier, class, tenant)."""
        a = self._servers.get(key)
        if a is None:
            op, address, port, model, tier, class_, tenant = key
            pairs: list[tuple[str, Any]] = [("gen_ai.operation.name", op)]
            if address:
                pairs.append(("server.address", address))
            if port:
                pairs.append(("server.port", port))
            if model is not None:
                pairs.append(("gen_ai.request.model", model))
                if tier is not None:
                    pairs.append(("inferplane.model_tier", tier))
                pairs.append(("inferplane.workload_class", class_))
                if tenant is not None:
                    pairs.append(("inferplane.tenant", tenant))
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
            host = headers.get("host") or headers.get(":authority")
            address = self._hosts.get(host)
            if address is None:
                if len(self._hosts) >= 64:
                    self._hosts.clear()
                address = self._hosts[host] = _host_port(host)
            server_address, server_port = address
        return OtelTrace(self, api, headers, server_address, server_port)

    def ended(self, t: OtelTrace) -> None:
        """A request ended: its metric points are added; if it is sampled, its record is queued
        for the batcher, or its spans handed to the SDK exporter now (tests)."""
        if self.histograms:
            self.observe(t)
        batcher = self.batcher
        if t.sampled and self.trace_spans:
            if batcher is not None:
                batcher.add(t.handed())  # encoded by the exporter (process, or thread)
            elif self.span_exporter is not None:
                self.span_exporter.export([to_readable(s, self)
                                           for s in spans_of(self, t.record())])
        elif batcher is not None and not batcher.started:
            batcher.start()  # the metrics' exports

    def observe(self, t: OtelTrace) -> None:
        """The GenAI metric points of a finished request: request duration (with ``error.type``
        on an error), time to first token (successful streams) and input/output token usage,
        each attributed with the operation, provider, request and response model."""
        error_type = t.error_type
        key = (t.op, t.provider, t.model, t.response_model, error_type)
        series = self._series.get(key)
        if series is None:
            series = self._new_series(key)
        # the points' pending values: one append each, no lock (atomic under the GIL; the
        # batcher's `Histogram.fold` takes what is there: see its docstring)
        durations, ttfts, inputs, outputs = series
        durations.append((t.end_ns - t.start_ns) / 1e9)
        ttft, prompt, completion = t.ttft_s, t.prompt_tokens, t.completion_tokens
        if ttft is not None and error_type is None:
            ttfts.append(ttft)
        if prompt is not None:
            inputs.append(prompt)
        if completion is not None:
            outputs.append(completion)
        if len(durations) >= PENDING_MAX:  # no batcher folding them (or one far behind)
            self.fold()

    def fold(self) -> None:
        """Add the values the request path left pending to the histograms' points (the
        batcher, before it copies them; or the request path past `PENDING_MAX`)."""
        with self.fold_lock:
            for h in self.histograms:
                h.fold()

    def _new_series(self, key: tuple[Any, ...]) -> tuple[list[Any], ...]:
        op, provider, model, response_model, error_type = key
        base: list[tuple[str, Any]] = [("gen_ai.operation.name", op)]
        if provider is not None:
            base.append(("gen_ai.provider.name", provider))
        if model is not None:
            base.append(("gen_ai.request.model", model))
        if response_model is not None:
            base.append(("gen_ai.response.model", response_model))
        pairs = tuple(base)
        with self.metrics_lock:
            series = (
                self.duration.point(
                    pairs if error_type is None else (*pairs, ("error.type", error_type)))[5],
                self.ttft.point(pairs)[5],
                self.tokens.point((*pairs, ("gen_ai.token.type", "input")))[5],
                self.tokens.point((*pairs, ("gen_ai.token.type", "output")))[5],
            )
        if len(self._series) >= 4096:
            self._series.clear()
        self._series[key] = series
        return series

    def forked(self) -> None:
        """In a forked child: the parent's requests are the parent's to count."""
        self.metrics_lock = threading.Lock()
        self.fold_lock = threading.Lock()
        self._series.clear()
        for h in self.histograms:
            h.points.clear()

    def metrics_snapshot(self) -> tuple[list[Histogram], int, int]:
        """A copy of the GenAI histograms so far, their start and now (ns): what a metrics
        export encodes (`encode_metrics`), taken without stopping the request path for long."""
        self.fold()
        with self.metrics_lock:
            copies = [h.copy() for h in self.histograms]
        return copies, self.started_ns, time.time_ns()

    def metrics_request(self) -> bytes | None:
        """The GenAI histograms so far as an ``ExportMetricsServiceRequest`` (None: empty)."""
        return encode_metrics(self.resource_attrs, SCOPE, *self.metrics_snapshot())

    def shutdown(self) -> None:
        if self.batcher is not None:
            self.batcher.shutdown()
        elif self.span_exporter is not None:
            self.span_exporter.shutdown()


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
        self.start_ns = time.time_ns()
        t = self.trace
        self.outer = t.open_stage
        t.open_stage = self

    def __exit__(self, et: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        t = self.trace
        t.open_stage, self.outer = self.outer, None
        t.stages.append((self.name, self.start_ns, time.time_ns(),
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
        self.start_ns = time.time_ns()
        self.end_ns = 0
        self.error_type: str | None = None
        self.status: int | None = None
        self.finished = False


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
        "attempt", "attempts", "attrs", "class_", "completion_tokens", "decision", "decision_id",
        "end_ns", "ended",
        "error", "error_type", "max_tokens", "model", "model_tier", "op", "open_stage",
        "parent_id", "prompt_tokens", "provider", "remote", "response_model", "sampled",
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
        self.decision: Pairs = ()
        self.decision_id: str | None = None
        self.spill: str | None = None
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
        self.ended = False

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
        self.stage_start = time.time_ns()
        self.open_stage = self

    def __exit__(self, et: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.open_stage = None
        self.stages.append((self.stage_name, self.stage_start, time.time_ns(),
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
        if picked is not None:
            tel = self.tel
            info = tel._endpoints.get(picked.name) or tel.endpoint_info(picked.endpoint)
            self.decision = info.decisions.get(decision.policy) or info.decision(decision.policy)
        else:
            self.decision = (("inferplane.policy", decision.policy),)
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
        tel = self.tel
        info = tel._endpoints.get(endpoint.name) or tel.endpoint_info(endpoint)
        self.provider = info.provider
        self.response_model = upstream = endpoint.upstream_model(model)
        if not self.sampled:  # no attempt spans: the metrics need only the two above
            return
        op = self.op
        fixed = info.attempts.get((op, upstream)) or info.attempt(op, upstream)
        self.attempt = a = _Attempt(_bits(64) or 1, fixed, upstream, len(self.attempts) + 1)
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
            a.finished = True
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

    def record(self) -> Record:
        """The request as one flat tuple of plain values (see `R_SAMPLED` …): cheap to keep,
        to pickle for the exporter process, and all `spans_of` needs."""
        return (
            self.sampled, self.trace_id, self.span_id, self.parent_id, self.remote,
            self.trace_state, self.start_ns, self.end_ns,
            (self.op, self.server_address, self.server_port, self.model, self.model_tier,
             self.class_, self.tenant),
            self.max_tokens, self.decision, self.decision_id, self.spill, self.status,
            self.error, self.error_type, self.prompt_tokens, self.completion_tokens, self.ttft_s,
            self.tpot_s, self.response_model, self.provider, tuple(self.stages),
            tuple((a.span_id, a.fixed, a.model, a.number, a.start_ns, a.end_ns, a.error_type,
                   a.status, a.finished) for a in self.attempts),
        )

    def handed(self) -> tuple[Any, ...]:
        """What the batcher hands over: the record, compact (tagged `records.COMPACT`: flat,
        so cheaper to build and to pickle) when the request had two stages and one attempt, as
        almost every request has."""
        stages, attempts = self.stages, self.attempts
        if len(stages) != 2 or len(attempts) != 1:
            return self.record()
        a = attempts[0]
        return (
            COMPACT, self.trace_id, self.span_id, self.parent_id, self.remote, self.trace_state,
            self.start_ns, self.end_ns, self.op, self.server_address, self.server_port,
            self.model, self.model_tier, self.class_, self.tenant, self.max_tokens,
            self.decision, self.decision_id, self.spill, self.status, self.error,
            self.error_type, self.prompt_tokens, self.completion_tokens, self.ttft_s,
            self.tpot_s, self.response_model, self.provider, *stages[0], *stages[1],
            a.span_id, a.fixed, a.model, a.number, a.start_ns, a.end_ns, a.error_type,
            a.status, a.finished,
        )

    def spans(self) -> list[SpanData]:
        """The request's spans so far (`spans_of` its record)."""
        return spans_of(self.tel, self.record())


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
