"""Per-request tracing and GenAI metrics, as seen by the core and the front ends.

`Telemetry` is what a `core.Core` holds; `RequestTrace` (`telemetry.notes`, with `NOOP` and
`current_trace`, re-exported here) is one request's view of it. Both are no-ops here, and
nothing in this module imports OpenTelemetry: with ``telemetry.enabled: false``
(the default) the request path pays one context-variable read and a few empty calls.
`build_telemetry` imports `telemetry.otel` (the SDK, the OTLP exporter) only when the fleet file
turns it on.

The core finds the request's trace in a context variable that the front end sets for the
request's task (`RequestTrace.activate`); `Core.reserve` keeps it on the `Placement`, so the
accounting of a request, wherever it runs (the Envoy picker accounts in another stream's task),
reaches the same trace.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from inferplane.telemetry.notes import NOOP as NOOP
from inferplane.telemetry.notes import RequestTrace as RequestTrace
from inferplane.telemetry.notes import current_trace as current_trace

if TYPE_CHECKING:
    from inferplane.config.schema import FleetConfig
    from inferplane.fleet.model import Fleet


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
