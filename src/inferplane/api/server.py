"""The HTTP/1.1 server under the app: aiohttp's protocol with the OpenAI error shape and limits on
slow and greedy clients.

aiohttp answers what its parser rejects (an over-long line or header, NUL bytes, bad framing, a
duplicate Host, Content-Length with Transfer-Encoding, garbage) itself, from
`RequestHandler.handle_error`, in plain text; `GatewayProtocol` answers those, and any exception
that escapes the app, in OpenAI's shape ``{"error": {"message", "type", "param", "code"}}``.

Slow clients (`ConnectionLimits`): a request head must arrive whole within ``header_timeout_s`` of
its first byte; a connection idle between requests (or silent from the start) for
``idle_timeout_s`` is closed; a client address past ``max_connections_per_client`` open
connections gets a 429 and is closed. The body deadline (``body_timeout_s``) is the app's: it
reads bodies (`api.app`).

A connection from a trusted proxy (``gateway.trusted_proxies``: Envoy, a load balancer) carries
many clients' requests, so it is not counted against the proxy's address. Each request on it
counts instead, while it runs, as a connection of the client that ``X-Forwarded-For`` names
(its right-most untrusted address, `console_auth.client_address`): a client past the limit
gets a 429 ``too_many_connections`` for that request, and the proxy's connection stays open.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest

from inferplane.api.console_auth import IpNetwork, client_address
from inferplane.errors import RateLimitError

log = logging.getLogger("inferplane.api")

LINGER_S = 1.0
Responded = Callable[[str, int], None]
"""Counts one answer by api label and status (`telemetry.metrics.GatewayMetrics.responded`)."""


@dataclass(frozen=True, slots=True)
class ConnectionLimits:
    header_timeout_s: float = 10.0
    idle_timeout_s: float = 75.0
    max_connections_per_client: int = 512
    trusted_proxies: tuple[IpNetwork, ...] = ()

    def trusted(self, peer: str | None) -> bool:
        """Whether ``peer`` is one of ``trusted_proxies``."""
        if peer is None or not self.trusted_proxies:
            return False
        try:
            ip = ipaddress.ip_address(peer)
        except ValueError:
            return False
        return any(ip in net for net in self.trusted_proxies if net.version == ip.version)


def _too_many(limit: int) -> str:
    return f"too many open connections from this client (limit {limit}); reuse connections"


def error_body(status: int, message: str, error_type: str, code: str | None = None) -> bytes:
    return orjson.dumps(
        {"error": {"message": message, "type": error_type, "param": None, "code": code}}
    )


_QUOTED = re.compile(r"""(?:^|(?<=[\s:]))(?:bytearray\()?b?['"]""")
"""Where aiohttp's parser messages start quoting the request's bytes (``... when reading:
b'Bearer sk-...'``, ``Invalid header value char:\n\n  b'Authorization: ...'``)."""


def _parser_message(status: int, message: str | None) -> str:
    """What the answer and the log say of a request the parser refused: aiohttp's words
    without the bytes it quotes, which may be a header's value (an over-long ``Authorization``
    is its bearer key: answered to whoever sent it and logged, which the key never is)."""
    if status >= 500:
        return "internal error; see the gateway log"
    text = message or ""
    if (m := _QUOTED.search(text)) is not None:
        text = text[: m.start()]
    text = " ".join(text.split()).rstrip(" :")
    if not text:
        return "malformed HTTP request"
    text = text.encode("ascii", "backslashreplace").decode("ascii")
    return f"malformed HTTP request: {text[:300]}"


class GatewayProtocol(RequestHandler):
    """One client connection. See the module docstring."""

    __slots__ = ("_busy", "_client", "_close_after", "_header_timer", "_limits", "_peer",
                 "_proxied")

    def __init__(self, manager: GatewayServer, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._limits = manager.limits
        self._header_timer: asyncio.TimerHandle | None = None
        self._busy = False
        self._close_after = False  # `close_after_answer`
        self._peer: str | None = None  # counted against this address while connected
        self._proxied: str | None = None  # a trusted proxy's address: its requests count
        self._client: str | None = None  # the client of the request running (via a proxy)

    # -- per-client connection limit ------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        peer = transport.get_extra_info("peername")
        self._peer = str(peer[0]) if isinstance(peer, tuple) and peer else None
        manager = self._manager
        if self._peer is None or not isinstance(manager, GatewayServer):
            return
        if self._limits.trusted(self._peer):  # many clients' requests: counted per request
            self._proxied, self._peer = self._peer, None
            return
        manager.per_client[self._peer] += 1
        if manager.per_client[self._peer] > self._limits.max_connections_per_client:
            msg = _too_many(self._limits.max_connections_per_client)
            body = error_body(429, msg, "rate_limit_exceeded", "too_many_connections")
            head = (
                "HTTP/1.1 429 Too Many Requests\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\nRetry-After: 1\r\nConnection: close\r\n\r\n"
            )
            # through aiohttp's own handle on the transport: uvloop's TCPTransport (the default
            # loop of `serve`) is not an asyncio.WriteTransport subclass, though it writes
            if self.transport is not None:
                self.transport.write(head.encode() + body)
            self.force_close()
            if manager.responded is not None:
                manager.responded("other", 429)

    def _uncount(self, address: str) -> None:
        manager = self._manager
        if isinstance(manager, GatewayServer):
            left = manager.per_client[address] - 1
            if left > 0:
                manager.per_client[address] = left
            else:
                manager.per_client.pop(address, None)

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._peer is not None:
            self._uncount(self._peer)
            self._peer = None
        self._end_proxied()
        self._disarm()
        super().connection_lost(exc)

    def _start_proxied(self, request: BaseRequest) -> None:
        """A request on a trusted proxy's connection: count it against the client that
        ``X-Forwarded-For`` names; raise a 429 past the limit."""
        manager = self._manager
        if self._proxied is None or not isinstance(manager, GatewayServer):
            return
        self._end_proxied()  # the connection's previous request, if its end was missed
        client = client_address(self._proxied, request.headers.getall("X-Forwarded-For", []),
                                self._limits.trusted_proxies)
        manager.per_client[client] += 1
        self._client = client
        limit = self._limits.max_connections_per_client
        if manager.per_client[client] > limit:
            self._end_proxied()
            raise RateLimitError(_too_many(limit), code="too_many_connections",
                                 headers={"Retry-After": "1"})

    def _end_proxied(self) -> None:
        if self._client is not None:
            self._uncount(self._client)
            self._client = None

    # -- header timeout -------------------------------------------------------------------
    def data_received(self, data: bytes) -> None:
        if not self._busy and self._header_timer is None and data:
            self._header_timer = self._loop.call_later(
                self._limits.header_timeout_s, self._header_timeout
            )
        super().data_received(data)

    def request_started(self, request: BaseRequest) -> None:
        """The app calls this when a request's head has arrived (`api.app`); a 429
        (`RateLimitError`) when it comes through a trusted proxy from a client past
        ``max_connections_per_client``."""
        self._busy = True
        self._disarm()
        self._start_proxied(request)

    async def finish_response(
        self, request: BaseRequest, resp: web.StreamResponse, start_time: float | None
    ) -> tuple[web.StreamResponse, bool]:
        try:
            return await super().finish_response(request, resp, start_time)
        finally:
            self._busy = False
            self._end_proxied()
            if self._close_after:
                # aiohttp's loop ends on _force_close but leaves the socket to whoever set it
                # (its own force_close() closes it at once): closed here, after the answer's
                # bytes (the transport writes what it holds before it closes)
                self.force_close()

    def close_after_answer(self) -> None:
        """Close the connection once the answer is written, without reading the rest of the
        request body (`httpio.unreadable`: a body that cannot be decoded; `httpio.within`: an
        upload past its deadline). aiohttp would otherwise read on after the handler to keep
        the connection alive, meet the same payload error again and log it as an unhandled
        exception."""
        self._force_close = self._close_after = True

    def _disarm(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _header_timeout(self) -> None:
        self._header_timer = None
        if not self._busy:
            log.info("closing a connection from %s: no whole request head within %.0f s",
                     self._peer, self._limits.header_timeout_s)
            self.force_close()

    # -- errors from the parser and anything that escaped the app -------------------------
    def handle_error(
        self,
        request: BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if isinstance(exc, ConnectionError):  # the client went away mid-answer: nothing to say
            raise ConnectionError("the client disconnected") from exc
        if status >= 500:
            log.error("error handling a request from %s: %s", request.remote,
                      type(exc).__name__ if exc is not None else "unknown")
        else:
            log.info("malformed request from %s: %s", request.remote,
                     _parser_message(status, message))
        if request.writer.output_size > 0:
            raise ConnectionError("the answer has started; no error can follow it")
        error_type = "internal_error" if status >= 500 else "invalid_request_error"
        resp = web.Response(
            status=status,
            body=error_body(status, _parser_message(status, message), error_type),
            content_type="application/json",
        )
        resp.force_close()
        manager = self._manager
        # a request the parser refused never reached the app's count (`api.app`); any other
        # exception here escaped the app, which counted its request already
        if isinstance(exc, HttpProcessingError) and isinstance(manager, GatewayServer) \
                and manager.responded is not None:
            manager.responded("other", status)
        return resp


class GatewayServer(web.Server):
    """aiohttp's connection manager, making `GatewayProtocol` connections."""

    def __init__(self, *args: Any, limits: ConnectionLimits,
                 responded: Responded | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.limits = limits
        self.responded = responded  # answers given before or outside the app
        self.per_client: Counter[str] = Counter()

    def __call__(self) -> RequestHandler:
        return GatewayProtocol(self, loop=self._loop, **self._kwargs)


class GatewayRunner(web.AppRunner):
    """`web.AppRunner` whose server speaks `GatewayProtocol`."""

    def __init__(self, app: web.Application, *, limits: ConnectionLimits,
                 responded: Responded | None = None) -> None:
        super().__init__(app, handler_cancellation=True, access_log=None)
        self.limits = limits
        self.responded = responded

    async def _make_server(self) -> web.Server:
        base = await super()._make_server()  # runs the app's start-up hooks
        return GatewayServer(
            base.request_handler,
            request_factory=base.request_factory,
            handler_cancellation=True,
            loop=asyncio.get_running_loop(),
            limits=self.limits,
            responded=self.responded,
            access_log=None,
            keepalive_timeout=self.limits.idle_timeout_s,
            # after an answer that left the body unread (408, 413), read and drop what is still
            # coming for this long before closing, so the client sees the answer, not a reset
            lingering_time=LINGER_S,
        )


def request_started(request: web.Request) -> None:
    """Tell the connection its request head is in (stops its header timer); raises a 429
    for a client past its connections through a trusted proxy."""
    proto = request.protocol
    if isinstance(proto, GatewayProtocol):
        proto.request_started(request)

