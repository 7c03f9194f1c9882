"""The OpenTelemetry side of `telemetry.tracing`: SDK providers, OTLP exporters, and the
per-request spans and GenAI metrics (OpenTelemetry GenAI semantic conventions, development
status; names as of semconv 1.37+: ``gen_ai.operation.name``, ``gen_ai.request.model``,
``gen_ai.response.model``, ``gen_ai.usage.input_tokens``, ``gen_ai.usage.output_tokens``,
``gen_ai.request.max_tokens``, ``gen_ai.token.type``, ``server.address``, ``server.port``,
``error.type``).

Imported only when ``telemetry.enabled`` (`tracing.build_telemetry`). The providers are this
process's own (never the global ones), so two cores in one process, or a test's in-memory
exporter, do not see each other's spans.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit

from opentelemetry import context as otel_context
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import (
    MetricExporter,
    MetricReader,
    PeriodicExportingMetricReader,
)
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    SimpleSpanProcessor,
    SpanExporter,
)
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
from opentelemetry.trace import Span, SpanKind, Status, StatusCode, set_span_in_context
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from inferplane.telemetry.tracing import RequestTrace, Telemetry

if TYPE_CHECKING:
    from inferplane.config.schema import FleetConfig, TelemetrySpec
    from inferplane.fleet.model import Endpoint
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


def _exporters(spec: TelemetrySpec) -> tuple[SpanExporter | None, MetricExporter | None]:
    headers = parse_headers(os.environ.get(spec.headers_env, "")) if spec.headers_env else {}
    base = spec.endpoint.rstrip("/")
    span_exporter: SpanExporter | None = None
    metric_exporter: MetricExporter | None = None
    if spec.protocol == "grpc":
        try:
            from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import (
                OTLPMetricExporter as GrpcMetricExporter,
            )
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (
                OTLPSpanExporter as GrpcSpanExporter,
            )
        except ImportError as exc:
            raise RuntimeError(
                "telemetry.protocol grpc needs the opentelemetry-exporter-otlp-proto-grpc "
                "package; install it or use http/protobuf"
            ) from exc
        if spec.traces:
            span_exporter = GrpcSpanExporter(
                endpoint=base, headers=headers, timeout=spec.timeout_s,
                insecure=base.startswith("http://"),
            )
        if spec.metrics:
            metric_exporter = GrpcMetricExporter(
                endpoint=base, headers=headers, timeout=spec.timeout_s,
                insecure=base.startswith("http://"),
            )
        return span_exporter, metric_exporter
    from opentelemetry.exporter.otlp.proto.http.metric_exporter import (
        OTLPMetricExporter as HttpMetricExporter,
    )
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
        OTLPSpanExporter as HttpSpanExporter,
    )

    if spec.traces:
        span_exporter = HttpSpanExporter(
            endpoint=base + "/v1/traces", headers=headers, timeout=spec.timeout_s
        )
    if spec.metrics:
        metric_exporter = HttpMetricExporter(
            endpoint=base + "/v1/metrics", headers=headers, timeout=spec.timeout_s
        )
    return span_exporter, metric_exporter


class OtelTelemetry(Telemetry):
    """Tracing and GenAI metrics through the OpenTelemetry SDK."""

    enabled = True

    def __init__(
        self,
        config: FleetConfig,
        *,
        span_exporter: SpanExporter | None = None,
        metric_reader: MetricReader | None = None,
    ) -> None:
        spec = config.telemetry
        self.spec = spec
        resource = Resource.create(
            {"service.name": spec.service_name, **spec.resource_attributes}
        )
        interval_ms = spec.export_interval_s * 1000
        if span_exporter is None and metric_reader is None:
            span_exporter, metric_exporter = _exporters(spec)
            if metric_exporter is not None:
                metric_reader = PeriodicExportingMetricReader(
                    metric_exporter,
                    export_interval_millis=interval_ms,
                    export_timeout_millis=spec.timeout_s * 1000,
                )
            processor: Any = (
                BatchSpanProcessor(
                    span_exporter, schedule_delay_millis=min(5000.0, interval_ms),
                    export_timeout_millis=spec.timeout_s * 1000,
                )
                if span_exporter is not None else None
            )
        else:  # a test's in-memory exporter: every span exported as it ends
            processor = SimpleSpanProcessor(span_exporter) if span_exporter is not None else None
        self.tracer_provider = TracerProvider(
            resource=resource, sampler=ParentBased(TraceIdRatioBased(spec.sample_ratio))
        )
        if processor is not None and spec.traces:
            self.tracer_provider.add_span_processor(processor)
        self.tracer = self.tracer_provider.get_tracer("inferplane")
        self.meter_provider = MeterProvider(
            resource=resource, metric_readers=[metric_reader] if metric_reader else []
        )
        meter = self.meter_provider.get_meter("inferplane")
        self.duration = meter.create_histogram(
            "gen_ai.server.request.duration", unit="s",
            description="Generative AI server request duration (to the last byte)",
            explicit_bucket_boundaries_advisory=DURATION_BUCKETS,
        )
        self.ttft = meter.create_histogram(
            "gen_ai.server.time_to_first_token", unit="s",
            description="Time to generate the first token, for successful streamed responses",
            explicit_bucket_boundaries_advisory=TTFT_BUCKETS,
        )
        self.tokens = meter.create_histogram(
            "gen_ai.client.token.usage", unit="{token}",
            description="Input and output tokens used per request",
            explicit_bucket_boundaries_advisory=TOKEN_BUCKETS,
        )
        self.propagator = TraceContextTextMapPropagator()
        self.tenant_attribute = spec.tenant_attribute

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

    def shutdown(self) -> None:
        for provider in (self.tracer_provider, self.meter_provider):
            try:
                provider.shutdown()
            except Exception:  # a collector that is gone must not fail the stop
                log.warning("telemetry shutdown failed", exc_info=True)


class OtelTrace(RequestTrace):
    """One request's spans: ``{operation} {model}`` (SERVER), with children ``admit`` and
    ``place`` (INTERNAL) and one ``{operation} {upstream model}`` (CLIENT) per attempt."""

    __slots__ = (
        "attempt", "continued", "ctx", "ended", "error_type", "metric_attrs", "op", "recording",
        "span", "stage_span", "started", "tel", "upstream", "upstream_ctx",
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
        self.started = time.perf_counter()
        self.continued = "traceparent" in headers
        parent = tel.propagator.extract(headers) if self.continued else None
        attrs: dict[str, Any] = {"gen_ai.operation.name": self.op}
        if server_address:
            attrs["server.address"] = server_address
        if server_port:
            attrs["server.port"] = server_port
        self.span: Span = tel.tracer.start_span(
            self.op, context=parent, kind=SpanKind.SERVER, attributes=attrs
        )
        self.recording = self.span.is_recording()
        self.ctx = set_span_in_context(self.span)
        self.metric_attrs: dict[str, Any] = {"gen_ai.operation.name": self.op}
        self.stage_span: Span | None = None
        self.upstream: Span | None = None
        self.upstream_ctx: otel_context.Context | None = None
        self.error_type: str | None = None
        self.ended = False
        self.attempt = 0

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        if not self.recording:  # an unsampled trace: its children would not be either
            yield
            return
        span = self.tel.tracer.start_span(name, context=self.ctx, kind=SpanKind.INTERNAL)
        outer, self.stage_span = self.stage_span, span
        try:
            yield
        except BaseException as exc:
            _mark_error(span, _error_type(exc))
            raise
        finally:
            self.stage_span = outer
            span.end()

    def classified(self, profile: RequestProfile, max_tokens: int | None) -> None:
        model = profile.model_alias or profile.model  # what the client asked for
        self.metric_attrs["gen_ai.request.model"] = model
        if not self.recording:
            return
        span = self.span
        span.update_name(f"{self.op} {model}")
        span.set_attribute("gen_ai.request.model", model)
        if profile.model_alias is not None:
            span.set_attribute("inferplane.model_tier", profile.model)
        span.set_attribute("inferplane.workload_class", profile.workload_class)
        if max_tokens is not None:
            span.set_attribute("gen_ai.request.max_tokens", max_tokens)
        if self.tel.tenant_attribute:
            span.set_attribute("inferplane.tenant", profile.tenant)

    def placed(self, decision: Decision) -> None:
        if not self.recording:
            return
        attrs: dict[str, Any] = {"inferplane.decision_id": decision.decision_id,
                                 "inferplane.policy": decision.policy}
        if decision.picked is not None:
            ep = decision.picked.endpoint
            attrs.update({
                "inferplane.endpoint": ep.name,
                "inferplane.pool": ep.substrate.name,
                "inferplane.substrate": ep.substrate.kind,
            })
        if decision.spillover is not None:
            attrs["inferplane.spillover.reason"] = decision.spillover.reason
        if self.stage_span is not None:
            self.stage_span.set_attributes(attrs)
            self.stage_span.set_attribute("inferplane.candidates", len(decision.candidates))
        self.span.set_attributes(attrs)

    def upstream_started(self, endpoint: Endpoint, model: str) -> None:
        self.attempt += 1
        upstream_model = endpoint.upstream_model(model)
        self.metric_attrs["gen_ai.response.model"] = upstream_model
        if not self.recording:
            return
        address, port = _address(endpoint.url)
        attrs: dict[str, Any] = {
            "gen_ai.operation.name": self.op,
            "gen_ai.request.model": upstream_model,
            "inferplane.endpoint": endpoint.name,
            "inferplane.pool": endpoint.substrate.name,
            "inferplane.substrate": endpoint.substrate.kind,
            "inferplane.attempt": self.attempt,
        }
        if address:
            attrs["server.address"] = address
        if port:
            attrs["server.port"] = port
        self.upstream = self.tel.tracer.start_span(
            f"{self.op} {upstream_model}", context=self.ctx, kind=SpanKind.CLIENT,
            attributes=attrs,
        )
        self.upstream_ctx = set_span_in_context(self.upstream)
        self.span.set_attribute("inferplane.attempts", self.attempt)

    def upstream_headers(self) -> Mapping[str, str]:
        if not self.recording and not self.continued:
            return {}  # a trace of our own that is not sampled: nothing downstream to join
        carrier: dict[str, str] = {}
        # a caller's unsampled trace still passes on (sampled flag off)
        self.tel.propagator.inject(carrier, context=self.upstream_ctx or self.ctx)
        return carrier

    def upstream_failed(self, error_type: str, status: int | None = None) -> None:
        span, self.upstream, self.upstream_ctx = self.upstream, None, None
        if span is not None:
            if status is not None:
                span.set_attribute("http.response.status_code", status)
            _mark_error(span, error_type)
            span.end()

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
        error_type = None
        if error is not None or status >= 400:
            error_type = _STATUS_ERRORS.get(status, str(status))
            self.error_type = error_type
        attrs = self.metric_attrs
        ok = error_type is None
        if ok and ttft_s is not None:
            self.tel.ttft.record(ttft_s, attrs)
        if prompt_tokens is not None:
            self.tel.tokens.record(prompt_tokens, {**attrs, "gen_ai.token.type": "input"})
        if completion_tokens is not None:
            self.tel.tokens.record(completion_tokens, {**attrs, "gen_ai.token.type": "output"})
        if not self.recording:
            return
        usage: dict[str, Any] = {"http.response.status_code": status}
        if "gen_ai.response.model" in attrs:
            usage["gen_ai.response.model"] = attrs["gen_ai.response.model"]
        if prompt_tokens is not None:
            usage["gen_ai.usage.input_tokens"] = prompt_tokens
        if completion_tokens is not None:
            usage["gen_ai.usage.output_tokens"] = completion_tokens
        if ttft_s is not None:
            usage["inferplane.ttft_s"] = ttft_s
        if tpot_s is not None:
            usage["inferplane.tpot_s"] = tpot_s
        for span in (self.upstream, self.span):
            if span is not None:
                span.set_attributes(usage)
        upstream, self.upstream, self.upstream_ctx = self.upstream, None, None
        if upstream is not None:
            if error_type is not None:
                _mark_error(upstream, error_type, error)
            upstream.end()
        if error_type is not None and status >= 500:
            _mark_error(self.span, error_type, error)
        elif error_type is not None:
            self.span.set_attribute("error.type", error_type)

    def failed(self, status: int, error_type: str) -> None:
        self.error_type = error_type
        if not self.recording:
            return
        self.span.set_attribute("http.response.status_code", status)
        if status >= 500:
            _mark_error(self.span, error_type)
        else:
            self.span.set_attribute("error.type", error_type)

    def end(self) -> None:
        if self.ended:
            return
        self.ended = True
        if self.upstream is not None:  # never accounted (a bug, or a stop): still ends
            self.upstream_failed(self.error_type or "not_accounted")
        attrs = self.metric_attrs
        if self.error_type is not None:
            attrs = {**attrs, "error.type": self.error_type}
        self.tel.duration.record(time.perf_counter() - self.started, attrs)
        self.span.end()


def _error_type(exc: BaseException) -> str:
    code = getattr(exc, "code", None) or getattr(exc, "error_type", None)
    return code if isinstance(code, str) else type(exc).__name__


def _mark_error(span: Span, error_type: str, message: str | None = None) -> None:
    span.set_attribute("error.type", error_type)
    span.set_status(Status(StatusCode.ERROR, message))
