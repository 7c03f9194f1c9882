"""The metrics-only listener both front ends open for the Prometheus scraper
(``gateway.metrics.port`` for the gateway, ``epp.metrics_port`` for the Envoy picker):
``GET /metrics`` with no key; any other path or method gets an OpenAI-shaped error, as on the
gateway's API listener. It speaks the API listener's protocol (`server.GatewayProtocol`), so
the same limits on slow and greedy clients apply (``gateway.header_timeout_s``,
``idle_timeout_s``, ``max_connections_per_client``): it is often bound to 0.0.0.0 for the
scraper."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from inferplane.api.server import ConnectionLimits, GatewayRunner, request_started
from inferplane.config.schema import GatewaySpec
from inferplane.errors import GatewayError, InvalidRequestError, NotFoundError

Page = Callable[[], Awaitable[bytes]]
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def _errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        request_started(request)  # the head is in: stops the connection's header timer
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        err: GatewayError
        if exc.status == 404:
            err = NotFoundError(f"no route {request.method} {request.path}")
        else:
            err = InvalidRequestError(f"method {request.method} not allowed on {request.path}"
                                      if exc.status == 405 else exc.reason or "HTTP error")
            err.status = exc.status
        return web.json_response(err.to_body(), status=err.status)


def metrics_app(page: Page) -> web.Application:
    """An app serving ``page()`` at ``GET /metrics`` and nothing else."""

    async def metrics(_: web.Request) -> web.Response:
        return web.Response(body=await page(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    app = web.Application(middlewares=[_errors])
    app.router.add_get("/metrics", metrics)
    return app


async def start(page: Page, host: str, port: int, gateway: GatewaySpec, *,
                reuse_port: bool = False) -> web.AppRunner:
    """Listen on host:port serving ``page()`` at ``GET /metrics``, with the API listener's
    limits from ``gateway`` (trusted proxies aside: a scraper connects directly); returns the
    runner (``cleanup()`` stops it). An OSError, with nothing left open, when it cannot
    bind."""
    limits = ConnectionLimits(
        header_timeout_s=gateway.header_timeout_s,
        idle_timeout_s=gateway.idle_timeout_s,
        max_connections_per_client=gateway.max_connections_per_client,
    )
    runner = GatewayRunner(metrics_app(page), limits=limits)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port, reuse_address=True,
                          reuse_port=reuse_port or None).start()
    except BaseException:
        await runner.cleanup()
        raise
    return runner
