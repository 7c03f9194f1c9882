"""An aiohttp application served in this process on a free loopback port (a test's upstream)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from tests.support.procs import free_port

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def engine_app(chat: Handler, metrics: Handler, health: Handler) -> web.Application:
    """The three routes the gateway calls on an OpenAI-compatible engine."""
    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/health", health)
    return app


async def serve_on_loopback(app: web.Application, **runner: Any) -> tuple[web.AppRunner, int]:
    """Serve ``app`` on 127.0.0.1; returns its runner (``cleanup()`` stops it) and port."""
    up = web.AppRunner(app, **runner)
    await up.setup()
    port = free_port()
    await web.TCPSite(up, "127.0.0.1", port).start()
    return up, port
