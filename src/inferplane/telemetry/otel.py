"""The OpenTelemetry side of `telemetry.tracing`: per-request traces and GenAI metrics, exported
over OTLP (OpenTelemetry GenAI semantic conventions, development status; names as of semconv
1.37+: ``gen_ai.operation.name``, ``gen_ai.provider.name``, ``gen_ai.request.model``,
``gen_ai.response.model``, ``gen_ai.usage.input_tokens``, ``gen_ai.usage.output_tokens``,
``gen_ai.request.max_tokens``, ``gen_ai.token.type``, ``server.address``, ``server.port``,
``error.type``).

Imported only when ``telemetry.enabled`` (`tracing.build_telemetry`).

How it stays cheap (docs/observability.md, "Cost"): the request path creates no span objects. An
`OtelTrace` (`telemetry.notes`, compiled by the optional mypyc build) notes timestamps
(``time.time_ns``) and the few values the spans carry as the request goes; when it ends, its
GenAI metric values are appended to their histogram points' pending lists
(`OtelTrace.observe`; the batcher thread folds them into the buckets in bulk) and, if it is
sampled, its record (a tuple of plain values, `telemetry.records`) is queued; an unsampled
request leaves nothing else behind. A background thread (`telemetry.export.Batcher`) hands the
queued records (marshalled: `export.encode`), and every ``export_interval_s`` a copy of the
histograms (pickled), to the exporter process (``telemetry.exporter: process``, the
default), which encodes the records' spans (`records.encode_record`: the common shape by one
precompiled `struct` layout per kind of request), encodes the histograms (`telemetry.otlp`)
and sends all over OTLP/HTTP or OTLP/gRPC; with ``exporter: thread`` the thread does that
itself.
Sampling follows the SDK's ``ParentBased(TraceIdRatioBased(sample_ratio))`` exactly; W3C
``traceparent``/``tracestate`` are read from the caller and written to the upstream.

Given an SDK ``SpanExporter`` (a test's ``InMemorySpanExporter``), each request's spans are
handed to it as SDK ``ReadableSpan`` objects as the request ends, and the metrics are folded
when read (`OtelTelemetry.metrics_request`); nothing is sent anywhere.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit

from inferplane.telemetry.export import Batcher, ExporterProcess, sender_for
from inferplane.telemetry.notes import OtelTrace, RequestTrace
from inferplane.telemetry.notes import _parse_traceparent as _parse_traceparent  # tests
from inferplane.telemetry.otlp import (
    Attrs,
    Histogram,
    SpanEncoder,
    encode_metrics,
    typed_key,
)
from inferplane.telemetry.records import SCOPE, Pairs, Record, spans_of, to_readable
from inferplane.telemetry.tracing import Telemetry

if TYPE_CHECKING:
    from opentelemetry.sdk.trace.export import SpanExporter

    from inferplane.config.schema import FleetConfig
    from inferplane.fleet.model import Endpoint, Fleet

log = logging.getLogger("inferplane.telemetry")

# bucket boundaries the GenAI metrics conventions recommend
DURATION_BUCKETS = (0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48,
                    40.96, 81.92)
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5,
                5.0, 7.5, 10.0)
TOKEN_BUCKETS = (1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304,
                 16777216, 67108864)

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
    """What an endpoint's spans and metric points carry, worked out once: for ``endpoint`` (the
    object it was made from) and any endpoint of the same definition
    (`OtelTelemetry.endpoint_info`)."""

    __slots__ = ("_attempt", "attempts", "decisions", "endpoint", "fixed", "provider", "upstream")

    def __init__(self, endpoint: Endpoint) -> None:
        self.endpoint = endpoint
        # a served model's upstream name (`Endpoint.upstream_model`), by model: read by the
        # request path when it is handed ``endpoint`` itself (`OtelTrace.upstream_started`)
        self.upstream: dict[str, str] = {}
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

    def upstream_model(self, endpoint: Endpoint, model: str) -> str:
        """``endpoint``'s name for ``model`` (`Endpoint.upstream_model`), kept for the next
        request when ``endpoint`` is the one this was made from (an endpoint of the same name
        from another fleet, placed before a reload, may name it otherwise)."""
        upstream = endpoint.upstream_model(model)
        if endpoint is self.endpoint and len(self.upstream) < 256:
            self.upstream[model] = upstream
        return upstream

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
        self.histograms: tuple[Histogram, ...] = (
            (self.duration, self.ttft, self.tokens) if spec.metrics else ())
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
            fleet = self._fleet
            current = endpoint if fleet is None else fleet.get(endpoint.name)
            if current is not None and (
                current is endpoint or current.same_definition(endpoint)
            ):  # kept, made from the current fleet's endpoint (its upstream names cached)
                info = self._endpoints[endpoint.name] = _EndpointInfo(current)
            else:  # a request placed on the old fleet before a reload: not kept
                info = _EndpointInfo(endpoint)
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

    def export_now(self, record: Record) -> None:
        """A sampled request's spans, handed to the SDK exporter (tests: no batcher)."""
        assert self.span_exporter is not None
        self.span_exporter.export([to_readable(s, self) for s in spans_of(self, record)])

    def fold(self) -> None:
        """Add the values the request path left pending to the histograms' points (the
        batcher, before it copies them; or the request path past `notes.PENDING_MAX`)."""
        with self.fold_lock:
            for h in self.histograms:
                h.fold()

    def new_series(self, key: tuple[Any, ...]) -> tuple[list[Any], ...]:
        """The pending-value lists of the metric points of ``key`` (operation, provider,
        request model, response model, error type): duration, time to first token, input and
        output tokens (`OtelTrace.observe` appends to them), made and cached."""
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
