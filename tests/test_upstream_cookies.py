"""The gateway's upstream session keeps no cookies: one session carries every tenant's requests,
scrapes and health probes, so a ``Set-Cookie`` from an engine (or a proxy in front of it) must not
come back on later requests — another tenant's included. aiohttp's default jar would store it
(for a host name; it refuses IP addresses) and send it on; `aiohttp.DummyCookieJar` stores
nothing, and skips the jar's filtering on every request (py-spy on real engines, session 24:
``CookieJar.filter_cookies`` ~0.7 % of the gateway's samples).
"""

from __future__ import annotations

import aiohttp
from aiohttp import web

from inferplane.dispatch.upstream import Dispatcher
from tests.support.loopback import serve_on_loopback

SEEN = web.AppKey("seen", list)


async def _answer(request: web.Request) -> web.Response:
    request.app[SEEN].append(request.headers.get("Cookie"))
    resp = web.Response(text="ok")
    resp.set_cookie("route", "replica-a")
    return resp


async def test_upstream_cookies_are_not_sent_back() -> None:
    app = web.Application()
    app[SEEN] = seen = []
    app.router.add_post("/v1/completions", _answer)
    runner, port = await serve_on_loopback(app)
    d = Dispatcher(connect_timeout_s=2.0, total_timeout_s=5.0)
    session = await d.start()
    try:
        for _ in range(2):
            # "localhost": aiohttp's default jar keeps cookies of host names, not of IPs
            async with session.post(f"http://localhost:{port}/v1/completions", data=b"{}") as r:
                assert r.status == 200
                await r.read()
        assert seen == [None, None]
        assert isinstance(session.cookie_jar, aiohttp.DummyCookieJar)
        assert len(session.cookie_jar) == 0
    finally:
        await d.close()
        await runner.cleanup()
