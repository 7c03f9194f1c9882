"""The HTTP surface: OpenAI routes, operational routes, and the one error handler.

Every error leaves through `error_middleware` in OpenAI's shape; nothing else renders errors and
no stack trace reaches a client.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from ipaddress import ip_network

import orjson
from aiohttp import hdrs, web
from prometheus_client import CONTENT_TYPE_LATEST

from inferplane.admission.controller import Ticket
from inferplane.api import console, metrics_listener
from inferplane.api.openapi import build_spec
from inferplane.api.pipeline import Attempt, Gateway, parse_usage
from inferplane.api.server import (
    ConnectionLimits,
    GatewayRunner,
    error_body,
    request_started,
)
from inferplane.batch import routes as batch_routes
from inferplane.core.plane import hash_key
from inferplane.core.process import worker_set
from inferplane.core.validation import parse_json, validate
from inferplane.dispatch import anthropic
from inferplane.dispatch.answer import StreamStats
from inferplane.dispatch.upstream import SSEUsageFilter
from inferplane.errors import (
    DECISION_HEADER,
    RECEIPT_HEADER,
    AuthenticationError,
    GatewayError,
    InvalidRequestError,
    NotFoundError,
    PayloadTooLargeError,
    PermissionDeniedError,
    UnsupportedMediaTypeError,
    UpstreamError,
    UpstreamErrorEvent,
    quoted,
)
from inferplane.fleet.health import endpoint_summary
from inferplane.httpio import read_body
from inferplane.ledger.query import BadQuery, parse_query
from inferplane.telemetry import gather
from inferplane.telemetry.tracing import RequestTrace
from inferplane.types import ApiKind, JSONObject

log = logging.getLogger("inferplane.api")

GATEWAY_KEY: web.AppKey[Gateway] = web.AppKey("gateway", Gateway)
SSE_DONE = b"data: [DONE]\n\n"
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def error_response(exc: GatewayError) -> web.Response:
    body = exc.to_body()
    try:
        data = orjson.dumps(body)
    except TypeError:  # a message quoting undecodable bytes (surrogates): escape them
        err = {k: _printable(v) for k, v in body["error"].items()}
        data = orjson.dumps({"error": err})
    resp = web.Response(
        body=data, status=exc.status, content_type="application/json",
        headers=exc.answer_headers(),  # the record's id and receipt, when it has one
    )
    return resp


def _printable(v: str | None) -> str | None:
    return None if v is None else v.encode("utf-8", "backslashreplace").decode("utf-8")


def check_headers(headers: Mapping[str, str]) -> None:
    """Every header value must be UTF-8 (aiohttp hands undecodable bytes on as surrogates, which
    nothing downstream can encode). The value is never quoted: it may be a key."""
    for name, value in headers.items():
        if not value.isascii():
            try:
                value.encode()
            except UnicodeEncodeError:
                raise InvalidRequestError(
                    f"header {name} is not valid UTF-8", param=name.lower(),
                    code="invalid_header",
                ) from None


RESPONSE_APIS: dict[str, str] = {
    "/v1/chat/completions": "chat",
    "/v1/completions": "completions",
    "/v1/embeddings": "embeddings",
    "/v1/models": "models",
    "/v1/usage": "usage",
    "/v1/fleet/health": "admin",
}
"""The ``api`` label of ``inferplane_responses_total`` by exact path (`response_api`)."""
RESPONSE_API_PREFIXES = (("/v1/files", "files"), ("/v1/batches", "batches"),
                         ("/v1/decisions", "decisions"), (console.PREFIX, "admin"))
UNCOUNTED_PATHS = frozenset({"/metrics", "/health", "/ready"})
"""Scrapes and probes: not answers to clients (a /ready 503 is a verdict, not a failure)."""


def response_api(path: str) -> str | None:
    """The ``api`` label of ``path``'s answers; None for those not counted."""
    api = RESPONSE_APIS.get(path)
    if api is not None:
        return api
    if path in UNCOUNTED_PATHS:
        return None
    for prefix, name in RESPONSE_API_PREFIXES:
        if path == prefix or path.startswith(prefix + "/"):
            return name
    return "other"


@web.middleware
async def responses_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Count every answer of the API listener once in ``inferplane_responses_total``: outside
    `error_middleware`, so errors count as rendered; what escapes it is a client gone (499)
    or an HTTP exception aiohttp answers itself (its status)."""
    status = 499
    try:
        resp = await handler(request)
        status = getattr(resp, "counted_status", None) or resp.status
        return resp
    except web.HTTPException as exc:
        status = exc.status
        raise
    finally:
        api = response_api(request.path)
        if api is not None:
            request.app[GATEWAY_KEY].metrics.responded(api, status)


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """The one translation point from exceptions to OpenAI-shaped error responses."""
    try:
        request_started(request)
        check_headers(request.headers)
        return await handler(request)
    except GatewayError as exc:
        return error_response(exc)
    except web.HTTPRequestEntityTooLarge:
        limit = request.app[GATEWAY_KEY].config.gateway.max_body_bytes
        return error_response(
            PayloadTooLargeError(f"request body exceeds the limit of {limit} bytes")
        )
    except web.HTTPNotFound:
        return error_response(NotFoundError(f"no route {request.method} {request.path}"))
    except web.HTTPMethodNotAllowed:
        bad = InvalidRequestError(f"method {request.method} not allowed on {request.path}")
        bad.status = 405
        return error_response(bad)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        e = GatewayError(exc.reason or "HTTP error")
        e.status = exc.status
        return error_response(e)
    except (asyncio.CancelledError, ConnectionError):
        raise  # the client went away: aiohttp closes quietly
    except Exception:
        log.exception("internal error on %s %s", request.method, request.path)
        return error_response(GatewayError("internal error; see the gateway log"))


def check_json_body(request: web.Request) -> None:
    """An API route's body is JSON: a ``Content-Type`` that names another media type
    (``text/plain``, a form, ``application/octet-stream``) is refused with a 415, as vLLM's
    server refuses it (with a 400); ``application/json`` and ``application/*+json`` pass, and a
    request with no ``Content-Type`` is read as JSON."""
    given = request.headers.get("Content-Type", "")
    media = given.split(";", 1)[0].strip().lower()
    if not media or media == "application/json" or (
        media.startswith("application/") and media.endswith("+json")
    ):
        return
    raise UnsupportedMediaTypeError(
        f"Content-Type {quoted(media)} is not JSON: send the body as application/json"
    )


def _decision_headers(attempt: Attempt) -> dict[str, str]:
    d = attempt.decision
    assert d.picked is not None
    headers = {
        "x-inferplane-endpoint": d.picked.name,
        "x-inferplane-substrate": d.picked.endpoint.substrate.name,
        DECISION_HEADER: d.decision_id,
        # the model that answers, by the upstream's own name (a provider's model id)
        "x-inferplane-model": d.picked.endpoint.upstream_model(d.profile.model),
    }
    if d.spillover is not None:  # never silent: the client is told it left its preferred set
        headers["x-inferplane-spillover"] = d.spillover.header_value()
    return headers


async def _read_body(request: web.Request, limit: int, timeout_s: float) -> bytes:
    if request.content_length is not None and request.content_length > limit:
        raise PayloadTooLargeError(
            f"request body of {request.content_length} bytes exceeds the limit of {limit} bytes"
        )
    return await read_body(request, timeout_s)


def make_api_handler(api: ApiKind) -> Handler:
    async def handler(request: web.Request) -> web.StreamResponse:
        gw = request.app[GATEWAY_KEY]
        trace = gw.telemetry.request(api, request.headers)  # continues a traceparent
        token = trace.activate()
        try:
            return await handle(request, gw, trace)
        except GatewayError as exc:
            trace.failed(exc.status, exc.code or exc.error_type)
            await gw.error_committed(exc)
            raise
        finally:
            trace.end()
            trace.deactivate(token)

    async def handle(
        request: web.Request, gw: Gateway, trace: RequestTrace
    ) -> web.StreamResponse:
        started = time.perf_counter()
        tenant, key_hash = gw.authenticate_key(request.headers.get("Authorization"))
        check_json_body(request)
        g = gw.config.gateway
        raw = await _read_body(request, g.max_body_bytes, g.body_timeout_s)
        body = parse_json(raw)
        validate(api, body)
        profile = gw.classify(api, body, request.headers, tenant)
        if profile.model_alias is not None:  # a tier was chosen: forward its model's name
            raw = orjson.dumps(body)
        trace.classified(profile, _max_tokens(body))
        with trace.stage("admit"):
            try:
                ticket = await gw.admission.admit(
                    api, body, raw, request.headers, tenant, key_hash, profile
                )
            except asyncio.CancelledError:  # the client left while the request was queued
                gw.record_unplaced(profile, status=499,
                                   error="client disconnected while queued for admission")
                raise
        fwd, strip_usage = ticket.body or raw, False
        if body.get("stream") is True and not (body.get("stream_options") or {}).get(
            "include_usage"
        ):
            # Ask the engine for usage so the request is accounted and billed; the client did
            # not ask for it, so its usage chunk is removed from the relayed stream.
            body["stream_options"] = {**(body.get("stream_options") or {}), "include_usage": True}
            fwd, strip_usage = orjson.dumps(body), True
        try:
            return await forward(request, gw, api, ticket, fwd, started, strip_usage)
        finally:
            gw.admission.finish_soon(ticket)

    return handler


def _max_tokens(body: JSONObject) -> int | None:
    """The request's own output limit (``gen_ai.request.max_tokens``), if it set one."""
    for key in ("max_completion_tokens", "max_tokens"):
        v = body.get(key)
        if isinstance(v, int) and not isinstance(v, bool):
            return v
    return None


class Answer(web.Response):
    """A relayed answer: ``counted_status``, where set, is what ``inferplane_responses_total``
    counts it as (`responses_middleware`) instead of its head's status: 499 for a client gone
    before it was written."""

    counted_status: int | None = None


class HeadWithFirstChunk(web.StreamResponse):
    """A relayed stream whose head leaves with its first body write, in one send, as aiohttp's
    `web.Response` sends its head with its body (`StreamResponse` sends the head alone from
    `prepare`). The gateway has the engine's first chunk in hand before it prepares the
    response, so the client gets the head and the first token in one packet: one wake-up of
    the client, not two, and no chance for the woken client to take the gateway's CPU between
    them on a loaded host. `forward` writes at once after `prepare`: `Dispatcher.relay` yields
    the first chunk without reading again, and an empty write sends the head alone where that
    chunk leaves nothing to relay (a partial event, a comment); after `prepare` no exception
    reaches the error handler, which could not answer in its place. On an aiohttp without the
    attribute (before 3.12) the head is sent from `prepare`, as before
    (tests/test_stream_head.py)."""

    _send_headers_immediately = False
    counted_status: int | None = None
    """What ``inferplane_responses_total`` counts the stream as where not its head's 200: the
    status of the error event it ended with (`Answer`)."""


async def forward(
    request: web.Request,
    gw: Gateway,
    api: ApiKind,
    ticket: Ticket,
    raw: bytes,
    started: float,
    strip_usage: bool = False,
) -> web.StreamResponse:
    """Place, dispatch and relay one admitted request; `account` runs on every path."""
    attempt = await gw.open(api, ticket.profile, raw, ticket)
    resp = attempt.response.response
    # the upstream's headers that a client may see (`inferplane.upstream_headers`), then the
    # gateway's own over them
    headers = gw.dispatcher.passthrough_headers(resp)
    headers.update(_decision_headers(attempt))
    headers.update(ticket.headers)
    endpoint = attempt.decision.picked.endpoint  # type: ignore[union-attr]
    is_sse = resp.status == 200 and "text/event-stream" in resp.headers.get("Content-Type", "")
    if not is_sse:
        try:
            data, ended = await gw.read_answer(attempt, started)
        except GatewayError as exc:  # placed: the error names the pick as an answer would
            exc.headers.update(_decision_headers(attempt))
            raise
        # the record first: the answer carries its receipt and leaves once it is committed
        receipt = gw.account_answer(attempt, data, started=started, ended=ended)
        await gw.committed(receipt, attempt.ticket)
        if endpoint.dialect == "anthropic":  # a partial usage: accounted as is, relayed whole
            data = anthropic.relayed_answer(data, attempt.decision.profile.prompt_tokens)
        if receipt.hash:
            headers[RECEIPT_HEADER] = receipt.hash
        answer = Answer(body=data, status=resp.status, headers=headers)
        try:
            await answer.prepare(request)
            await answer.write_eof()
        except ConnectionError:  # aiohttp notes a client that is gone
            answer.counted_status = 499
        return answer

    headers["Cache-Control"] = "no-cache"  # an event stream: never stored (the gateway's own)
    out = HeadWithFirstChunk(status=200, headers=headers)
    stats = StreamStats(started)
    status, error = 200, None
    blame = True  # whether the outcome counts toward the endpoint's health
    accounted = False
    done = b""  # the final ``data: [DONE]``, held back until the record is committed
    headed = False  # whether the head has left (see `HeadWithFirstChunk`)
    try:
        await out.prepare(request)
        try:
            reservation = attempt.reservation
            events = SSEUsageFilter() if strip_usage else None
            translated = endpoint.dialect == "anthropic"
            estimate = attempt.decision.profile.prompt_tokens
            g = gw.config.gateway
            relay = gw.dispatcher.relay(endpoint, resp, stats, attempt.response.first,
                                        coalesce_s=g.stream_coalesce_ms / 1000.0,
                                        min_streams=g.stream_coalesce_min_streams)
            async with contextlib.aclosing(relay) as chunks:
                async for chunk in chunks:
                    if chunk and not reservation.prefilled:
                        reservation.first_token()  # its prefill no longer queues ahead
                    if translated:  # a partial usage: accounted as is, relayed whole
                        chunk = anthropic.relayed_events(chunk, estimate, stats.tokens)
                    if events is not None:
                        chunk = events.feed(chunk)
                    if chunk.endswith(SSE_DONE):
                        chunk, done = chunk[: -len(SSE_DONE)], SSE_DONE
                    if chunk or not headed:
                        await out.write(chunk)  # the first one carries the head, even empty
                        headed = True
            if events is not None and (rest := events.flush()):
                await out.write(rest)
        except UpstreamError as exc:
            status, error = 502, exc.message
            gw.metrics.stream_errors.labels(endpoint.name).inc()
            payload = orjson.dumps(exc.to_body())
            await out.write(b"data: " + payload + b"\n\n")
            if isinstance(exc, UpstreamErrorEvent):  # told by the upstream: ended as it did
                done = SSE_DONE
                blame = not exc.client_fault  # the request's fault: not the endpoint's
        except ConnectionResetError:
            raise
        except Exception:
            # a fault of the gateway's own once the answer has begun: the client gets an error
            # event and a well-framed end, the record a 500 (the error handler cannot answer
            # a response already prepared)
            log.exception("relaying the stream of %s failed", endpoint.name)
            status, error = 500, "internal error; see the gateway log"
            await out.write(b"data: " + error_body(500, error, "internal_error") + b"\n\n")
        # Headers left long ago: the receipt ends the stream as an SSE comment (which SSE
        # clients ignore), after the record is committed and before [DONE].
        accounted = True
        receipt = gw.account(attempt, status=status, started=started, stats=stats,
                             usage=parse_usage(stats.usage_line, sse=True), error=error,
                             blame=blame)
        await gw.committed(receipt, attempt.ticket)
        # the receipt comment, the held-back [DONE] and the end of the body in one write
        tail = (b": " + RECEIPT_HEADER.encode() + b" " + receipt.hash.encode() + b"\n\n"
                if receipt.hash else b"")
        await out.write_eof(tail + done)
        if status != 200:  # the head said 200; the stream ended in an error event
            out.counted_status = status
    except (ConnectionResetError, asyncio.CancelledError):
        status, error = 499, "client disconnected"
        gw.metrics.client_disconnects.inc()
        raise
    finally:
        if not accounted:
            gw.account(
                attempt,
                status=status,
                started=started,
                stats=stats,
                usage=parse_usage(stats.usage_line, sse=True),
                error=error,
            )
    return out


async def models(request: web.Request) -> web.Response:
    gw = request.app[GATEWAY_KEY]
    gw.authenticate(request.headers.get("Authorization"))
    data = [
        {
            "id": name,
            "object": "model",
            "created": 0,
            "owned_by": "inferplane",
            "variants": sorted({m.variant for m in served}),
            "max_context": max(m.max_context for m in served),
        }
        for name, served in sorted(gw.fleet.models.items())
    ] + [
        {
            "id": a.name,
            "object": "model",
            "created": 0,
            "owned_by": "inferplane",
            "tiers": [t.model for t in a.tiers],  # an alias: the gateway picks the tier
        }
        for a in gw.config.model_aliases
    ]
    return web.json_response({"object": "list", "data": data}, dumps=_dumps)


async def health(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


READY_SCOPES = ("fleet", "process")


async def ready(request: web.Request) -> web.Response:
    """``GET /ready``: 503 while the gateway drains (`Core.draining`, SIGTERM with
    ``gateway.drain_delay_s``); otherwise, at ``?scope=fleet`` (the default) ready when at least
    one endpoint is usable, at ``?scope=process`` ready whatever the endpoints (a load
    balancer's readiness probe: a fleet whose engines all restart must not take every gateway
    replica out of its Service, docs/reliability.md#probes)."""
    gw = request.app[GATEWAY_KEY]
    scope = request.query.get("scope", "fleet")
    if scope not in READY_SCOPES:
        raise InvalidRequestError(f"scope must be one of {', '.join(READY_SCOPES)}",
                                  param="scope")
    snap = gw.live.snapshot()
    usable = sum(1 for v in snap.endpoints if v.state.usable)
    is_ready = not gw.draining and (usable > 0 or scope == "process")
    body = {
        "ready": is_ready,
        "draining": gw.draining,
        "usable_endpoints": usable,
        "endpoints": len(snap.endpoints),
    }
    return web.json_response(body, status=200 if is_ready else 503)


class WorkerPages:
    """Where this worker of ``serve --workers N`` stands (its index, N, the supervisor's
    directory of the workers' page sockets): its ``/metrics`` gathers every worker's page,
    waiting ``timeout_s`` for them (`gather.timeout_s`, read once at start)."""

    def __init__(self, index: int, n: int, directory: str) -> None:
        self.index, self.n, self.directory = index, n, directory
        self.timeout_s = gather.timeout_s()


WORKER_PAGES: web.AppKey[WorkerPages] = web.AppKey("worker_pages", WorkerPages)


def check_metrics_access(request: web.Request) -> None:
    """``/metrics`` is for operators: on the API listener it needs one of
    ``gateway.metrics.api_keys`` unless ``gateway.metrics.public``; the ``gateway.metrics.port``
    listener serves it with no key (`served_page`)."""
    gw = request.app[GATEWAY_KEY]
    if gw.config.gateway.metrics.public:
        return
    check_admin_key(request, "/metrics", "gateway.metrics.port (a listener for the scraper), "
                    "gateway.metrics.api_keys (admin keys) or gateway.metrics.public")


def check_admin_key(request: web.Request, what: str, remedy: str, tenants: bool = False) -> None:
    """The request carries an admin key (``gateway.metrics.api_keys``), or, with ``tenants``,
    any tenant's key: else 401 (no key; with ``tenants`` an unknown key too) or 403 (a key
    that is not an admin key; no admin keys configured: ``what`` is not served, ``remedy``
    says what would serve it)."""
    gw = request.app[GATEWAY_KEY]
    admin_keys = gw.config.gateway.metrics.api_keys
    authorization = request.headers.get("Authorization") or ""
    scheme, _, key = authorization.partition(" ")
    key = key.strip() if scheme.lower() == "bearer" else ""
    if key and hash_key(key) in admin_keys:
        return
    if tenants:
        gw.authenticate(authorization or None)  # a tenant's key passes, else the API's 401
        return
    if not admin_keys:
        raise PermissionDeniedError(f"{what} is not served on this listener: set {remedy}")
    if not key:
        raise AuthenticationError(
            f"{what} needs an admin key: send 'Authorization: Bearer <key>'",
            code="missing_api_key",
        )
    raise PermissionDeniedError(f"this key may not read {what} (gateway.metrics.api_keys)")


async def metrics(request: web.Request) -> web.Response:
    """``GET /metrics``: this process's page; under ``serve --workers N`` every worker's, each
    sample labelled with its ``worker`` (`telemetry.gather`)."""
    check_metrics_access(request)
    body = await served_page(request.app)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def served_page(application: web.Application) -> bytes:
    """The page that ``/metrics`` serves, on the API listener and on the
    ``gateway.metrics.port`` listener (`api.metrics_listener`, as the picker's): this
    process's; under ``serve --workers N`` every worker's."""
    body = local_page(application[GATEWAY_KEY])
    pages = application.get(WORKER_PAGES)
    if pages is not None:
        body = await gather.gather(body, pages.index, pages.n, pages.directory,
                                   pages.timeout_s)
    return body


def local_page(gw: Gateway) -> bytes:
    """This process's own metrics page (`Core.metrics_page`): what a single-process gateway
    serves at ``/metrics``, and what a worker of ``serve --workers`` answers the other workers
    on its socket."""
    gw.metrics.streams_relayed.set(gw.dispatcher.streams)
    return gw.metrics_page()


async def fleet_health(request: web.Request) -> web.Response:
    """``GET /v1/fleet/health``: every endpoint's health (up, ejected and why, stale, load,
    latency, errors) and every pool's concurrency health (`fleet.health`). The fleet's load,
    as ``/metrics`` shows it: for admin keys (`check_admin_key`), and for every tenant's key
    only with ``gateway.metrics.fleet_health_for_tenants`` (``gateway.metrics.public`` opens
    ``/metrics`` only)."""
    gw = request.app[GATEWAY_KEY]
    check_admin_key(
        request, "/v1/fleet/health",
        "gateway.metrics.api_keys (admin keys) or gateway.metrics.fleet_health_for_tenants",
        tenants=gw.config.gateway.metrics.fleet_health_for_tenants)
    snap = gw.live.snapshot()
    records = gw.outliers.records
    body = {
        "object": "fleet.health",
        "endpoints": [endpoint_summary(v, records.get(v.name), snap.now) for v in snap.endpoints],
        "pools": [p.to_json() for p in gw.pool_health().values()],
    }
    return web.json_response(body, dumps=_dumps)


USAGE_GROUPS = ("day", "workflow", "model", "class", "key")


async def usage(request: web.Request) -> web.Response:
    """``GET /v1/usage?group_by=workflow,model``: the caller's tenant's own cost and tokens."""
    gw = request.app[GATEWAY_KEY]
    tenant = gw.authenticate(request.headers.get("Authorization"))
    raw = request.query.get("group_by", "day")
    group_by = [g.strip() for g in raw.split(",") if g.strip()]
    bad = [g for g in group_by if g not in USAGE_GROUPS]
    if bad or not group_by or len(set(group_by)) != len(group_by):
        raise InvalidRequestError(
            f"group_by must be a comma list of distinct {', '.join(USAGE_GROUPS)}; got {raw!r}",
            param="group_by",
        )
    rows = await gw.admission.usage(tenant.name, group_by)
    total = {
        "requests": sum(r["requests"] for r in rows),
        "prompt_tokens": sum(r["prompt_tokens"] for r in rows),
        "completion_tokens": sum(r["completion_tokens"] for r in rows),
        "cost_usd": round(sum(r["cost_usd"] for r in rows), 9),
    }
    body = {
        "object": "list",
        "tenant": tenant.name,
        "group_by": group_by,
        "data": rows,
        "total": total,
    }
    return web.json_response(body, dumps=_dumps)


async def get_decision(request: web.Request) -> web.Response:
    """A decision record, to the tenant that made the request and to nobody else: another
    tenant's id and an unknown id get the same 404, so ids cannot be probed."""
    gw = request.app[GATEWAY_KEY]
    tenant = gw.authenticate(request.headers.get("Authorization"))
    rec = await gw.ledger.lookup(request.match_info["decision_id"])
    if rec is None or rec.get("tenant") != tenant.name:
        raise NotFoundError("no such decision", param="decision_id")
    return web.json_response(rec, dumps=_dumps)


async def list_decisions(request: web.Request) -> web.Response:
    """``GET /v1/decisions?since=&until=&class=&model=&substrate=&limit=&cursor=``: the caller's
    tenant's records, oldest first, each with its receipt; ``next_cursor`` (opaque) continues."""
    gw = request.app[GATEWAY_KEY]
    tenant = gw.authenticate(request.headers.get("Authorization"))
    try:
        q = parse_query(tenant.name, dict(request.query))
    except BadQuery as exc:
        raise InvalidRequestError(str(exc), param=exc.param) from None
    page = await gw.ledger.query(q)
    body = {
        "object": "list",
        "data": page.items,
        "has_more": page.next_cursor is not None,
        "next_cursor": page.next_cursor,
    }
    return web.json_response(body, dumps=_dumps)


def _dumps(obj: object) -> str:
    return orjson.dumps(obj).decode()


def build_app(gateway: Gateway) -> web.Application:
    app = web.Application(
        middlewares=[responses_middleware, error_middleware],
        client_max_size=gateway.config.gateway.max_body_bytes,
    )
    app[GATEWAY_KEY] = gateway
    app.router.add_post("/v1/chat/completions", make_api_handler("chat"))
    app.router.add_post("/v1/completions", make_api_handler("completions"))
    app.router.add_post("/v1/embeddings", make_api_handler("embeddings"))
    app.router.add_get("/v1/models", models)
    app.router.add_get("/v1/decisions", list_decisions)
    app.router.add_get("/v1/decisions/{decision_id}", get_decision)
    app.router.add_get("/v1/usage", usage)
    app.router.add_get("/v1/fleet/health", fleet_health)
    app.router.add_get("/health", health)
    app.router.add_get("/ready", ready)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/openapi.json", openapi_json)

    async def on_startup(app: web.Application) -> None:
        await gateway.start()

    async def on_cleanup(app: web.Application) -> None:
        await gateway.stop()

    async def close_while_draining(_: web.Request, response: web.StreamResponse) -> None:
        # SIGTERM with gateway.drain_delay_s: ask keep-alive clients (a load balancer's pooled
        # connections) to leave now rather than when the listener closes. Headers are already
        # prepared when this hook runs, so the header is set here besides force_close().
        if gateway.draining:
            response.force_close()
            response.headers[hdrs.CONNECTION] = "close"

    app.on_response_prepare.append(close_while_draining)
    app.on_startup.append(on_startup)
    app.on_cleanup.append(on_cleanup)
    # /v1/files, /v1/batches and the batch worker
    batch_routes.setup(app, gateway, gateway.dispatcher)
    app[OPENAPI_KEY] = orjson.dumps(build_spec(route_table(app)))
    console.setup(app, gateway)  # /console: the web console, for admin keys
    return app


OPENAPI_KEY: web.AppKey[bytes] = web.AppKey("openapi", bytes)


def route_table(app: web.Application) -> list[tuple[str, str]]:
    """(method, path template) of every API route of ``app`` (not the console's HTML pages)."""
    return [(r.method, r.resource.canonical) for r in app.router.routes()
            if r.resource and not r.resource.canonical.startswith(console.PREFIX)]


async def openapi_json(request: web.Request) -> web.Response:
    """``GET /openapi.json``: the OpenAPI description of this gateway (`api.openapi`)."""
    return web.Response(body=request.app[OPENAPI_KEY], content_type="application/json")


class ListenError(Exception):
    """The gateway started but could not bind its address."""


async def serve(
    gateway: Gateway, host: str, port: int, *, reuse_port: bool = False
) -> web.AppRunner:
    """Build the app, run its start-up hooks and listen on host:port; returns the runner (call
    ``runner.cleanup()`` to stop). On any failure whatever had started is stopped (the clean-up
    hooks stop the batch worker and the gateway) and the error re-raised; a failed bind as
    `ListenError`."""
    application = build_app(gateway)
    g = gateway.config.gateway
    limits = ConnectionLimits(
        header_timeout_s=g.header_timeout_s,
        idle_timeout_s=g.idle_timeout_s,
        max_connections_per_client=g.max_connections_per_client,
        trusted_proxies=tuple(ip_network(n, strict=False) for n in g.trusted_proxies),
    )
    runner = GatewayRunner(application, limits=limits, responded=gateway.metrics.responded)
    page_server = None
    worker = worker_set()
    if worker is not None:  # a worker of `serve --workers N`: /metrics gathers every worker's
        application[WORKER_PAGES] = WorkerPages(*worker)
        pages = page_server = gather.PageServer(worker[2], worker[0],
                                                lambda: local_page(gateway))
        gateway.metrics.worker_page_refused.count_from(lambda: pages.refused)

        async def close_pages(_: web.Application) -> None:
            await pages.close()

        application.on_cleanup.insert(0, close_pages)
    metrics_runner: web.AppRunner | None = None
    if g.metrics.port is not None:
        async def stop_metrics(_: web.Application) -> None:
            if metrics_runner is not None:
                await metrics_runner.cleanup()

        application.on_cleanup.insert(0, stop_metrics)  # before start-up freezes the list
    try:
        await runner.setup()
    except BaseException:
        # aiohttp skips on_cleanup when start-up failed: run each hook here, whatever the others do
        for hook in list(application.on_cleanup):
            with contextlib.suppress(Exception):
                await hook(application)
        raise
    try:
        await web.TCPSite(
            runner, host, port, reuse_address=True, reuse_port=reuse_port or None
        ).start()
        if g.metrics.port is not None:
            metrics_runner = await metrics_listener.start(
                lambda: served_page(application), g.metrics.host, g.metrics.port, g,
                reuse_port=reuse_port)
        if page_server is not None:
            try:
                await page_server.start()
            except OSError as exc:  # a side channel: the worker serves on without it
                log.warning("worker %d cannot serve its metrics page to the other workers "
                            "(socket %s: %s); their scrapes leave it out "
                            "(inferplane_worker_up 0)", page_server.index, page_server.path,
                            exc.strerror or exc)
    except BaseException as exc:
        with contextlib.suppress(Exception):
            await runner.cleanup()
        if isinstance(exc, OSError):
            raise ListenError(exc.strerror or str(exc)) from exc
        raise
    return runner

