"""bench/peers/python_proxy.py: the least a Python asyncio router does, as a floor to compare with.

    python bench/peers/python_proxy.py --port N --upstream URL [--upstream URL ...]

A reverse proxy on aiohttp and uvloop with the gateway's transport settings (on Python 3.11 the
gateway's eager writer, `inferplane.dispatch.eager`; handler cancellation; one keep-alive pool
for every upstream) that sends each request to the next upstream in turn (round robin) and
relays the answer as it arrives: no parsing of the body, no tokenization, no placement, no
admission, no accounting, no scrapes. An upstream that cannot be reached is a 502; one that
drops a stream mid-way leaves the client's stream cut short. ``/health`` answers 200.

What it is for (`real_engines.py`, the setup ``python-proxy round_robin``): on a host where the
engines and the router share the cores, the time a request spends in *any* Python asyncio relay
(an HTTP request read, parsed and written by the server, a client request built and written,
every event read and written back) against a Rust router's (vllm-router ``round_robin``: the
same placement, though it is sent token-id prompts, which the engines' front ends do not
tokenize, where this relay and inferplane are sent text), and against inferplane's
``round-robin`` profile (the same placement and prompts with everything inferplane does per
request). The rows split a gap between inferplane and the Rust routers into what the runtime
costs and what inferplane's own work costs.
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import aiohttp
import uvloop
from aiohttp import web
from multidict import CIMultiDict

SRC = str(Path(__file__).resolve().parents[2] / "src")
if SRC not in sys.path:
    sys.path.insert(0, SRC)

from inferplane.dispatch import eager  # noqa: E402

# hop-by-hop headers (RFC 9110 7.6.1) and what aiohttp sets itself
HOP = frozenset({"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade",
                 "proxy-authorization", "proxy-authenticate", "proxy-connection"})
HOP_IN = HOP | {"content-length", "host"}  # aiohttp frames the body it sends
UPSTREAMS = web.AppKey("upstreams", itertools.cycle)
SESSION = web.AppKey("session", aiohttp.ClientSession)


async def relay(request: web.Request) -> web.StreamResponse:
    base = next(request.app[UPSTREAMS])
    body = await request.read()
    headers = CIMultiDict((k, v) for k, v in request.headers.items() if k.lower() not in HOP_IN)
    try:
        up = await request.app[SESSION].request(
            request.method, base + request.raw_path, data=body, headers=headers)
    except aiohttp.ClientError as exc:
        return web.json_response({"error": {"message": f"upstream {base}: {exc!r}"}}, status=502)
    async with up:
        out = web.StreamResponse(status=up.status, headers=CIMultiDict(
            (k, v) for k, v in up.headers.items() if k.lower() not in HOP))
        await out.prepare(request)
        async for chunk in up.content.iter_any():
            await out.write(chunk)
        await out.write_eof()
        return out


async def health(request: web.Request) -> web.Response:
    return web.Response(text="ok")


async def build(upstreams: list[str]) -> web.Application:
    eager.install()  # as `Dispatcher.start` does: on 3.11 a request goes out as it is handed over
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app[UPSTREAMS] = itertools.cycle([u.rstrip("/") for u in upstreams])
    app[SESSION] = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=60),
        timeout=aiohttp.ClientTimeout(total=None, sock_connect=5), auto_decompress=False)

    async def close(app: web.Application) -> None:
        await app[SESSION].close()

    app.on_cleanup.append(close)
    app.router.add_get("/health", health)
    app.router.add_route("*", "/{tail:.*}", relay)
    return app


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--upstream", action="append", required=True)
    a = ap.parse_args()
    web.run_app(build(a.upstream), host="127.0.0.1", port=a.port, access_log=None,
                print=None, loop=uvloop.new_event_loop(), handler_cancellation=True)


if __name__ == "__main__":
    main()
