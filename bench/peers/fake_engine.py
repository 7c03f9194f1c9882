"""bench/peers/fake_engine.py: an engine stand-in with a fixed time to first token.

    python bench/peers/fake_engine.py --port N [--ttft-s 0.15] [--log FILE] [--arrivals FILE]

Answers ``/v1/completions`` and ``/v1/chat/completions`` streams (and whole answers) after
``--ttft-s`` whatever the load — every request at once, no queue, no batching — then 16 text
events 2 ms apart, the usage event when ``stream_options.include_usage`` asks for it, and
``[DONE]``. ``/metrics`` is a short vLLM-style page, ``/health`` and ``/reset_prefix_cache``
answer 200. With ``--log`` it writes one uvicorn-style access line per request (the peer's
``host:port``: `gateway_gap.connections` counts connections from it). Idle connections are
closed after 5 s, as vLLM's uvicorn closes them. With ``--arrivals`` it appends, per streamed
request, ``KEY ARRIVED FIRST``: `prompt_key` of its prompt, when its handler started and when its
first event was written, on ``time.perf_counter`` (the clock the bench's client stamps its sends
with; on Linux one clock for every process), so `burst_transit.py` can split a router's time into
the way in and the way out.

In front of it, what a router adds to the time to first token is the router's alone.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import time
from typing import IO

import orjson
from aiohttp import web

TTFT, LOG = web.AppKey("ttft", float), web.AppKey("log", object)
ARRIVALS = web.AppKey("arrivals", object)


def prompt_key(prompt: object) -> str:
    """A short key of a request's prompt (matches a client's record to the engine's line)."""
    return hashlib.sha1(str(prompt).encode()).hexdigest()[:16]


PAGE = (
    "# TYPE vllm:num_requests_running gauge\n"
    'vllm:num_requests_running{engine="0",model_name="m"} 0.0\n'
    "# TYPE vllm:num_requests_waiting gauge\n"
    'vllm:num_requests_waiting{engine="0",model_name="m"} 0.0\n'
    "# TYPE vllm:kv_cache_usage_perc gauge\n"
    'vllm:kv_cache_usage_perc{engine="0",model_name="m"} 0.0\n'
)


@web.middleware
async def access_log(request: web.Request, handler: web.RequestHandler) -> web.StreamResponse:
    log: IO[str] | None = request.app[LOG]  # type: ignore[assignment]
    if log is not None and request.transport is not None:
        host, port = request.transport.get_extra_info("peername")[:2]
        log.write(f'INFO:     {host}:{port} - "{request.method} {request.path} HTTP/1.1" 200\n')
        log.flush()
    return await handler(request)


def _event(obj: object) -> bytes:
    return b"data: " + orjson.dumps(obj) + b"\n\n"


async def generate(request: web.Request) -> web.StreamResponse:
    arrived = time.perf_counter()
    body = orjson.loads(await request.read())
    chat = request.path.endswith("chat/completions")
    await asyncio.sleep(request.app[TTFT])
    words = [f"w{i} " for i in range(16)]
    usage = {"prompt_tokens": 1, "completion_tokens": len(words), "total_tokens": 1 + len(words)}
    obj = "chat.completion.chunk" if chat else "text_completion"
    if not body.get("stream"):
        text = "".join(words)
        choice = ({"index": 0, "message": {"role": "assistant", "content": text}} if chat
                  else {"index": 0, "text": text})
        return web.json_response({"id": "f", "object": obj.removesuffix(".chunk"),
                                  "created": int(time.time()), "model": body.get("model"),
                                  "choices": [{**choice, "finish_reason": "length"}],
                                  "usage": usage})
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await resp.prepare(request)
    first = None
    for w in words:
        choice = {"index": 0, "delta": {"content": w}} if chat else {"index": 0, "text": w}
        await resp.write(_event({"id": "f", "object": obj, "model": body.get("model"),
                                 "choices": [{**choice, "finish_reason": None}]}))
        first = first or time.perf_counter()
        await asyncio.sleep(0.002)
    arrivals: IO[str] | None = request.app[ARRIVALS]  # type: ignore[assignment]
    if arrivals is not None:
        key = prompt_key(body.get("prompt") if "prompt" in body else body.get("messages"))
        arrivals.write(f"{key} {arrived:.6f} {first:.6f}\n")
        arrivals.flush()
    if (body.get("stream_options") or {}).get("include_usage"):
        await resp.write(_event({"id": "f", "object": obj, "model": body.get("model"),
                                 "choices": [], "usage": usage}))
    await resp.write(b"data: [DONE]\n\n")
    await resp.write_eof()
    return resp


async def metrics(request: web.Request) -> web.Response:
    return web.Response(text=PAGE, content_type="text/plain")


async def ok(request: web.Request) -> web.Response:
    return web.Response(text="")


def build(ttft_s: float, log: IO[str] | None, arrivals: IO[str] | None = None
          ) -> web.Application:
    app = web.Application(middlewares=[access_log])
    app[TTFT], app[LOG], app[ARRIVALS] = ttft_s, log, arrivals
    app.router.add_post("/v1/completions", generate)
    app.router.add_post("/v1/chat/completions", generate)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/health", ok)
    app.router.add_post("/reset_prefix_cache", ok)
    return app


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--ttft-s", type=float, default=0.15)
    ap.add_argument("--log", default=None)
    ap.add_argument("--arrivals", default=None)
    a = ap.parse_args()
    log = open(a.log, "a") if a.log else None  # noqa: SIM115 (open for the server's life)
    arrivals = open(a.arrivals, "a") if a.arrivals else None  # noqa: SIM115 (likewise)
    web.run_app(build(a.ttft_s, log, arrivals), host="127.0.0.1", port=a.port,
                keepalive_timeout=5.0, print=None)


if __name__ == "__main__":
    main()
