"""Per-request tracing and GenAI metrics, as seen by the core and the front ends.

`Telemetry` is what a `core.Core` holds; `RequestTrace` is one request's view of it. Both are
no-ops here, and nothing in this module imports OpenTelemetry: with ``telemetry.enabled: false``
(the default) the request path pays one context-variable read and a few empty calls.
`build_telemetry` imports `telemetry.otel` (the SDK, the OTLP exporter) only when the fleet file
turns it on.

The core finds the request's trace in a context variable that the front end sets for the
request's task (`RequestTrace.activate`); `Core.reserve` keeps it on the `Placement`, so the
accounting of a request, wherever it runs (the Envoy picker accounts in another stream's task),
reaches the same trace.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from contextvars import ContextVar, Token
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from inferplane.config.schema import FleetConfig
    from inferplane.fleet.model import Endpoint, Fleet
    from inferplane.placement.framework import Decision
    from inferplane.placement.profile import RequestProfile


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

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """A child span (``admit``, ``place``) around the block; an exception marks it."""
        yield

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


class Telemetry:
    """Tracing and metrics for a process. This base class is the disabled one."""

    enabled = False

    def request(
        self,
        api: str,
        headers: Mapping[str, str],
        *,
        server_address: str | None = None,
        server_port: int | None = None,
    ) -> RequestTrace:
        """Start a request's trace, continuing the caller's ``traceparent`` if it sent one."""
        return NOOP

    def fleet_changed(self, fleet: Fleet) -> None:
        """A reload swapped in ``fleet`` (`core.plane.Core.reload`): forget what was worked out
        per endpoint (its URL, pool or provider may have changed under the same name)."""

    def shutdown(self) -> None:
        """Flush and stop the exporters."""


DISABLED = Telemetry()


def build_telemetry(config: FleetConfig, **kwargs: Any) -> Telemetry:
    """The telemetry the fleet file asks for: `DISABLED`, or the OpenTelemetry SDK with an
    OTLP exporter (``kwargs`` go to `telemetry.otel.OtelTelemetry`: tests pass in-memory
    exporters and readers)."""
    if not config.telemetry.enabled:
        return DISABLED
    from inferplane.telemetry.otel import OtelTelemetry  # the SDK only when asked for

    return OtelTelemetry(config, **kwargs)
