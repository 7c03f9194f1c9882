"""The gateway's upstream session keeps no cookies: one session carries every tenant's requests,
scrapes and health probes, so a ``Set-Cookie`` from an engine (or a proxy in front of it) must not
come back on later requests — another tenant's included. aiohttp's default jar would store it
(for a host name; it refuses IP addresses) and send it on; `aiohttp.DummyCookieJar` stores
nothing, and skips the jar's filtering on every request (py-spy on real engines, session 24:
``CookieJar.filter_cookies`` 4 of the gateway's 539 self-time samples, ~0.7 %).
"""

from __future__ import annotations

import aiohttp
from aiohttp import web
from yarl import URL

from inferplane.dispatch.upstream import Dispatcher
from tests.support.loopback import serve_on_loopback

SEEN = web.AppKey("seen", list)
HOST = URL("http://replica.example:8000/v1/completions")


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
            async with session.post(f"http://127.0.0.1:{port}/v1/completions", data=b"{}") as r:
                assert r.status == 200
                await r.read()
                # aiohttp's default jar refuses an IP's cookies: offer the answer's to the jar
                # as a host name's, what the session does for an upstream named by host
                session.cookie_jar.update_cookies(r.cookies, HOST)
        assert seen == [None, None]
        assert not session.cookie_jar.filter_cookies(HOST)
        assert isinstance(session.cookie_jar, aiohttp.DummyCookieJar)
        assert len(session.cookie_jar) == 0
    finally:
        await d.close()
        await runner.cleanup()


async def test_the_pickers_session_keeps_no_cookies() -> None:
    """The EPP picker's own session (scrapes and probes; Envoy carries the requests) keeps no
    cookies either: a sticky load balancer's would pin its scrapes to one replica."""
    from inferplane.config.loader import parse_config
    from inferplane.epp.server import Picker
    from inferplane.fleet.scraper import HttpMetricsSource
    from tests.builders import model, pool_fleet, to_yaml

    cfg = parse_config(to_yaml(pool_fleet(
        9, substrate={"cost": {"hourly_usd": 1.0}}, endpoint_fields={"engine": "vllm"},
        models=[model(max_context=4096)])))
    picker = Picker(cfg)
    source = await picker._start_transport()
    try:
        assert isinstance(source, HttpMetricsSource)
        assert isinstance(source.session.cookie_jar, aiohttp.DummyCookieJar)
    finally:
        await picker._stop_transport()
