"""A small purpose-built OpenAI-compatible upstream for gateway tests, with fault injection.

Run as a process: ``python -m tests.support.fake_upstream --port N [--port M ...] --mode M``.
Modes: ``ok`` (answers, streams 5 chunks 1 ms apart), ``fast`` (the same with no pauses: for
overhead benchmarks), ``fail500`` (HTTP 500 before any byte), ``cut`` (streams two chunks then
drops the connection), ``slow`` (chunks 200 ms apart, for disconnect tests), ``hang`` (reads the
request and never answers while ``/health`` stays green: a hung engine), ``stall`` (in-process
only: blocks the whole event loop for `STALL_S` before answering, as if the host descheduled the
gateway sharing that loop, then answers like ``ok``), ``provider`` (answers like ``ok`` with the
headers a hosted provider adds, `PROVIDER_HEADERS`: a cookie, account ids, rate-limit state;
and, as a CDN-fronted provider does, gzips the answer when the request accepts gzip),
``error-event`` and ``error-event-400`` (stream two chunks, then vLLM's mid-stream error event,
`ERROR_EVENTS`: the engine's own fault, or the request's ``BadRequestError``, then ``[DONE]``),
``nodone`` (streams the chunks, no finish reason and no ``[DONE]``, and ends cleanly),
``bad-json`` (streams two chunks, then an event that is not JSON, then ``[DONE]``), ``gzip``
(answers like ``ok``, gzipped whatever the request accepts: a CDN that ignores
``Accept-Encoding: identity``), ``limited`` (HTTP 429 with ``Retry-After: 7`` and an error
body that quotes the key it was sent, as a careless proxy does; ``limited-date``: the
``Retry-After`` an HTTP date 30 s ahead; ``limited-inf``: ``1e999``), ``echo500`` (HTTP 500 whose
body quotes the key), ``echo-event`` (streams two chunks, then an error event that quotes the
key, then ``[DONE]``).
It counts requests and cancellations and reports them on ``GET /stats`` (with the last request's
headers, ``last_headers``); ``/metrics`` serves a
fixed vLLM-style exposition with ``waiting`` read from ``--waiting``.
"""

from __future__ import annotations

import argparse
import asyncio
import email.utils
import json
import time
from collections.abc import Awaitable, Callable

from aiohttp import web

STATS = {"requests": 0, "cancelled": 0, "completed": 0}
STALL_S = 0.6
MODE, NAME = web.AppKey("mode", str), web.AppKey("name", str)
WAITING = web.AppKey("waiting", float)


PROVIDER_HEADERS = {
    "Set-Cookie": "__cf_bm=abc123; path=/; HttpOnly",
    "openai-organization": "org-shared-account",
    "x-ratelimit-remaining-requests": "9321",
    "anthropic-ratelimit-requests-remaining": "49",
    "cf-ray": "8f1c2d3e4a5b6c7d-FRA",
    "x-inferplane-endpoint": "forged",
    "x-inferplane-receipt": "forged",
    "x-request-id": "req_provider_123",
}


ERROR_EVENTS = {
    "error-event": {"error": {
        "message": "CUDA error: an illegal memory access was encountered",
        "type": "InternalServerError", "param": None, "code": 500}},
    "error-event-400": {"error": {
        "message": "The decoder prompt cannot be empty", "type": "BadRequestError",
        "param": None, "code": 400}},
}
"""What vLLM 0.32 sends as a stream's last event on a failure (``create_streaming_error_response``),
by mode."""


def _chunk(obj: dict[str, object]) -> bytes:
    return b"data: " + json.dumps(obj).encode() + b"\n\n"


async def completions(request: web.Request) -> web.StreamResponse:
    mode: str = request.app[MODE]
    STATS["requests"] += 1
    STATS["last_headers"] = dict(request.headers)
    body = await request.json()
    STATS["last_max_tokens"] = body.get("max_tokens", body.get("max_completion_tokens", -1))
    if mode == "fail500":
        return web.json_response({"error": {"message": "boom", "type": "server_error"}}, status=500)
    key = request.headers.get("Authorization", "").removeprefix("Bearer ")
    if mode.startswith("limited"):
        retry = {"limited": "7", "limited-inf": "1e999",
                 "limited-date": email.utils.formatdate(time.time() + 30, usegmt=True)}[mode]
        return web.json_response({"error": {"message": f"Rate limit reached for key {key}",
                                            "type": "requests", "code": "rate_limit_exceeded"}},
                                 status=429, headers={"Retry-After": retry})
    if mode == "echo500":
        return web.json_response({"error": {"message": f"proxy: upstream refused {key}",
                                            "type": "server_error"}}, status=500)
    if mode == "stall":
        time.sleep(STALL_S)  # blocking on purpose: nothing in this process runs meanwhile
    extra = PROVIDER_HEADERS if mode == "provider" else None
    if mode == "hang":
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            STATS["cancelled"] += 1
            raise
    chat = request.path.endswith("chat/completions")
    name = request.app[NAME]
    usage = {"prompt_tokens": 7, "completion_tokens": 5, "total_tokens": 12,
             "prompt_tokens_details": {"cached_tokens": 0}}
    if request.path.endswith("embeddings"):
        return web.json_response({"object": "list", "model": body["model"], "usage": usage,
                                  "data": [{"object": "embedding", "index": 0,
                                            "embedding": [0.1, 0.2]}]})
    words = [f"{name}-w{i}" for i in range(5)]
    if mode == "slowjson":  # like slow, and a non-streamed answer takes 1 s (clients give up)
        mode = "slow"
        if not body.get("stream"):
            await asyncio.sleep(1.0)
    gzip = mode == "gzip" or (
        mode == "provider" and "gzip" in request.headers.get("Accept-Encoding", ""))
    if not body.get("stream"):
        text = " ".join(words)
        choice = ({"index": 0, "message": {"role": "assistant", "content": text},
                   "finish_reason": "length"} if chat else
                  {"index": 0, "text": text, "finish_reason": "length"})
        answer = web.json_response({"id": "x", "object": "chat.completion" if chat else
                                    "text_completion", "created": int(time.time()),
                                    "model": body["model"], "choices": [choice],
                                    "usage": usage},
                                   headers=extra)
        if gzip:
            answer.enable_compression(web.ContentCoding.gzip)
        return answer
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", **(extra or {})})
    if gzip:
        resp.enable_compression(web.ContentCoding.gzip)
    await resp.prepare(request)
    try:
        for i, w in enumerate(words):
            if mode == "cut" and i == 2:
                assert request.transport is not None
                request.transport.close()
                return resp
            if mode == "bad-json" and i == 2:
                await resp.write(b"data: {\"choices\": [\n\ndata: [DONE]\n\n")
                await resp.write_eof()
                return resp
            if mode == "echo-event" and i == 2:
                event = {"error": {"message": f"quota exceeded for key {key}",
                                   "type": "InternalServerError", "param": None, "code": 500}}
                await resp.write(_chunk(event) + b"data: [DONE]\n\n")
                await resp.write_eof()
                return resp
            if mode in ERROR_EVENTS and i == 2:
                await resp.write(_chunk(ERROR_EVENTS[mode]) + b"data: [DONE]\n\n")
                await resp.write_eof()
                return resp
            delta = {"delta": {"content": w + " "}} if chat else {"text": w + " "}
            await resp.write(_chunk({"id": "x", "object": "chat.completion.chunk" if chat else
                                     "text_completion", "model": body["model"],
                                     "choices": [{"index": 0, **delta, "finish_reason": None}]}))
            if mode != "fast":
                await asyncio.sleep(0.2 if mode == "slow" else 0.001)
        if (body.get("stream_options") or {}).get("include_usage"):
            await resp.write(_chunk({"id": "x", "object": "chat.completion.chunk",
                                     "model": body["model"], "choices": [], "usage": usage}))
        if mode != "nodone":
            await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        STATS["completed"] += 1
    except (asyncio.CancelledError, ConnectionResetError):
        STATS["cancelled"] += 1
        raise
    return resp


async def metrics(request: web.Request) -> web.Response:
    w = request.app[WAITING]
    text = (
        "# TYPE vllm:num_requests_running gauge\n"
        f'vllm:num_requests_running{{engine="0",model_name="m"}} 1.0\n'
        "# TYPE vllm:num_requests_waiting gauge\n"
        f'vllm:num_requests_waiting{{engine="0",model_name="m"}} {w}\n'
        "# TYPE vllm:kv_cache_usage_perc gauge\n"
        'vllm:kv_cache_usage_perc{engine="0",model_name="m"} 0.25\n'
        "# TYPE vllm:cache_config_info gauge\n"
        'vllm:cache_config_info{block_size="16",engine="0",num_gpu_blocks="1000"} 1.0\n'
    )
    return web.Response(text=text, content_type="text/plain")


async def health(request: web.Request) -> web.Response:
    return web.Response(text="")


async def stats(request: web.Request) -> web.Response:
    return web.json_response(STATS)


def build(name: str, mode: str, waiting: float) -> web.Application:
    app = web.Application()
    app[MODE], app[NAME], app[WAITING] = mode, name, waiting
    for path in ("/v1/chat/completions", "/v1/completions", "/v1/embeddings"):
        app.router.add_post(path, completions)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/health", health)
    app.router.add_get("/stats", stats)
    return app


def chat_app(reply: Callable[[str], Awaitable[str]]) -> web.Application:
    """An in-process upstream that answers ``/v1/chat/completions`` with one plain (not
    streamed) completion whose content is ``await reply(last message's content)``, 3 prompt and
    2 completion tokens; ``/health`` and ``/metrics`` answer 200 with nothing."""

    async def chat(request: web.Request) -> web.Response:
        body = await request.json()
        content = await reply(body["messages"][-1]["content"])
        return web.json_response({
            "id": "x", "object": "chat.completion", "model": body["model"],
            "choices": [{"index": 0, "finish_reason": "stop",
                         "message": {"role": "assistant", "content": content}}],
            "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5},
        })

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_get("/health", health)
    app.router.add_get("/metrics", health)
    return app


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, action="append", required=True)
    ap.add_argument("--mode", default="ok")
    ap.add_argument("--name", default="up")
    ap.add_argument("--waiting", type=float, default=0.0)
    a = ap.parse_args()
    asyncio.run(_serve(build(a.name, a.mode, a.waiting), a.port))


async def _serve(app: web.Application, ports: list[int]) -> None:
    runner = web.AppRunner(app, handler_cancellation=True)
    await runner.setup()
    for port in ports:
        await web.TCPSite(runner, "127.0.0.1", port).start()
    await asyncio.Event().wait()


if __name__ == "__main__":
    main()
