"""Slow and greedy clients (issue 12 item 10), on a real listener over raw sockets: slow-loris
heads and bodies are cut off, silent connections closed, and one address cannot hold more than its
share of connections. Timeouts here are a fraction of a second, so the test stays quick."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, cast

import pytest
from aiohttp import web

from inferplane.api.app import serve
from inferplane.api.pipeline import Gateway
from inferplane.config.loader import parse_config
from tests.builders import model, pool_fleet, tenant, to_yaml
from tests.support.loopback import engine_app, serve_on_loopback
from tests.support.procs import free_port

KEY = "sk-slow"


def _config(up_port: int, *, gateway: dict[str, Any],
            endpoint: dict[str, Any] | None = None) -> str:
    """The fleet file: ``gateway`` adds to its gateway block, ``endpoint`` to the endpoint."""
    return to_yaml(pool_fleet(
        up_port, substrate={"cost": {"hourly_usd": 1.0}}, models=[model(max_context=4096)],
        endpoint_fields={"name": "up", **(endpoint or {})},
        gateway={"scrape_interval_s": 0.05, **gateway}, tenants=[tenant("a", KEY)]))


async def _ok(request: web.Request) -> web.Response:
    return web.json_response({"id": "x", "object": "chat.completion", "model": "m", "choices": [
        {"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": "hi"}}],
        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}})


async def _empty(request: web.Request) -> web.Response:
    return web.Response(text="")


TIMEOUTS = {"header_timeout_s": 0.5, "body_timeout_s": 0.5, "upload_timeout_s": 1.5,
            "idle_timeout_s": 1.0, "max_connections_per_client": 4}


@pytest.fixture
async def port() -> AsyncIterator[int]:
    async with _serving(TIMEOUTS) as gw_port:
        yield gw_port


@pytest.fixture
async def upload_port() -> AsyncIterator[int]:
    """A gateway whose only deadline a steady upload can meet is ``upload_timeout_s``: the
    pause between body reads allowed (``body_timeout_s``) is longer than the whole upload's."""
    async with _serving({**TIMEOUTS, "body_timeout_s": 2.0, "upload_timeout_s": 1.0}) as gw_port:
        yield gw_port


@asynccontextmanager
async def _serving(gateway: dict[str, Any]) -> AsyncIterator[int]:
    up_runner, up_port = await serve_on_loopback(engine_app(_ok, _empty, _ok))
    cfg = _config(up_port, gateway=gateway)
    gw_port = free_port()
    runner = await serve(Gateway(parse_config(cfg)), "127.0.0.1", gw_port)
    try:
        yield gw_port
    finally:
        await runner.cleanup()
        await up_runner.cleanup()


async def _closed_within(reader: asyncio.StreamReader, seconds: float) -> bytes:
    """Everything the server sent before closing; fails if it is still open after ``seconds``."""
    got = b""
    async with asyncio.timeout(seconds):
        while True:
            try:
                chunk = await reader.read(65536)
            except ConnectionResetError:
                return got
            if not chunk:
                return got
            got += chunk


async def _drip(writer: asyncio.StreamWriter, data: bytes, every_s: float) -> None:
    try:
        for b in data:
            writer.write(bytes([b]))
            await writer.drain()
            await asyncio.sleep(every_s)
    except ConnectionError:
        pass  # the server closed: what the test wants


async def _drip_lines(writer: asyncio.StreamWriter, data: bytes, every_s: float) -> None:
    """A line at a time: enough for the multipart reader to hand on (it reads past the
    boundary's length), so no pause reaches body_timeout_s."""
    try:
        for line in data.splitlines(keepends=True):
            writer.write(line)
            await writer.drain()
            await asyncio.sleep(every_s)
    except ConnectionError:
        pass


async def test_slow_loris_heads_are_closed(port: int) -> None:
    head = f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
    conns = [await asyncio.open_connection("127.0.0.1", port) for _ in range(4)]
    drips = [asyncio.create_task(_drip(w, head.encode() * 20, 0.1)) for _, w in conns]
    try:
        for r, _ in conns:
            await _closed_within(r, 5.0)  # header_timeout_s is 0.5 s; the drip would take 30 s
    finally:
        for t in drips:
            t.cancel()
        for _, w in conns:
            w.close()


async def test_slow_body_is_408_and_closed(port: int) -> None:
    body = json.dumps({"model": "m", "messages": [{"role": "user", "content": "x" * 200}]})
    head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n")
    r, w = await asyncio.open_connection("127.0.0.1", port)
    w.write(head.encode())
    drip = asyncio.create_task(_drip(w, body.encode(), 0.1))
    try:
        answer = await _closed_within(r, 5.0)
    finally:
        drip.cancel()
        w.close()
    status_line, _, rest = answer.partition(b"\r\n")
    assert b" 408 " in status_line, answer
    err = json.loads(rest.partition(b"\r\n\r\n")[2])["error"]
    assert err["code"] == "request_timeout"


async def test_slow_upload_is_408(port: int) -> None:
    part = (b"--B\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nbatch\r\n"
            b"--B\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a\"\r\n\r\n")
    head = (f"POST /v1/files HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
            f"Content-Type: multipart/form-data; boundary=B\r\nContent-Length: 100000\r\n\r\n")
    r, w = await asyncio.open_connection("127.0.0.1", port)
    w.write(head.encode() + part)  # then nothing more: a stalled upload
    try:
        answer = await _closed_within(r, 5.0)
    finally:
        w.close()
    assert b" 408 " in answer.partition(b"\r\n")[0], answer


async def test_an_upload_that_never_pauses_long_is_cut_at_its_deadline(upload_port: int) -> None:
    # audit28 finding 10: a line every 0.1 s (body_timeout_s is 2 s) was never cut
    part = (b"--B\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nbatch\r\n"
            b"--B\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a\"\r\n\r\n")
    head = (f"POST /v1/files HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
            f"Content-Type: multipart/form-data; boundary=B\r\nContent-Length: 100000\r\n\r\n")
    r, w = await asyncio.open_connection("127.0.0.1", upload_port)
    w.write(head.encode() + part)
    drip = asyncio.create_task(_drip_lines(w, b'{"custom_id": "a"}\n' * 500, 0.1))
    try:
        answer = await _closed_within(r, 5.0)  # upload_timeout_s is 1 s
    finally:
        drip.cancel()
        w.close()
    status_line, _, rest = answer.partition(b"\r\n")
    assert b" 408 " in status_line, answer
    err = json.loads(rest.partition(b"\r\n\r\n")[2])["error"]
    assert err["code"] == "request_timeout" and "upload_timeout_s" in err["message"], err


async def test_a_body_that_cannot_be_decoded_is_400_and_closed(port: int) -> None:
    # audit28 nit 13: the 400 said Connection: close and the socket stayed open
    body = b"not gzip at all, " * 8
    head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
            f"Content-Type: application/json\r\nContent-Encoding: gzip\r\n"
            f"Content-Length: {len(body)}\r\n\r\n")
    r, w = await asyncio.open_connection("127.0.0.1", port)
    w.write(head.encode() + body)
    try:
        answer = await _closed_within(r, 3.0)
    finally:
        w.close()
    assert b" 400 " in answer.partition(b"\r\n")[0], answer
    assert b"could not be decoded" in answer


async def test_silent_connection_is_closed(port: int) -> None:
    r, w = await asyncio.open_connection("127.0.0.1", port)
    try:
        assert await _closed_within(r, 5.0) == b""  # idle_timeout_s is 1 s
    finally:
        w.close()


async def _limit_reached(port: int) -> None:
    held = [await asyncio.open_connection("127.0.0.1", port) for _ in range(4)]
    r, w = await asyncio.open_connection("127.0.0.1", port)
    answer = await _closed_within(r, 5.0)
    w.close()
    assert b" 429 " in answer.partition(b"\r\n")[0], answer
    err = json.loads(answer.partition(b"\r\n\r\n")[2])["error"]
    assert err["code"] == "too_many_connections"
    _, w0 = held.pop()
    w0.close()
    await asyncio.sleep(0.1)
    r, w = await asyncio.open_connection("127.0.0.1", port)  # a slot is free again
    w.write(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert b" 200 " in (await _closed_within(r, 5.0)).partition(b"\r\n")[0]
    w.close()
    for _, hw in held:
        hw.close()


async def test_connections_per_client_are_limited(port: int) -> None:
    await _limit_reached(port)


def test_connections_per_client_are_limited_under_uvloop(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """audit28 finding 1: `serve` runs on uvloop, whose TCPTransport is not an
    asyncio.WriteTransport; the 429 was an AssertionError in connection_made (logged per
    connection) and the connection hung unanswered. The same limit, on uvloop's loop."""
    uvloop = pytest.importorskip("uvloop")

    async def main() -> None:
        up_runner, up_port = await serve_on_loopback(engine_app(_ok, _empty, _ok))
        cfg = _config(up_port, gateway={"max_connections_per_client": 4})
        gw_port = free_port()
        runner = await serve(Gateway(parse_config(cfg)), "127.0.0.1", gw_port)
        try:
            await _limit_reached(gw_port)
        finally:
            await runner.cleanup()
            await up_runner.cleanup()

    loop = uvloop.new_event_loop()
    try:
        assert "uvloop" in type(loop).__module__
        loop.run_until_complete(main())
    finally:
        loop.close()
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text


async def _answer(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """One HTTP/1.1 answer with a Content-Length body: (status, body)."""
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    length = next(int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                  if line.lower().startswith(b"content-length:"))
    return status, await reader.readexactly(length)


async def test_connections_per_client_behind_a_trusted_proxy() -> None:
    """Issue 14, reliability: behind a trusted proxy every connection comes from the proxy's
    address, so ``max_connections_per_client`` counted the proxy as one client (a proxy holding
    more connections than the limit had the rest refused, whoever the clients were). Now a
    trusted proxy's connection is not counted; each request on it counts, while it runs, as a
    connection of the client X-Forwarded-For names, and one past the limit is a 429 on a
    connection that stays open for the proxy's next request."""
    release = asyncio.Event()
    arrived: list[str] = []

    async def held(request: web.Request) -> web.Response:
        arrived.append(request.path)
        await release.wait()
        return await _ok(request)

    up_runner, up_port = await serve_on_loopback(engine_app(held, _empty, _ok))
    cfg = _config(up_port, gateway={"max_connections_per_client": 2,
                                    "trusted_proxies": ["127.0.0.1/32"]},
                  endpoint={"max_concurrency": 64})
    port = free_port()
    runner = await serve(Gateway(parse_config(cfg)), "127.0.0.1", port)
    body = json.dumps({"model": "m", "max_tokens": 1,
                       "messages": [{"role": "user", "content": "hi"}]})

    def request(client: str) -> bytes:
        return (f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                f"Authorization: Bearer {KEY}\r\nX-Forwarded-For: {client}\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
                f"{body}").encode()

    conns = []
    try:
        async with asyncio.timeout(20):
            # the proxy opens four connections, more than the limit: none is refused; three
            # clients, one of them (.1) with two requests in flight, at its limit
            for client in ("198.51.100.1", "198.51.100.2", "198.51.100.3", "198.51.100.1"):
                r, w = await asyncio.open_connection("127.0.0.1", port)
                w.write(request(client))
                conns.append((r, w))
            while len(arrived) < 4:  # all four are in flight upstream
                await asyncio.sleep(0.01)
            r, w = await asyncio.open_connection("127.0.0.1", port)
            conns.append((r, w))
            w.write(request("198.51.100.1"))  # .1's third: over its limit
            status, answer = await _answer(r)
            assert status == 429, answer
            assert json.loads(answer)["error"]["code"] == "too_many_connections"
            w.write(request("198.51.100.4"))  # the same proxy connection, another client
            while len(arrived) < 5:
                await asyncio.sleep(0.01)
            release.set()
            for r, _ in conns:
                status, answer = await _answer(r)
                assert status == 200, answer
    finally:
        for _, w in conns:
            w.close()
        await runner.cleanup()
        await up_runner.cleanup()


async def _metrics_listener_limits(port: int) -> None:
    """A head dripped past header_timeout_s is cut; past max_connections_per_client (2 here)
    a connection gets the 429; a whole scrape still answers."""
    r, w = await asyncio.open_connection("127.0.0.1", port)
    w.write(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
    dripping = asyncio.ensure_future(_drip(w, b"X-A: b\r\n" * 40, 0.1))
    await _closed_within(r, 3.0)
    dripping.cancel()
    w.close()
    held = [await asyncio.open_connection("127.0.0.1", port) for _ in range(2)]
    r, w = await asyncio.open_connection("127.0.0.1", port)
    assert b" 429 " in (await _closed_within(r, 3.0)).partition(b"\r\n")[0]
    w.close()
    for _, hw in held:
        hw.close()
    await asyncio.sleep(0.1)
    r, w = await asyncio.open_connection("127.0.0.1", port)
    w.write(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert b" 200 " in (await _closed_within(r, 5.0)).partition(b"\r\n")[0]
    w.close()


LISTENER_LIMITS = {"header_timeout_s": 0.5, "idle_timeout_s": 1.0,
                   "max_connections_per_client": 2}


async def test_the_gateways_metrics_listener_has_the_api_listeners_limits() -> None:
    """audit28 finding 5: the gateway.metrics.port listener (often on 0.0.0.0 for the scraper)
    was a plain aiohttp server: no header timeout, no per-client connection limit."""
    up_runner, up_port = await serve_on_loopback(engine_app(_ok, _empty, _ok))
    mport = free_port()
    cfg = _config(up_port, gateway={**LISTENER_LIMITS,
                                    "metrics": {"host": "127.0.0.1", "port": mport}})
    runner = await serve(Gateway(parse_config(cfg)), "127.0.0.1", free_port())
    try:
        await _metrics_listener_limits(mport)
    finally:
        await runner.cleanup()
        await up_runner.cleanup()


async def test_the_pickers_metrics_listener_has_the_api_listeners_limits() -> None:
    """The same for the picker's epp.metrics_port listener (one helper opens both:
    `api.metrics_listener.start`)."""
    from tests.test_epp_stream import fleet_config
    from tests.test_epp_stream import picker as epp_picker

    mport = free_port()
    async with epp_picker(fleet_config(gateway=LISTENER_LIMITS,
                                       epp={"metrics_port": mport})):
        await _metrics_listener_limits(mport)


async def test_a_timeout_inside_the_upload_is_not_the_upload_deadline() -> None:
    # review28 S3: a TimeoutError raised by the upload's own work (a storage write, a deadline
    # of its own) was answered as gateway.upload_timeout_s
    from inferplane.httpio import within

    async def receive() -> None:
        raise TimeoutError("storage write")

    with pytest.raises(TimeoutError, match="storage write"):
        await within(receive(), 60.0, cast(web.Request, None))
