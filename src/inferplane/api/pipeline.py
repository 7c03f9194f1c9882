"""The aiohttp gateway's adapter over the core: `Gateway` is a `core.Core` whose transport is
the pooled upstream client (`dispatch.upstream.Dispatcher`).

Everything transport-neutral (authenticate, classify, admit, place, reserve, account) is in
`inferplane.core`; this module adds only the upstream call and reading its answer.
"""

from __future__ import annotations

from collections.abc import Callable

from inferplane.admission.controller import Ticket
from inferplane.admission.state import AdmissionStore
from inferplane.config.schema import FleetConfig
from inferplane.core.plane import API_PATHS, Core, hash_key
from inferplane.core.plane import Attempt as CoreAttempt
from inferplane.dispatch.answer import parse_usage
from inferplane.dispatch.credentials import load_credentials
from inferplane.dispatch.upstream import Dispatcher, Opened
from inferplane.fleet.model import Endpoint
from inferplane.fleet.scraper import HttpMetricsSource, MetricsSource
from inferplane.ledger.record import Ledger, Receipt
from inferplane.placement.profile import RequestProfile
from inferplane.telemetry.tracing import current_trace
from inferplane.types import ApiKind

__all__ = ["API_PATHS", "Attempt", "Gateway", "hash_key", "parse_usage"]

Attempt = CoreAttempt[Opened]
"""A placed request whose upstream has answered (a stream: its first chunk is in)."""


class Gateway(Core):
    """The core driven over HTTP: the upstream is called through the shared aiohttp pool."""

    def __init__(
        self,
        config: FleetConfig,
        file: str = "<config>",
        *,
        metrics_source: MetricsSource | None = None,
        ledger: Ledger | None = None,
        admission_store: AdmissionStore | None = None,
    ) -> None:
        super().__init__(
            config,
            file,
            metrics_source=metrics_source,
            ledger=ledger,
            admission_store=admission_store,
        )
        g = config.gateway
        self.dispatcher = Dispatcher(
            connect_timeout_s=g.connect_timeout_s,
            total_timeout_s=g.upstream_timeout_s,
            credentials=load_credentials(config, file),  # ConfigError naming what is missing
            lag=self.lag,
            response_headers=g.upstream_response_headers,
            stream_idle_s=g.stream_idle_timeout_s,
            max_body_bytes=g.max_upstream_body_bytes,
        )
        # replacing the dispatcher (its holds count from 0) requires calling count_from again
        self.metrics.coalesce_holds.count_from(lambda: self.dispatcher.holds)

    def _prepare_transport(self, config: FleetConfig, file: str) -> Callable[[], None]:
        credentials = load_credentials(config, file)  # ConfigError naming what is missing
        return lambda: self.dispatcher.set_credentials(credentials)

    async def _start_transport(self) -> MetricsSource:
        session = await self.dispatcher.start()
        return HttpMetricsSource(
            session, auth=self.dispatcher.auth_headers, lag=self.lag,
            max_stretch=self.config.gateway.lag_max_stretch,
            filter_samples=self.config.gateway.scrape_filter,
        )

    async def _stop_transport(self) -> None:
        await self.dispatcher.close()

    async def open(
        self, api: ApiKind, profile: RequestProfile, body: bytes, ticket: Ticket | None = None
    ) -> Attempt:
        """Place and open the upstream, re-placing after a failure before the first byte
        (`Core.open_with`)."""
        path = API_PATHS[api]
        max_tokens = profile.max_output_tokens
        trace = current_trace()

        async def send(endpoint: Endpoint, first_byte_s: float | None) -> Opened:
            mark = self.lag.mark()
            # loop lag stretches the first-byte timeout, but only this far in wall time
            cap = (None if first_byte_s is None
                   else first_byte_s * self.config.gateway.first_byte_timeout.max_stretch)
            resp = await self.dispatcher.open(
                endpoint, path, body, max_tokens=max_tokens, first_byte_s=first_byte_s,
                first_byte_max_s=cap, cache_salt=profile.cache_salt,
                headers=trace.upstream_headers(),
            )
            first = None
            if resp.status == 200 and "text/event-stream" in resp.headers.get("Content-Type", ""):
                # a stream's status line comes before its first token: wait for that too, so a
                # hung engine is re-placed before the client has seen a byte
                # (the gateway's running time: its own loop lag is not the engine's delay)
                left = None if first_byte_s is None else first_byte_s - self.lag.ran_s(mark)
                cap_left = None if cap is None else cap - (self.lag.mark()[0] - mark[0])
                if left is not None and cap_left is not None:
                    left = max(min(left, cap_left), 0.0)
                first = await Dispatcher.first_chunk(endpoint, resp, left, self.lag, cap_left)
            return Opened(resp, first)

        return await self.open_with(profile, send, ticket, gather=True)

    async def complete(self, attempt: Attempt, started: float) -> bytes:
        """Read a non-streamed answer whole and account it (`read_answer`, then
        `account_answer`)."""
        data, ended = await self.read_answer(attempt, started)
        self.account_answer(attempt, data, started=started, ended=ended)
        return data

    async def read_answer(self, attempt: Attempt, started: float) -> tuple[bytes, float]:
        """Read a non-streamed answer whole (`Core.read_with`); return it and its E2E end."""
        endpoint, resp = attempt.endpoint, attempt.response.response
        return await self.read_with(
            attempt, started, lambda: self.dispatcher.read_all(endpoint, resp)
        )

    def account_answer(
        self, attempt: Attempt, data: bytes, *, started: float, ended: float
    ) -> Receipt:
        """Account a non-streamed answer read by `read_answer`; return its record's receipt."""
        return self.account_body(
            attempt, data, status=attempt.response.response.status, started=started,
            ended=ended
        )
