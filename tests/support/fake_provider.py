"""A hosted-provider stand-in for gateway tests: an API under a base path, an API key, no
``/health`` (404), and both dialects (OpenAI chat completions, Anthropic Messages), with faults.

``build_provider(...)`` returns an aiohttp app; ``app[SEEN]`` lists what each request carried
(path, headers, JSON body). Modes: ``ok``; ``429`` (every request: HTTP 429 with
``Retry-After``); ``garbage`` (HTTP 200, not JSON); ``odd_error`` (HTTP 400 in no known error
shape); ``bad_request`` (HTTP 400 in the dialect's own error shape); ``stream_error`` (an
Anthropic stream that sends an ``error`` event after its first text); ``500``; and, quoting
the credentials the request carried (a proxy's debug message): ``echo_key`` (HTTP 400 in the
dialect's error shape), ``echo_key_500`` (HTTP 500 in it), ``echo_key_odd`` (HTTP 400 in no
known shape), ``echo_key_stream`` (an OpenAI stream whose error event, after its first text,
quotes them) and ``echo_key_notjson`` (an OpenAI stream whose event after its first text is
not JSON and ends in them).
"""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

SEEN: web.AppKey[list[dict[str, Any]]] = web.AppKey("seen", list)
MODE_KEY: web.AppKey[str] = web.AppKey("mode", str)


def _sse(event: str | None, obj: dict[str, Any]) -> bytes:
    head = f"event: {event}\n" if event else ""
    return (head + "data: " + json.dumps(obj) + "\n\n").encode()


def build_provider(
    *,
    base: str = "/openai/v1",
    key: str = "sk-upstream",
    dialect: str = "openai",
    mode: str = "ok",
    retry_after: str | None = "7",
    name: str = "prov",
) -> web.Application:
    app = web.Application()
    app[SEEN] = []
    app[MODE_KEY] = mode

    def auth_ok(request: web.Request) -> bool:
        if dialect == "anthropic":
            return (
                request.headers.get("x-api-key") == key
                and request.headers.get("anthropic-version") == "2023-06-01"
            )
        return request.headers.get("Authorization") == f"Bearer {key}"

    def error(status: int, kind: str, message: str) -> web.Response:
        if dialect == "anthropic":
            body: dict[str, Any] = {"type": "error", "error": {"type": kind, "message": message}}
        else:
            body = {"error": {"message": message, "type": kind, "param": None, "code": None}}
        return web.json_response(body, status=status)

    async def models(request: web.Request) -> web.Response:
        if not auth_ok(request):
            return error(401, "authentication_error", "invalid x-api-key")
        return web.json_response({"object": "list", "data": [{"id": "up-model"}]})

    async def generate(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        app[SEEN].append({"path": request.path, "headers": dict(request.headers), "body": body})
        if not auth_ok(request):
            return error(401, "authentication_error", "invalid api key")
        if mode == "429":
            headers = {"Retry-After": retry_after} if retry_after is not None else {}
            resp = error(429, "rate_limit_error", "slow down")
            resp.headers.update(headers)
            return resp
        if mode == "500":
            return error(500, "api_error", "internal")
        if mode == "garbage":
            return web.Response(text="<html>bad gateway</html>", status=200)
        if mode == "odd_error":
            return web.json_response({"oops": True, "why": "nobody knows"}, status=400)
        if mode == "bad_request":
            return error(400, "invalid_request_error", "messages: field required")
        sent = request.headers.get("x-api-key") or request.headers.get("Authorization", "")
        if mode == "echo_key":
            return error(400, "invalid_request_error", f"invalid request; auth was {sent}")
        if mode == "echo_key_500":
            return error(500, "api_error", f"internal; auth was {sent}")
        if mode == "echo_key_odd":
            return web.json_response({"oops": f"auth was {sent}"}, status=400)
        if mode == "echo_key_stream":
            resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await resp.prepare(request)
            await resp.write(_sse(None, {"id": "c", "object": "chat.completion.chunk",
                                         "created": 1, "model": body["model"], "choices": [
                                             {"index": 0, "delta": {"content": "hi "},
                                              "finish_reason": None}]}))
            await resp.write(_sse(None, {"error": {"message": f"engine died; auth was {sent}",
                                                   "type": "internal_error"}}))
            return resp
        if mode == "echo_key_notjson":  # an event that is not JSON, quoting them at its end
            resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await resp.prepare(request)
            await resp.write(_sse(None, {"id": "c", "object": "chat.completion.chunk",
                                         "created": 1, "model": body["model"], "choices": [
                                             {"index": 0, "delta": {"content": "hi "},
                                              "finish_reason": None}]}))
            # 121 bytes: the gateway quotes the first 120, so its quote ends in all the key
            # but its last character
            pad = "x" * (120 - len("{oops ") - len(sent) + 1)
            await resp.write(f"data: {{oops {pad}{sent}\n\n".encode())
            return resp
        if dialect == "anthropic":
            return await _anthropic(request, body, name)
        return await _openai(request, body, name)

    app.router.add_get(f"{base}/models", models)
    path = "/messages" if dialect == "anthropic" else "/chat/completions"
    app.router.add_post(f"{base}{path}", generate)
    return app


async def _openai(request: web.Request, body: dict[str, Any], name: str) -> web.StreamResponse:
    usage = {"prompt_tokens": 10, "completion_tokens": 3, "total_tokens": 13,
             "prompt_tokens_details": {"cached_tokens": 4}}
    if not body.get("stream"):
        return web.json_response({
            "id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": body["model"],
            "choices": [{"index": 0, "message": {"role": "assistant", "content": f"{name} says hi"},
                         "finish_reason": "stop"}],
            "usage": usage,
        })
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await resp.prepare(request)
    for word in (name, "says", "hi"):
        await resp.write(_sse(None, {"id": "c", "object": "chat.completion.chunk", "created": 1,
                                     "model": body["model"], "choices": [
                                         {"index": 0, "delta": {"content": word + " "},
                                          "finish_reason": None}]}))
    await resp.write(_sse(None, {"id": "c", "object": "chat.completion.chunk", "created": 1,
                                 "model": body["model"], "choices": [], "usage": usage}))
    await resp.write(b"data: [DONE]\n\n")
    return resp


ANTHROPIC_USAGE = {"input_tokens": 6, "output_tokens": 3, "cache_read_input_tokens": 4,
                   "cache_creation_input_tokens": 0}


async def _anthropic(request: web.Request, body: dict[str, Any], name: str) -> web.StreamResponse:
    tools = body.get("tools") or []
    text = f"{name} says hi"
    mode = request.app[MODE_KEY]
    if not body.get("stream"):
        content: list[dict[str, Any]] = [{"type": "text", "text": text}]
        stop = "end_turn"
        if tools:
            content.append({"type": "tool_use", "id": "toolu_1", "name": tools[0]["name"],
                            "input": {"city": "Paris"}})
            stop = "tool_use"
        answer: dict[str, Any] = {
            "id": "msg_1", "type": "message", "role": "assistant", "model": body["model"],
            "content": content, "stop_reason": stop, "stop_sequence": None,
            "usage": ANTHROPIC_USAGE,
        }
        if mode == "bad_usage":  # counts that are not numbers
            answer["usage"] = {"input_tokens": "abc", "output_tokens": 1}
        if mode == "no_usage":
            del answer["usage"]
        return web.json_response(answer)
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await resp.prepare(request)
    w = resp.write
    await w(_sse("message_start", {"type": "message_start", "message": {
        "id": "msg_1", "type": "message", "role": "assistant", "model": body["model"],
        "content": [], "stop_reason": None, "stop_sequence": None,
        **({} if mode == "no_usage" else {"usage": {
            "input_tokens": 6, "output_tokens": 1, "cache_read_input_tokens": 4,
            "cache_creation_input_tokens": 0}})}}))
    await w(_sse("content_block_start", {"type": "content_block_start", "index": 0,
                                         "content_block": {"type": "text", "text": ""}}))
    await w(_sse("ping", {"type": "ping"}))
    for i, word in enumerate(text.split()):
        chunk = _sse("content_block_delta", {"type": "content_block_delta", "index": 0,
                                             "delta": {"type": "text_delta",
                                                       "text": word if i == 0 else " " + word}})
        # split one event across two writes: the translator must reassemble it
        await w(chunk[:10])
        await w(chunk[10:])
        if i == 0 and mode == "stream_error":
            await w(_sse("error", {"type": "error", "error": {"type": "overloaded_error",
                                                              "message": "Overloaded"}}))
            return resp
    await w(_sse("content_block_stop", {"type": "content_block_stop", "index": 0}))
    stop = "end_turn"
    if tools:
        await w(_sse("content_block_start", {"type": "content_block_start", "index": 1,
                                             "content_block": {"type": "tool_use", "id": "toolu_1",
                                                               "name": tools[0]["name"],
                                                               "input": {}}}))
        for part in ('{"city": ', '"Paris"}'):
            await w(_sse("content_block_delta", {"type": "content_block_delta", "index": 1,
                                                 "delta": {"type": "input_json_delta",
                                                           "partial_json": part}}))
        await w(_sse("content_block_stop", {"type": "content_block_stop", "index": 1}))
        stop = "tool_use"
    delta: dict[str, Any] = {"type": "message_delta",
                             "delta": {"stop_reason": stop, "stop_sequence": None},
                             "usage": {"output_tokens": "x" if mode == "bad_usage" else 3}}
    if mode == "no_usage":
        del delta["usage"]
    await w(_sse("message_delta", delta))
    await w(_sse("message_stop", {"type": "message_stop"}))
    return resp

