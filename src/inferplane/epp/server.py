"""`inferplane epp`: the endpoint-picker role over Envoy's external processing API.

Envoy streams each HTTP request to the picker (gRPC ``envoy.service.ext_proc.v3``, grpcio's
asyncio server). The picker drives the transport-neutral core exactly as the HTTP gateway does:
authenticate → validate → classify → admit → place and reserve; it then answers with the
destination (`epp.protocol`) and lets Envoy carry the bytes. A refusal (401, 400, 404, 429, 503
no eligible endpoint, …) is an ImmediateResponse with the OpenAI error body.

Two filters talk to the picker (see `epp.envoy_config`):

* the **picker filter** (request headers, buffered request body, response headers) holds the
  request until the pick, and at the response's first byte adds the served endpoint and the
  decision id to the client's response headers;
* the **observer filter** runs in Envoy's observability mode: it streams the response headers
  and body to the picker without waiting for answers, so TTFT, ITL and usage are measured
  without holding the data path, and an event stream is checked as the gateway's relay checks
  it (`OpenAIEvents`: an engine's error event, a malformed or cut-short stream is a 502). Its
  stream names the request by the decision id header the picker set.
* Envoy's **access log** (gRPC access log service) reports the exchanges an upstream broke
  (`Picker.upstream_broke`): the observer's stream ends alike when the client left and when
  the engine cut its answer, the log's response flags tell the picker which.

One `Flight` per picked request lives between the pick and its accounting. Its reservation and
admission slot are given back when the HTTP exchange is over (the picker stream's end, or the
accounting if that comes first). It is accounted exactly once: at the observed end of the
response, when the observer's stream ends early (the client or the upstream went away), after a
grace period when no observer ever reported (the client left before the response headers, or
the report was lost: recorded 499 ``no_observer``, blaming no endpoint), or by the sweeper past
the upstream timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import grpc
import orjson
from aiohttp import web
from envoy.config.core.v3 import base_pb2
from envoy.service.accesslog.v3 import als_pb2, als_pb2_grpc
from envoy.service.ext_proc.v3 import (
    external_processor_pb2 as pb,
)
from envoy.service.ext_proc.v3 import (
    external_processor_pb2_grpc as pb_grpc,
)
from envoy.type.v3 import http_status_pb2
from google.protobuf import struct_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from multidict import CIMultiDict

from inferplane.admission.controller import Ticket
from inferplane.admission.state import AdmissionStore
from inferplane.api import metrics_listener
from inferplane.config.schema import FleetConfig
from inferplane.core.plane import API_PATHS, Core, Placement
from inferplane.core.validation import parse_json, validate
from inferplane.dispatch.answer import OpenAIEvents, StreamStats, parse_usage
from inferplane.dispatch.credentials import (
    MIN_REDACTED,
    auth_headers,
    load_credentials,
    redact_cut,
)
from inferplane.epp import protocol as P
from inferplane.epp.envoy_config import OBSERVER_CLOSE_S, buffer_bytes
from inferplane.errors import (
    ConfigError,
    GatewayError,
    InvalidRequestError,
    NoEligibleEndpointError,
    NotFoundError,
    PayloadTooLargeError,
    UpstreamError,
    UpstreamErrorEvent,
)
from inferplane.fleet.model import Endpoint, Fleet
from inferplane.fleet.scraper import HttpMetricsSource, MetricsSource
from inferplane.ledger.record import Ledger
from inferplane.lograte import LogLimiter
from inferplane.telemetry.metrics import PickerMetrics
from inferplane.telemetry.tracing import RequestTrace
from inferplane.types import ApiKind
from inferplane.upstream_headers import CLIENT_ACCOUNT_HEADERS

log = logging.getLogger("inferplane.epp")

API_BY_PATH: dict[str, ApiKind] = {path: api for api, path in API_PATHS.items()}
API_LABELS: dict[str, str] = {**API_BY_PATH, "/v1/models": "models"}
"""The ``api`` label of ``inferplane_epp_decisions_total`` by path; any other path: other."""
OVERWRITE = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
MAX_OBSERVED_BODY = 4 * 1024 * 1024  # a non-streamed answer is kept this far to read its usage
# "continue" answers, shared (grpcio serializes an answer and never changes it)
CONTINUE_REQUEST_HEADERS = pb.ProcessingResponse(request_headers=pb.HeadersResponse())
CONTINUE_REQUEST_BODY = pb.ProcessingResponse(request_body=pb.BodyResponse())
CONTINUE_RESPONSE_HEADERS = pb.ProcessingResponse(response_headers=pb.HeadersResponse())
CONTINUE_RESPONSE_BODY = pb.ProcessingResponse(response_body=pb.BodyResponse())
CONTINUE_REQUEST_TRAILERS = pb.ProcessingResponse(request_trailers=pb.TrailersResponse())
CONTINUE_RESPONSE_TRAILERS = pb.ProcessingResponse(response_trailers=pb.TrailersResponse())
ORPHAN_GRACE_S = 1.0
"""Without the observer filter: how long a pick whose picker stream ended without the response
headers waits before it is recorded (with the observer: `OBSERVER_CLOSE_S` +
`ORPHAN_MARGIN_S`). Its reservation and admission slot are released when the stream ends."""
STOP_POLL_S = 0.01
"""How often `Picker.stop_grace` looks whether the picks being decided and the flights are done."""
ORPHAN_MARGIN_S = 2.0
"""With the observer filter, what the picker waits beyond Envoy's deferred close of an observer
stream before it decides no observer will report (a busy picker reads a report late)."""
NO_OBSERVER_STATUS = 499
"""The status recorded for a pick whose response nobody observed: most often a client that left
before the response headers (an agent's cancel, a client timeout). Unknown, so like a client
gone it blames no endpoint: not in the error rate, not a passive-health failure."""


@dataclass(slots=True, eq=False)
class Flight:
    """One picked request, from the pick to its accounting."""

    placement: Placement
    ticket: Ticket
    started: float
    stats: StreamStats
    status: int | None = None
    sse: bool = False
    body: bytearray = field(default_factory=bytearray)
    observed: bool = False
    done: bool = False
    served: str | None = None
    retry_after_s: float | None = None
    ended: float | None = None  # when the picker stream ended (the HTTP exchange was over)
    events: OpenAIEvents | None = None  # the stream check of a 200 event stream, until it fails
    failure: UpstreamError | None = None  # what the stream check found (the gateway's 502)


class Picker(Core):
    """The core driven by Envoy: it picks, Envoy sends."""

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
            config, file, metrics_source=metrics_source, ledger=ledger,
            admission_store=admission_store,
        )
        self.flights: dict[str, Flight] = {}
        # without the observer filter no answer's chunks reach the picker: every request's
        # prefill ends at its predicted TTFT (`Core.reserve`)
        self.sees_chunks = config.epp.observe_responses
        self.addresses: dict[str, str | None] = {
            e.name: P.destination(e) for e in self.fleet.endpoints
        }
        # a ConfigError naming what is missing, at start-up
        self.credentials = load_credentials(config, file)
        # Envoy relays bytes: an endpoint whose dialect needs translation is not placed on
        self.unrelayable = frozenset(
            e.name for e in self.fleet.endpoints if e.dialect != "openai"
        )
        self._routes: dict[tuple[str, str, str], Any] = {}  # `route_template`
        self.picker_metrics = PickerMetrics(self.metrics.registry)
        self.metrics_runner: web.AppRunner | None = None  # `serve`'s epp.metrics_port listener
        self.unanswered_log = LogLimiter(log)  # `Exchange.closed`
        self._session: aiohttp.ClientSession | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self._tasks: list[asyncio.Task[None]] = []
        # the gRPC streams open now (their handlers' tasks; `stop_grace`)
        self.streams: dict[asyncio.Task[Any], Exchange | None] = {}
        # access log entries that came before the observer saw their head (`upstream_broke`)
        self.broken: dict[str, Any] = {}

    def _prepare_transport(self, config: FleetConfig, file: str) -> Callable[[], None]:
        """Envoy reaches a plain ``http://IP:port`` endpoint through its original-destination
        cluster, so such endpoints come and go with a reload; an endpoint that needs a cluster of
        its own in the Envoy bootstrap (a host name, TLS) cannot be added (or moved) by a reload
        of the picker alone: refused, naming it."""
        credentials = load_credentials(config, file)  # ConfigError naming what is missing
        problems = []
        for i, sub in enumerate(config.substrates):
            for j, spec in enumerate(sub.endpoints):
                old = self.fleet.by_name.get(spec.name)
                if spec.dialect != "openai" or (old is not None and old.url == spec.url):
                    continue
                if P.destination(Endpoint(spec=spec, substrate=sub, index=0)) is None:
                    problems.append((f"substrates[{i}].endpoints[{j}].url", (
                        f"endpoint {spec.name!r} is not plain http://IP:port, so Envoy needs a "
                        "cluster of its own for it: regenerate the Envoy bootstrap "
                        "(inferplane envoy-config) and restart Envoy and the picker; the reload "
                        "was refused and the running configuration is unchanged")))
        if problems:
            raise ConfigError(file, problems)
        fleet = Fleet.from_config(config)
        addresses = {e.name: P.destination(e) for e in fleet.endpoints}
        unrelayable = frozenset(e.name for e in fleet.endpoints if e.dialect != "openai")

        def apply() -> None:
            self.addresses, self.credentials = addresses, credentials
            self.unrelayable = unrelayable
            self._routes = {}

        return apply

    def route_template(self, endpoint: Endpoint, model: str, path: str) -> Any:
        """The part of a pick's answer that depends only on the endpoint, the model and the API
        path (destination, cluster, the echoed names, the base path, the Host, credentials,
        the ``envoy.lb`` metadata), built once and copied into each answer (`Exchange._route`
        adds the decision id, spillover, admission and trace headers and the body)."""
        key = (endpoint.name, model, path)
        template = self._routes.get(key)
        if template is not None:
            return template
        addr = self.addresses[endpoint.name]
        authority, _, upstream_path = endpoint.api_url(path).split("://", 1)[1].partition("/")
        upstream_path = "/" + upstream_path
        dest = addr or authority
        cluster = P.ORIGINAL_DST_CLUSTER if addr else P.endpoint_cluster(endpoint.name)
        sets = [
            _set(P.DESTINATION_KEY, dest),
            _set(P.CLUSTER_HEADER, cluster),
            # Envoy echoes these to the client's response (route response_headers_to_add), so
            # the picker need not hold the response to add them
            _set(P.ENDPOINT_HEADER, endpoint.name),
            _set(P.SUBSTRATE_HEADER, endpoint.substrate.name),
            _set(P.MODEL_HEADER, endpoint.upstream_model(model)),
            # an uncompressed answer, as `inferplane serve` asks (dispatch/upstream.py): the
            # observer reads usage out of the body, and a provider would otherwise gzip or
            # brotli it for a client whose SDK says it accepts that
            _set("accept-encoding", "identity"),
        ]
        if upstream_path != path:  # the endpoint's base path
            sets.append(_set(":path", upstream_path))
        if addr is None:  # reached by name: the Host it expects
            sets.append(_set(":authority", authority))
        creds = {k.lower(): v for k, v in
                 auth_headers(endpoint.dialect, self.credentials.get(endpoint.name)).items()}
        sets += [_set(k, v) for k, v in creds.items()]
        # the client's key never reaches an engine, nor its cookies or a provider account
        # choice (inferplane.upstream_headers); the endpoint's own key replaces them
        removes = [h for h in CLIENT_ACCOUNT_HEADERS if h not in creds]
        common = pb.CommonResponse(clear_route_cache=True)
        common.header_mutation.set_headers.extend(sets)
        common.header_mutation.remove_headers.extend(removes)
        md = struct_pb2.Struct()
        lb = md.fields[P.DESTINATION_NAMESPACE].struct_value
        lb.fields[P.DESTINATION_KEY].string_value = dest
        # for the bootstrap's answer filter (`envoy_config._answer_filter`): an upstream's 429
        # answered as the gateway's, and the endpoint's key kept out of what it relays
        answer = md.fields[P.ANSWER_NAMESPACE].struct_value
        answer.fields["retry_after_s"].number_value = endpoint.spec.limits.retry_after_s
        secret = self.credentials.get(endpoint.name)
        if secret and len(secret) >= MIN_REDACTED:
            answer.fields["key"].string_value = secret
            escaped = orjson.dumps(secret)[1:-1].decode()
            if escaped != secret:
                answer.fields["key_json"].string_value = escaped
        template = pb.ProcessingResponse(
            request_body=pb.BodyResponse(response=common), dynamic_metadata=md
        )
        if len(self._routes) > 65536:  # models named by clients that no endpoint renames
            self._routes.clear()
        self._routes[key] = template
        return template

    def background(self, work: Coroutine[Any, Any, None]) -> None:
        """Run ``work`` until the picker stops."""
        self._tasks.append(asyncio.create_task(work))

    async def _start_transport(self) -> MetricsSource:
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(sock_connect=self.config.gateway.connect_timeout_s),
            # scrapes and probes only: an engine's (or a sticky load balancer's) Set-Cookie is
            # not kept, as on the gateway's session (tests/test_upstream_cookies.py)
            cookie_jar=aiohttp.DummyCookieJar(),
        )
        self._sweeper = asyncio.create_task(self._sweep_loop())
        return HttpMetricsSource(
            self._session, lag=self.lag, max_stretch=self.config.gateway.lag_max_stretch,
            filter_samples=self.config.gateway.scrape_filter,
        )

    async def stop_grace(self, grace: float) -> float:
        """The picker stops: wait up to ``grace`` seconds while a pick is being decided (its
        request has reached the picker and is not yet answered) or a flight is still in the
        air, so an answer that ends within the grace keeps its real record; then account what
        is left (`_drain`: 499, "the picker stopped") and return the grace the gRPC server's
        stop still needs (``server.stop(...)``): none, since nothing is left to wait for. The
        other streams only wait for Envoy: its access log stream (open as long as Envoy runs)
        and observer streams whose flights are accounted. Before, a picker with a response in
        flight behind Envoy took the whole grace (1 s) to stop, however soon the response
        ended. Picks that arrive during the wait are still served."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        while (self._in_the_air() or self._deciding()) and loop.time() < deadline:
            await asyncio.sleep(STOP_POLL_S)
        await self._drain()
        return 0.0

    def _in_the_air(self) -> bool:
        """A flight whose exchange is not over, or whose observer may still report its end. A
        flight whose picker stream ended with no observer only waits for its record (a grace
        for a late report, `orphan_check`): waiting for it would not change that record."""
        return any(f.ended is None or f.observed for f in self.flights.values())

    def _deciding(self) -> bool:
        """A picker stream whose request has reached the picker and is not yet answered."""
        return any(ex is not None and not ex.observer and not ex.answered
                   and ex.flight is None and ex.headers is not None
                   for ex in self.streams.values())

    async def _drain(self) -> None:
        """The picker stops: every flight still in the air is accounted now, while the ledger
        and the admission store are open (`Core.stop` closes them next)."""
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
            self._sweeper = None
        for f in list(self.flights.values()):
            self.reap(f, "picker_stopped", status=f.status or 499, error="the picker stopped")

    async def _stop_transport(self) -> None:
        if self.metrics_runner is not None:
            await self.metrics_runner.cleanup()
            self.metrics_runner = None
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._session is not None:
            await self._session.close()

    # -- accounting -------------------------------------------------------------------------
    def finish(
        self, f: Flight, *, status: int, error: str | None = None, blame: bool = True
    ) -> None:
        """Account the flight once (`Core.account`) and settle its admission ticket; with
        ``blame`` false the outcome says nothing about the endpoint (`Core.account`)."""
        if f.done:
            return
        f.done = True
        self.flights.pop(f.placement.decision.decision_id, None)
        self.broken.pop(f.placement.decision.decision_id, None)
        if f.failure is not None:
            # the observer saw the stream fail after its 200 head (an error event, an event
            # that is not JSON, a cut): a 502 as on the gateway, whatever ended the exchange;
            # an engine's message that quotes the endpoint's key does not keep it (the record,
            # the log), as on the gateway (`Dispatcher._scrub`)
            status = 502
            error = redact_cut(f.failure.message, self.credentials.get(f.placement.endpoint_name))
            blame = not (isinstance(f.failure, UpstreamErrorEvent) and f.failure.client_fault)
            self.metrics.stream_errors.labels(f.placement.endpoint_name).inc()
        usage = None
        if (error is None and status == 200) or f.failure is not None:
            usage = parse_usage(
                f.stats.usage_line if f.sse else bytes(f.body), sse=f.sse
            )
        try:
            self.account(
                f.placement, status=status, started=f.started, stats=f.stats if f.sse else None,
                usage=usage, error=error, blame=blame,
                # unobserved: the response's end is the exchange's end, not the grace's
                ended=None if f.observed else f.ended,
            )
            if blame and (status == 429 or 500 <= status < 600):
                # what the gateway learns from a failed attempt: a 429's Retry-After ejects a
                # provider endpoint for that long, repeated failures eject one without probes
                ejected = self.passive.failed(
                    f.placement.endpoint, reason=f"http_{status}", status=status,
                    retry_after_s=f.retry_after_s,
                )
                if ejected is not None:
                    self.metrics.endpoint_ejections.labels(
                        f.placement.endpoint_name, ejected.kind or ""
                    ).inc()
                    log.warning("ejected %s: %s", f.placement.endpoint_name, ejected.reason)
        finally:
            f.placement.trace.end()
            self.admission.finish_soon(f.ticket)

    def upstream_broke(self, entry: Any) -> None:
        """Envoy's access log entry of an exchange broken on the upstream's side
        (`envoy_config.BROKEN_UPSTREAM_FLAGS`): when it broke a picked response after the
        observer saw its head (the engine died or closed its connection mid-answer, the
        route timeout cut it), the flight is accounted now as the gateway's relay records it:
        a 502 naming the endpoint, which takes the failure. Without this the observer's stream
        ended as when the client leaves (Envoy 1.40 ends it alike, measured) and it was
        recorded 499, blaming no endpoint. Entries of other exchanges are ignored."""
        decision_id = entry.request.request_headers.get(P.DECISION_HEADER)
        f = self.flights.get(decision_id) if decision_id else None
        if f is None or f.done:
            return  # not picked, or already accounted
        if not f.observed or f.status is None:
            # the log came before the observer's report of the head (a busy picker): read
            # again when the observer's stream ends (`Exchange.closed`)
            self.broken[decision_id] = entry
            return
        if f.sse and f.events is not None and (f.events.done or f.events.finished):
            # the stream's end ([DONE] or a finish reason) went by before the cut: the client
            # has its whole answer; recorded as answered, no endpoint blamed
            self.finish(f, status=f.status)
            return
        flags = entry.common_properties.response_flags
        details = entry.response.response_code_details
        name, tokens = f.placement.endpoint_name, f.stats.tokens
        so_far = f"mid-stream after {tokens} tokens" if f.sse else "before the end of its answer"
        if flags.upstream_request_timeout:
            if entry.response.response_code.value != f.status:
                return  # Envoy's own 504 before any byte: the observer records it
            limit = self.config.gateway.upstream_timeout_s
            message = (f"the stream was still running after {limit:g} s "
                       f"(gateway.upstream_timeout_s) after {tokens} tokens" if f.sse else
                       f"the answer was still running after {limit:g} s "
                       "(gateway.upstream_timeout_s)")
        elif "after_response_started" in details:
            # the engine's side (closed, reset, broke the protocol), else Envoy's own reset
            # (overflow, local_reset)
            cause = ("the engine closed it" if any(
                k in details for k in ("connection_termination", "remote_reset", "protocol_error")
            ) else "Envoy reset it")
            end = " before the end of its answer" if f.sse else ""  # `so_far` says it otherwise
            message = f"the connection broke {so_far}: {cause}{end} (Envoy: {details})"
        else:
            return
        if f.failure is None:  # an error event seen before the cut stays the stream's failure
            f.failure = UpstreamError(message, upstream=name)
        self.finish(f, status=f.status)

    def stream_ended(self, f: Flight, *, aborted: bool) -> None:
        """The picker stream of a flight not yet accounted ended: the HTTP exchange is over
        (Envoy ends the picker stream when the exchange ends, whether the response completed
        or the client left before it began). The endpoint no longer serves it and the tenant
        no longer holds its slot: both are released now. Only the record waits, a grace
        period, for an observer's report (`orphan_check`)."""
        f.ended = time.perf_counter()
        f.placement.reservation.release()
        if f.ticket.grant is not None:
            f.ticket.grant.release()
        self.admission.queue.pump()  # a slot is free: the best waiter may go
        grace = ORPHAN_GRACE_S
        if self.config.epp.observe_responses:
            # Envoy keeps an observer stream OBSERVER_CLOSE_S after the response (its
            # deferred_close_timeout) and a busy picker reads its report late
            grace = OBSERVER_CLOSE_S + ORPHAN_MARGIN_S
        asyncio.get_running_loop().call_later(grace, self.orphan_check, f, aborted)

    def orphan_check(self, f: Flight, aborted: bool = False) -> None:
        """The picker stream ended a grace period ago and no observer reported: the flight
        ends here, with the status the picker filter saw; else nobody saw a response (most
        often a client that left before the response headers): recorded
        `NO_OBSERVER_STATUS` blaming no endpoint, counted as reaped ``no_observer``."""
        if f.done or f.observed:
            return
        if f.status is not None:
            self.finish(f, status=f.status)
        else:
            self.reap(f, "no_observer", status=NO_OBSERVER_STATUS, blame=False, error=(
                "no response observed: the picker stream was reset before the response "
                "headers (the client or Envoy went away)" if aborted else
                "no response observed: the exchange ended before the response headers (the "
                "client left), or the observer's report was lost"))

    def reap(
        self, f: Flight, reason: str, *, status: int, error: str, blame: bool = True
    ) -> None:
        """End a flight nobody will report on (`finish`), counted in
        ``inferplane_epp_flights_reaped_total{reason}`` and logged: its decision record names
        ``error`` and its admission ticket is settled."""
        if f.done:
            return
        self.picker_metrics.reaped.labels(reason).inc()
        log.warning("decision %s reaped (%s): %s", f.placement.decision.decision_id, reason,
                    error)
        self.finish(f, status=status, error=error, blame=blame)

    async def _sweep_loop(self) -> None:
        """The reaper: a flight whose end was not observed within ``upstream_timeout_s +
        epp.message_timeout_s`` of its pick (Envoy's route timeout ends any answer by then) is
        accounted as a 504: its observer never reported, or its report was lost (an observer
        stream that stays open and silent, an Envoy that hangs)."""
        limit = self.config.gateway.upstream_timeout_s + self.config.epp.message_timeout_s
        while True:
            await asyncio.sleep(min(5.0, limit / 4))
            now = time.perf_counter()
            for f in list(self.flights.values()):
                if now - f.started > limit:
                    self.reap(f, "unobserved", status=504, error=(
                        f"the response's end was never observed within {limit:g} s of the "
                        "pick (gateway.upstream_timeout_s + epp.message_timeout_s)"))


def _headers(h: Any) -> CIMultiDict[str]:
    return CIMultiDict([
        (hv.key, hv.raw_value.decode("utf-8", "replace") if hv.raw_value else hv.value)
        for hv in h.headers.headers
    ])


def _set(key: str, value: str) -> Any:
    return base_pb2.HeaderValueOption(
        header=base_pb2.HeaderValue(key=key, raw_value=value.encode()), append_action=OVERWRITE
    )


def _metadata(req: Any, namespace: str, key: str) -> Any:
    """A value of the request's filter metadata, as Python (None when absent)."""
    md = req.metadata_context.filter_metadata
    if namespace not in md:
        return None
    fields = md[namespace].fields
    if key not in fields:
        return None
    v = fields[key]
    kind = v.WhichOneof("kind")
    if kind == "string_value":
        return v.string_value
    if kind == "list_value":
        values = v.list_value.values
        return [x.string_value for x in values if x.WhichOneof("kind") == "string_value"]
    return None


def _seconds(value: str | None) -> float | None:
    """A ``Retry-After`` in seconds (the HTTP-date form is not used by engines or providers)."""
    try:
        return max(0.0, float(value)) if value else None
    except ValueError:
        return None


def _served(req: Any) -> str | None:
    """The endpoint that served the response: the data plane's ``envoy.lb`` /
    ``x-gateway-destination-endpoint-served`` metadata (the protocol's way), else the
    ``upstream.address`` attribute Envoy sends when asked (the bootstrap asks)."""
    served = _metadata(req, P.DESTINATION_NAMESPACE, P.SERVED_KEY)
    if isinstance(served, str) and served:
        return served
    attrs = req.attributes
    for ns in attrs:
        fields = attrs[ns].fields
        if "upstream.address" in fields:
            value: str = fields["upstream.address"].string_value
            return value or None
    return None


def immediate(exc: GatewayError) -> Any:
    """An ImmediateResponse with the error's status and OpenAI body."""
    headers = [_set("content-type", "application/json")]
    headers += [_set(k.lower(), v) for k, v in exc.answer_headers().items()]
    return _answer(exc.status, headers, orjson.dumps(exc.to_body()), exc.code or exc.error_type)


def _answer(status: int, headers: list[Any], body: bytes, details: str) -> Any:
    return pb.ProcessingResponse(
        immediate_response=pb.ImmediateResponse(
            status=http_status_pb2.HttpStatus(code=status),
            headers=pb.HeaderMutation(set_headers=headers),
            body=body,
            details=details,
        ),
    )


class Exchange:
    """One ext_proc stream: the picker filter's or the observer's view of one HTTP request."""

    __slots__ = (
        "aborted", "answered", "body", "flight", "headers", "observer", "picker", "started",
        "subset",
    )

    def __init__(self, picker: Picker) -> None:
        self.picker = picker
        self.headers: CIMultiDict[str] | None = None
        self.body = bytearray()
        self.flight: Flight | None = None
        self.started = 0.0
        self.subset: list[str] | None = None
        self.observer = False
        self.aborted = False  # the stream was reset or cancelled rather than ended
        self.answered = False  # the picker filter's request was answered (`decided`)

    async def handle(self, req: Any) -> Any:
        kind = req.WhichOneof("request")
        if req.observability_mode:
            self.observer = True
            self.observe(kind, req)
            return None
        if kind == "request_headers":
            return self.request_headers(req)
        if kind == "request_body":
            return await self.request_body(req)
        if kind == "response_headers":
            return self.response_headers(req)
        if kind == "response_body":
            return CONTINUE_RESPONSE_BODY
        if kind == "request_trailers":
            return CONTINUE_REQUEST_TRAILERS
        if kind == "response_trailers":
            return CONTINUE_RESPONSE_TRAILERS
        return None

    # -- the picker filter ------------------------------------------------------------------
    def decided(self, answer: Any) -> Any:
        """Count the picker filter's answer to a request (`PickerMetrics.decided`): routed, or
        the status of an immediate answer. Returns it."""
        self.answered = True
        result = ("routed" if answer.WhichOneof("response") != "immediate_response"
                  else str(answer.immediate_response.status.code))
        path = "" if self.headers is None else self.headers.get(":path", "").split("?", 1)[0]
        self.picker.picker_metrics.decided(API_LABELS.get(path, "other"), result)
        return answer

    def request_headers(self, req: Any) -> Any:
        if self.headers is not None:  # a second request on one stream: a broken data plane
            return self.decided(
                immediate(InvalidRequestError("ext_proc: request headers sent twice")))
        self.started = time.perf_counter()
        self.headers = _headers(req.request_headers)
        hint = _metadata(req, P.SUBSET_NAMESPACE, P.SUBSET_KEY)
        if hint is not None:
            entries = hint.split(",") if isinstance(hint, str) else hint
            self.subset = [e.strip() for x in entries for e in x.split(",") if e.strip()]
        if req.request_headers.end_of_stream:  # no body: not an inference request
            return self.decided(self._bodiless())
        return CONTINUE_REQUEST_HEADERS

    def _bodiless(self) -> Any:
        assert self.headers is not None
        path = self.headers.get(":path", "").split("?", 1)[0]
        method = self.headers.get(":method", "")
        try:
            if path == "/v1/models" and method == "GET":
                return self._models()
            if path in API_BY_PATH:
                raise InvalidRequestError("request body is empty; expected a JSON object")
            raise NotFoundError(f"no route {method} {path}")
        except GatewayError as exc:
            return immediate(exc)

    def _models(self) -> Any:
        assert self.headers is not None
        p = self.picker
        p.authenticate(self.headers.get("authorization"))
        data = [
            {"id": name, "object": "model", "created": 0, "owned_by": "inferplane"}
            for name in sorted(p.fleet.models)
        ]
        headers = [_set("content-type", "application/json")]
        return _answer(200, headers, orjson.dumps({"object": "list", "data": data}), "models")

    async def request_body(self, req: Any) -> Any:
        self.body += req.request_body.body
        limit = self.picker.config.gateway.max_body_bytes
        if len(self.body) > limit:
            too_large = PayloadTooLargeError(f"request body exceeds the limit of {limit} bytes")
            return self.decided(immediate(too_large))
        if not req.request_body.end_of_stream:
            return CONTINUE_REQUEST_BODY
        body_done = time.perf_counter()
        try:
            answer = await self.pick()
        except GatewayError as exc:
            await self.picker.error_committed(exc)
            answer = immediate(exc)
        except Exception:
            # a bug: `ExternalProcessor.Process` counts it as a 500; its time is observed too
            # (a stream cancelled while it waited in admission is neither: nothing answered)
            self.picker.picker_metrics.pick_seconds.observe(time.perf_counter() - body_done)
            raise
        self.picker.picker_metrics.pick_seconds.observe(time.perf_counter() - body_done)
        return self.decided(answer)

    async def pick(self) -> Any:
        p, headers = self.picker, self.headers
        if headers is None or self.flight is not None:
            raise InvalidRequestError("ext_proc: a request body without its headers")
        path = headers.get(":path", "").split("?", 1)[0]
        method = headers.get(":method", "")
        api = API_BY_PATH.get(path)
        if api is None:
            raise NotFoundError(f"no route {method} {path}")
        if method != "POST":
            bad = InvalidRequestError(f"method {method} not allowed on {path}")
            bad.status = 405
            raise bad
        # the request's trace (continuing a traceparent); it ends when the flight is accounted
        trace = p.telemetry.request(api, headers)
        token = trace.activate()
        try:
            return await self._pick(api, path, headers, trace)
        except GatewayError as exc:
            trace.failed(exc.status, exc.code or exc.error_type)
            trace.end()
            raise
        except BaseException:
            trace.end()
            raise
        finally:
            trace.deactivate(token)

    async def _pick(
        self, api: ApiKind, path: str, headers: CIMultiDict[str], trace: RequestTrace
    ) -> Any:
        p = self.picker
        tenant, key_hash = p.authenticate_key(headers.get("authorization"))
        raw = bytes(self.body)
        body = parse_json(raw)
        changed = False
        rewrite = headers.get(P.MODEL_REWRITE_HEADER)
        if rewrite:
            body["model"], changed = rewrite, True
        validate(api, body)
        cls_headers = self._class_headers(headers)
        profile = p.classify(api, body, cls_headers, tenant)
        max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
        trace.classified(profile, max_tokens if isinstance(max_tokens, int) else None)
        if p.unrelayable:
            profile = profile.with_(excluded=profile.excluded | p.unrelayable)
        if self.subset is not None:
            allowed = {
                name for name, addr in p.addresses.items()
                if addr is not None and any(P.matches(h, addr) for h in self.subset)
            }
            if not allowed:
                raise NoEligibleEndpointError(0, {"subset_hint": len(p.addresses)})
            profile = profile.with_(excluded=profile.excluded | (set(p.addresses) - allowed))
        if p.config.epp.request_usage and body.get("stream") is True:
            opts = body.get("stream_options")
            if not (isinstance(opts, dict) and opts.get("include_usage")):
                body["stream_options"] = {**(opts if isinstance(opts, dict) else {}),
                                          "include_usage": True}
                changed = True
        with trace.stage("admit"):
            ticket = await p.admission.admit(
                api, body, raw, cls_headers, tenant, key_hash, profile
            )
        try:
            await p.recall_session(ticket.profile)
            placement = p.reserve(ticket.profile, ticket)
            # the upstream call is Envoy's: its span runs from the pick to the observed end
            trace.upstream_started(placement.endpoint, ticket.profile.model)
        except BaseException:
            p.admission.finish_soon(ticket)
            raise
        fwd = ticket.body if ticket.body is not None else (orjson.dumps(body) if changed else None)
        endpoint = placement.endpoint
        if endpoint.renames_models:
            upstream = endpoint.upstream_model(body["model"])
            if upstream != body["model"]:
                obj = orjson.loads(fwd if fwd is not None else raw)
                obj["model"] = upstream
                fwd = orjson.dumps(obj)
        decision_id = placement.decision.decision_id
        f = Flight(placement, ticket, self.started, StreamStats(self.started))
        p.flights[decision_id] = f
        self.flight = f
        return self._route(f, fwd, path)

    def _class_headers(self, headers: CIMultiDict[str]) -> Mapping[str, str]:
        """The protocol's objective and fairness id in inferplane's terms: an objective that
        names a workload class selects it (an unknown one is ignored, as the extension ignores
        an objective it has no object for); the fairness id, when the client sent no
        ``x-inferplane-workflow``, becomes the workflow (usage, budgets and the ledger)."""
        objective = headers.get(P.OBJECTIVE_HEADER)
        fairness = headers.get(P.FAIRNESS_HEADER)
        if not objective and not fairness:
            return headers
        out = headers.copy()
        if (objective and "x-inferplane-class" not in out
                and objective in self.picker.classifier.classes):
            out["x-inferplane-class"] = objective
        if fairness and "x-inferplane-workflow" not in out:
            out["x-inferplane-workflow"] = fairness
        return out

    def _route(self, f: Flight, fwd: bytes | None, path: str) -> Any:
        p = self.picker
        d = f.placement.decision
        resp = pb.ProcessingResponse()
        resp.CopyFrom(p.route_template(f.placement.endpoint, d.profile.model, path))
        common = resp.request_body.response
        add = common.header_mutation.set_headers.add
        add(header=base_pb2.HeaderValue(key=P.DECISION_HEADER, raw_value=d.decision_id.encode()),
            append_action=OVERWRITE)
        if d.spillover is not None:  # never silent, as on the gateway: the client is told
            add(header=base_pb2.HeaderValue(
                key=P.SPILLOVER_HEADER, raw_value=d.spillover.header_value().encode()),
                append_action=OVERWRITE)
        # admission's headers, and the trace context (Envoy forwards the picker's traceparent)
        for k, v in (*f.ticket.headers.items(), *f.placement.trace.upstream_headers().items()):
            add(header=base_pb2.HeaderValue(key=k.lower(), raw_value=v.encode()),
                append_action=OVERWRITE)
        if fwd is not None:
            add(header=base_pb2.HeaderValue(key="content-length", raw_value=str(len(fwd)).encode()),
                append_action=OVERWRITE)
            common.body_mutation.body = fwd
        waits = p.rate_limited(d.profile.model)
        if waits:  # an upstream 429 says Retry-After until the first of these is back
            answer = resp.dynamic_metadata.fields[P.ANSWER_NAMESPACE].struct_value
            answer.fields["others_back_at"].number_value = time.time() + min(waits.values())
        return resp

    def response_headers(self, req: Any) -> Any:
        """Only without the observer filter: the status is all the picker learns of the
        answer, and the flight is accounted here."""
        f = self.flight
        if f is not None and not f.done:
            h = _headers(req.response_headers)
            with contextlib.suppress(ValueError):
                f.status = int(h.get(":status", "0")) or None
            f.served = _served(req) or f.served
            f.retry_after_s = _seconds(h.get("retry-after"))
            self.picker.finish(f, status=f.status or 502)
        return CONTINUE_RESPONSE_HEADERS

    # -- the observer filter ----------------------------------------------------------------
    def observe(self, kind: str | None, req: Any) -> None:
        now = time.perf_counter()
        if kind == "request_headers":
            decision_id = _headers(req.request_headers).get(P.DECISION_HEADER)
            f = self.picker.flights.get(decision_id) if decision_id else None
            if f is not None:
                f.observed = True
                self.flight = f
            return
        h = _headers(req.response_headers) if kind == "response_headers" else None
        if h is not None and self.flight is None:
            # the bootstrap's observer skips the request headers: Envoy copies the decision id
            # onto the response (route response_headers_to_add) before the observer sees it
            decision_id = h.get(P.DECISION_HEADER)
            self.flight = self.picker.flights.get(decision_id) if decision_id else None
            if self.flight is not None:
                self.flight.observed = True
        f = self.flight
        if f is None or f.done:
            return
        if h is not None:
            with contextlib.suppress(ValueError):
                f.status = int(h.get(":status", "0")) or None
            f.sse = "text/event-stream" in h.get("content-type", "")
            if f.sse and f.status == 200:  # checked as the gateway's relay checks it
                coding = h.get("content-encoding", "identity").strip().lower()
                if coding in ("", "identity"):
                    f.events = OpenAIEvents()
                else:  # compressed although asked not to: the observer sees gzip, not events
                    name = f.placement.endpoint_name
                    self.picker.failure_log.warn(
                        f"unchecked:{name}", "endpoint %s answered an event stream with "
                        "content-encoding %s although asked for identity: the stream is not "
                        "checked for mid-stream errors (nor its usage read)", name, coding)
            f.retry_after_s = _seconds(h.get("retry-after"))
            f.served = _served(req)
            picked = self.picker.addresses.get(f.placement.endpoint_name)
            if f.served and picked and f.served != picked:
                log.warning("decision %s: picked %s (%s), served by %s",
                            f.placement.decision.decision_id, f.placement.endpoint_name,
                            picked, f.served)
            if req.response_headers.end_of_stream:
                self.picker.finish(f, status=f.status or 502)
        elif kind == "response_body":
            chunk = req.response_body.body
            if chunk:
                if not f.placement.reservation.prefilled:
                    f.placement.reservation.first_token()
                if f.sse:
                    f.stats.observe(chunk, now)
                    if f.events is not None and (problem := f.events.feed(chunk)) is not None:
                        f.failure = f.events.failure(
                            problem, f.placement.endpoint_name, f.stats.tokens)
                        f.events = None  # the first problem is the stream's
                elif len(f.body) < MAX_OBSERVED_BODY:
                    f.body += chunk
            if req.response_body.end_of_stream:
                self._ended(f)
        elif kind == "response_trailers":
            self._ended(f)

    def _ended(self, f: Flight) -> None:
        """The response's end was observed: an event stream that ended without its end (no
        ``[DONE]``, no finish reason) failed, as on the gateway (`OpenAIEvents.close`)."""
        if f.events is not None and (problem := f.events.close()) is not None:
            f.failure = UpstreamError(f"{problem} after {f.stats.tokens} tokens",
                                      upstream=f.placement.endpoint_name)
        self.picker.finish(f, status=f.status or 502)

    def closed(self) -> None:
        """The stream ended (normally, or Envoy, the client or the upstream went away).

        Envoy (1.40) ends the picker stream alike when the response completed and when the
        client left before the response headers (measured: no reset reaches the picker), so
        a picker stream's end alone never blames the endpoint (`Picker.stream_ended`)."""
        f = self.flight
        if (f is None and self.headers is not None and not self.answered and not self.observer
                and not self.aborted):
            # gRPC refuses a message over the receive limit by ending the request stream
            # (the sender sees RESOURCE_EXHAUSTED; the servicer sees only the end)
            self.picker.unanswered_log.warn(
                "body", "an ext_proc stream ended after the request headers and before the "
                "picker answered (%d body bytes received): the client left, or a body message "
                "over the picker's gRPC receive limit (%d bytes) was refused",
                len(self.body), buffer_bytes(self.picker.config.gateway.max_body_bytes))
        if f is None or f.done:
            return
        if self.observer:
            entry = self.picker.broken.pop(f.placement.decision.decision_id, None)
            if entry is not None and f.status is not None:
                self.picker.upstream_broke(entry)  # the log came first: the upstream broke it
            self.picker.finish(f, status=499 if f.status in (None, 200) else f.status,
                               error="the response ended before its end was observed")
        else:
            # Envoy ends the picker's stream when the HTTP exchange ends; the observer's report
            # of that response may still be on its way (queued behind other streams when the
            # picker is busy): capacity is released now, the record waits for it
            self.picker.stream_ended(f, aborted=self.aborted)


class ExternalProcessor(pb_grpc.ExternalProcessorServicer):  # type: ignore[misc]
    """The gRPC service: one `Exchange` per stream."""

    def __init__(self, picker: Picker) -> None:
        self.picker = picker

    async def Process(
        self, requests: AsyncIterator[Any], context: Any
    ) -> AsyncIterator[Any]:
        ex = Exchange(self.picker)
        task = asyncio.current_task()
        if task is not None:
            self.picker.streams[task] = ex
        try:
            async for req in requests:
                try:
                    resp = await ex.handle(req)
                except Exception:  # a bug answers in the OpenAI shape, never a broken stream
                    log.exception("ext_proc message failed")
                    if req.WhichOneof("request") in (
                        "request_headers", "request_body"
                    ) and not req.observability_mode:
                        failed = ex.decided(
                            immediate(GatewayError("internal error; see the picker log")))
                        # counted as a 500 either way; with a flight already reserved (the bug
                        # came after the pick) nothing is answered, as before: Envoy's
                        # message_timeout_s and fail_open decide what the client gets
                        resp = failed if ex.flight is None else None
                    else:
                        resp = None
                if resp is not None:
                    yield resp
                elif ex.observer and ex.flight is not None and ex.flight.done:
                    # the response's end is accounted: end the observer's stream now rather
                    # than leave it open until Envoy's deferred close
                    return
        except BaseException:
            # cancelled (CancelledError) or broken while the picker awaited something: not a
            # normal end. Best effort only: grpcio most often ends the request iterator on a
            # client's cancel as on a half-close, and Envoy half-closes the picker stream when
            # its client leaves, so nothing else depends on telling them apart
            ex.aborted = True
            raise
        finally:
            if task is not None:
                self.picker.streams.pop(task, None)
            ex.closed()


class AccessLogs(als_pb2_grpc.AccessLogServiceServicer):  # type: ignore[misc]
    """Envoy's gRPC access log service: the bootstrap sends only the exchanges an upstream
    broke (`envoy_config.BROKEN_UPSTREAM_FLAGS`), on one stream per Envoy worker that stays
    open while Envoy runs (`Picker.upstream_broke`)."""

    def __init__(self, picker: Picker) -> None:
        self.picker = picker

    async def StreamAccessLogs(self, requests: AsyncIterator[Any], context: Any) -> Any:
        task = asyncio.current_task()
        if task is not None:
            self.picker.streams[task] = None
        try:
            async for message in requests:
                for entry in message.http_logs.log_entry:
                    try:
                        self.picker.upstream_broke(entry)
                    except Exception:
                        log.exception("access log entry failed")
        finally:
            if task is not None:
                self.picker.streams.pop(task, None)
        return als_pb2.StreamAccessLogsResponse()


EXT_PROC_SERVICE = "envoy.service.ext_proc.v3.ExternalProcessor"
READY_SERVICES = ("readiness", EXT_PROC_SERVICE)


async def _report_health(picker: Picker, servicer: Any) -> None:
    """The gRPC health services the endpoint-picker protocol asks for: ``liveness`` serves
    while the process answers; ``readiness`` and the ext_proc service serve while at least one
    endpoint is usable (as the gateway's ``/ready``)."""
    serving, not_serving = (health_pb2.HealthCheckResponse.SERVING,
                            health_pb2.HealthCheckResponse.NOT_SERVING)
    await servicer.set("", serving)
    await servicer.set("liveness", serving)
    while True:
        ready = any(v.state.usable for v in picker.live.snapshot().endpoints)
        for name in READY_SERVICES:
            await servicer.set(name, serving if ready else not_serving)
        await asyncio.sleep(picker.config.gateway.health_interval_s)


async def serve_metrics(picker: Picker, host: str, port: int) -> None:
    """Serve the picker's ``/metrics`` on host:port (the ``epp.metrics_port`` listener; the
    picker stops it when it stops). An OSError when it cannot bind."""
    async def page() -> bytes:
        return picker.metrics_page()

    picker.metrics_runner = await metrics_listener.start(page, host, port, picker.config.gateway)


async def serve(picker: Picker, host: str, port: int,
                metrics_port: int | None = None) -> tuple[Any, int]:
    """Start the picker and its gRPC server (ext_proc and the gRPC health service) on
    host:port, and its ``/metrics`` listener on ``epp.metrics_host``:``metrics_port`` (default
    ``epp.metrics_port``; none when both are unset); returns the server and the bound port
    (call ``await server.stop(await picker.stop_grace(grace))`` and ``await picker.stop()``
    to stop)."""
    await picker.start()
    if metrics_port is None:
        metrics_port = picker.config.epp.metrics_port
    if metrics_port is not None:
        mhost = picker.config.epp.metrics_host
        try:
            await serve_metrics(picker, mhost, metrics_port)
        except OSError as exc:
            await picker.stop()
            raise OSError(f"cannot listen on {mhost}:{metrics_port} (epp.metrics_port): "
                          f"{exc.strerror or exc}") from exc
    # gRPC's default 4 MiB receive limit would refuse a buffered body near or over it
    # (RESOURCE_EXHAUSTED, which Envoy answers as picker_unavailable) whatever max_body_bytes says
    limit = buffer_bytes(picker.config.gateway.max_body_bytes)
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0),
                                      ("grpc.max_receive_message_length", limit)])
    pb_grpc.add_ExternalProcessorServicer_to_server(ExternalProcessor(picker), server)
    als_pb2_grpc.add_AccessLogServiceServicer_to_server(AccessLogs(picker), server)
    servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    picker.background(_report_health(picker, servicer))
    try:
        bound = server.add_insecure_port(f"{host}:{port}")
    except RuntimeError as exc:
        await picker.stop()
        raise OSError(f"cannot listen on {host}:{port}: {exc}") from exc
    if bound == 0:
        await picker.stop()
        raise OSError(f"cannot listen on {host}:{port}")
    await server.start()
    return server, bound
