"""Provider-style routes of an emulated endpoint: the upstream key check, and the Anthropic
Messages API (``POST /v1/messages``) for ``dialect: anthropic`` endpoints.

The key check (`key_middleware`) applies to the API routes (not ``/health`` or ``/metrics``)
when the endpoint has an upstream key: ``Authorization: Bearer KEY`` for the OpenAI dialect,
``x-api-key: KEY`` plus an ``anthropic-version`` header for Anthropic; otherwise 401.

Messages requests (`messages`) are tokenized like chat (one word a token) from the ``system``
text and every message's text, tool-use input and tool-result text, run on the same engine, and
answered as Anthropic does: a ``message`` object (one ``text`` block, ``stop_reason``
``max_tokens`` since the engine always generates ``max_tokens`` tokens, usage with
``cache_read_input_tokens`` = the prefix-cache hits and ``input_tokens`` = the rest), or with
``stream: true`` the event sequence ``message_start``, ``content_block_start``, ``ping``,
``content_block_delta`` per step, ``content_block_stop``, ``message_delta``, ``message_stop``.
When ``tool_choice`` requires a tool (``any``, or ``tool`` naming one of ``tools``), the
generated words become that tool's call instead of text: one ``tool_use`` block whose ``input``
is ``{"text": "<the words>"}`` (streamed as ``input_json_delta`` pieces), ``stop_reason``
``tool_use``. Errors use Anthropic's shape ``{"type": "error", "error": {"type", "message"}}``.
"""

from __future__ import annotations

from typing import Any

import orjson
from aiohttp import web

from inferplane.tokenization import token_ids
from inferplane.twin.emulator.app import (
    EMU,
    Handler,
    _piece,
    body_of,
    generate_model,
)
from inferplane.twin.emulator.endpoint import (
    FINISHED,
    EmulatedEndpoint,
    EmulatedRequestError,
    Submission,
    new_request_id,
)

#: paths that are not the provider API: no key needed
_OPERATIONAL = frozenset({"/health", "/metrics", "/metrics/", "/version"})
_UNDER_BASE = frozenset({"/health", "/metrics", "/metrics/"})  # also under `ops_prefix`

OPS_PREFIX: web.AppKey[str] = web.AppKey("ops_prefix", str)


def ops_prefix(emu: EmulatedEndpoint) -> str:
    """Where ``/health`` and ``/metrics`` also answer (`ops.build_app`): the endpoint URL's base
    path without a trailing ``/v1``, as a path-prefix proxy in front of an engine serves them
    (``/openai/*`` → ``/*``: the API at ``/openai/v1/…``, the health at ``/openai/health``).
    So a URL ending in ``/v1`` (``http://host:8000/v1``, whose probe the gateway sends to
    ``…/v1/health``) gets the real engine's 404 there."""
    return emu.endpoint.spec.base_path.removesuffix("/v1")


def _keyless(request: web.Request) -> bool:
    """Whether the path is operational: no key (also ``/health`` and ``/metrics`` under
    `ops_prefix`, where `ops.build_app` registers them)."""
    path = request.path
    if path in _OPERATIONAL:
        return True
    prefix = request.app[OPS_PREFIX]
    return bool(prefix) and path.startswith(prefix) and path[len(prefix):] in _UNDER_BASE


@web.middleware
async def key_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    emu = request.app[EMU]
    if emu.api_key is not None and not _keyless(request):
        if emu.endpoint.dialect == "anthropic":
            ok = request.headers.get("x-api-key") == emu.api_key
            if ok and not request.headers.get("anthropic-version"):
                raise EmulatedRequestError(400, "anthropic-version: header is required")
        else:
            ok = request.headers.get("Authorization") == f"Bearer {emu.api_key}"
        if not ok:
            raise EmulatedRequestError(401, "invalid x-api-key" if emu.endpoint.dialect ==
                                       "anthropic" else "Incorrect API key provided.")
    return await handler(request)


def _text(content: Any) -> list[str]:
    if isinstance(content, str):
        return [content]
    if not isinstance(content, list):
        raise EmulatedRequestError(400, "messages: content must be a string or a list of blocks")
    out: list[str] = []
    for block in content:
        if not isinstance(block, dict):
            continue
        kind = block.get("type")
        if kind == "text":
            out.append(str(block.get("text", "")))
        elif kind == "tool_use":
            out.append(orjson.dumps(block.get("input") or {}).decode())
        elif kind == "tool_result":
            out.extend(_text(block.get("content") or ""))
    return out


def _prompt(body: dict[str, Any]) -> list[int]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise EmulatedRequestError(400, "messages: Field required")
    parts = _text(body.get("system") or "")
    for m in messages:
        if not isinstance(m, dict) or m.get("role") not in ("user", "assistant"):
            raise EmulatedRequestError(400, "messages: each message needs role user or assistant")
        parts.extend(_text(m.get("content")))
    return token_ids("\n".join(p for p in parts if p))


def _usage(sub: Submission, produced: int) -> dict[str, int]:
    cached = max(sub.request.num_cached_tokens, 0)
    return {
        "input_tokens": sub.request.prompt_len - cached,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": cached,
        "output_tokens": produced,
    }


def _event(kind: str, obj: dict[str, Any]) -> bytes:
    return b"event: " + kind.encode() + b"\ndata: " + orjson.dumps({"type": kind, **obj}) + b"\n\n"


async def messages(request: web.Request) -> web.StreamResponse:
    emu = request.app[EMU]
    arrived = emu.now()
    body = await body_of(request)
    if not isinstance(body.get("model"), str):
        raise EmulatedRequestError(400, "model: Field required")
    served = generate_model(emu, body)
    max_tokens = body.get("max_tokens")
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
        raise EmulatedRequestError(400, "max_tokens: Field required (an integer >= 1)")
    prompt = _prompt(body)
    if len(prompt) + max_tokens > served.max_context:
        raise EmulatedRequestError(
            400, f"prompt is too long: {len(prompt)} tokens + {max_tokens} > "
            f"{served.max_context} maximum"
        )
    tool = _forced_tool(body)
    emu.admit()
    reached = await emu.network_delay(arrived, take_round_trip=True)
    rid = new_request_id("msg")
    sub = emu.submit(rid, prompt, max_tokens, at=reached)
    head = {"id": rid, "type": "message", "role": "assistant", "model": served.upstream}
    try:
        if body.get("stream"):
            return await _stream(request, sub, head, tool)
        produced = 0
        while (n := await sub.queue.get()) != FINISHED:
            produced += n
        if produced < max_tokens:
            raise EmulatedRequestError(529, "Overloaded")
        text = "".join(_piece(sub.request.seed, i) for i in range(produced))
        block: dict[str, Any] = {"type": "text", "text": text}
        if tool is not None:
            block = {"type": "tool_use", "id": "toolu_" + rid, "name": tool,
                     "input": {"text": text}}
        answer = {
            **head,
            "content": [block],
            "stop_reason": "max_tokens" if tool is None else "tool_use",
            "stop_sequence": None,
            "usage": _usage(sub, produced),
        }
        return web.Response(body=orjson.dumps(answer), content_type="application/json")
    finally:
        emu.abort(rid)


def _forced_tool(body: dict[str, Any]) -> str | None:
    """The tool a request's ``tool_choice`` forces (``any``: the first tool), else None."""
    tools = body.get("tools")
    choice = body.get("tool_choice")
    if not isinstance(tools, list) or not tools or not isinstance(choice, dict):
        return None
    names = [t.get("name") for t in tools if isinstance(t, dict)]
    if choice.get("type") == "any" and isinstance(names[0], str):
        return names[0]
    if choice.get("type") == "tool":
        if choice.get("name") not in names:
            raise EmulatedRequestError(400, "tool_choice: the named tool is not in tools")
        return str(choice["name"])
    return None


async def _stream(
    request: web.Request, sub: Submission, head: dict[str, Any], tool: str | None
) -> web.StreamResponse:
    resp = web.StreamResponse(
        headers={"Content-Type": "text/event-stream; charset=utf-8", "Cache-Control": "no-cache"}
    )
    await resp.prepare(request)
    seed = sub.request.seed
    produced = 0
    while (n := await sub.queue.get()) != FINISHED:
        out = bytearray()
        if produced == 0:
            start = {**head, "content": [], "stop_reason": None, "stop_sequence": None,
                     "usage": _usage(sub, 0)}
            out += _event("message_start", {"message": start})
            first: dict[str, Any] = {"type": "text", "text": ""}
            if tool is not None:
                first = {"type": "tool_use", "id": "toolu_" + str(head["id"]), "name": tool,
                         "input": {}}
            out += _event("content_block_start", {"index": 0, "content_block": first})
            out += _event("ping", {})
        pieces = "".join(_piece(seed, i) for i in range(produced, produced + n))
        if tool is None:
            out += _event("content_block_delta",
                          {"index": 0, "delta": {"type": "text_delta", "text": pieces}})
        else:  # the JSON {"text": "..."} in pieces: the opening with the first words
            part = orjson.dumps(pieces).decode()[1:-1]
            if produced == 0:
                part = '{"text": "' + part
            out += _event("content_block_delta",
                          {"index": 0, "delta": {"type": "input_json_delta",
                                                 "partial_json": part}})
        produced += n
        await resp.write(bytes(out))
    if produced < sub.request.max_tokens:
        await resp.write(_event("error", {"error": {"type": "overloaded_error",
                                                    "message": "Overloaded"}}))
        await resp.write_eof()
        return resp
    tail = b""
    if tool is not None:
        tail += _event("content_block_delta", {"index": 0, "delta": {
            "type": "input_json_delta", "partial_json": '"}'}})
    tail += _event("content_block_stop", {"index": 0})
    reason = "max_tokens" if tool is None else "tool_use"
    tail += _event("message_delta", {"delta": {"stop_reason": reason, "stop_sequence": None},
                                     "usage": {"output_tokens": produced}})
    tail += _event("message_stop", {})
    await resp.write(tail)
    await resp.write_eof()
    return resp
