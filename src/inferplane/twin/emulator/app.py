"""The OpenAI routes of one emulated endpoint, shaped like vLLM's OpenAI-compatible server.

``POST /v1/chat/completions`` and ``/v1/completions`` (stream or not; ``stream_options.
include_usage`` adds a final chunk with ``usage`` and empty ``choices``) and
``/v1/embeddings``, plus the request parsing the operational routes
(:mod:`inferplane.twin.emulator.ops`) share.

Tokenization is :func:`inferplane.tokenization.token_ids` (one whitespace word = one token). A
chat prompt is the message contents joined by newlines (no chat template), so a follow-up
turn that re-sends the answer extends the first turn's token sequence and hits the prefix
cache. A completions ``prompt`` may be text or token ids (one prompt per request).
Requests always generate ``max_tokens`` tokens (finish reason ``length``); the default is
:data:`DEFAULT_CHAT_MAX_TOKENS` for chat and :data:`DEFAULT_COMPLETION_MAX_TOKENS` (OpenAI's
and vLLM's 16) for completions, lowered to fit the context window. ``usage`` always carries
``prompt_tokens_details.cached_tokens``. Streams send one ``data: {...}`` event per token
(chat: a first ``role`` chunk), then ``data: [DONE]``. Embeddings are a deterministic unit
vector of :data:`EMBEDDING_DIM` floats hashed from the input tokens, timed as a prefill.
Errors use vLLM's shape ``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

import hashlib
import math
import struct
import time
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from aiohttp import web

from inferplane.config.schema import ServedModel
from inferplane.tokenization import token_ids
from inferplane.twin.emulator.endpoint import (
    FINISHED,
    EmulatedEndpoint,
    EmulatedRequestError,
    Submission,
    new_request_id,
)
from inferplane.twin.engine.model import output_word

DEFAULT_CHAT_MAX_TOKENS = 256
DEFAULT_COMPLETION_MAX_TOKENS = 16
EMBEDDING_DIM = 32
VLLM_VERSION = "0.11.0"

EMU: web.AppKey[EmulatedEndpoint] = web.AppKey("emulated_endpoint", EmulatedEndpoint)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def json_response(
    body: Any, status: int = 200, headers: dict[str, str] | None = None
) -> web.Response:
    return web.Response(
        body=orjson.dumps(body), status=status, headers=headers, content_type="application/json"
    )


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except EmulatedRequestError as exc:
        if request.app[EMU].endpoint.dialect == "anthropic":
            return json_response(exc.to_anthropic_body(), exc.status, exc.headers)
        return json_response(exc.to_body(), exc.status, exc.headers)


async def body_of(request: web.Request) -> dict[str, Any]:
    try:
        data = orjson.loads(await request.read())
    except orjson.JSONDecodeError as exc:
        raise EmulatedRequestError(400, f"Invalid JSON body: {exc}") from None
    if not isinstance(data, dict):
        raise EmulatedRequestError(400, "The request body must be a JSON object.")
    return data


def _is_ids(value: Any) -> bool:
    return (
        isinstance(value, list)
        and bool(value)
        and all(isinstance(t, int) and not isinstance(t, bool) for t in value)
    )


def _chat_text(body: dict[str, Any]) -> str:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise EmulatedRequestError(400, "`messages` must be a non-empty list.", param="messages")
    parts: list[str] = []
    for m in messages:
        content = m.get("content") if isinstance(m, dict) else None
        if isinstance(content, str):
            parts.append(content)
        elif isinstance(content, list):
            parts.extend(
                p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str)
            )
        elif content is not None:
            raise EmulatedRequestError(400, "Unsupported message content.", param="messages")
    return "\n".join(parts)


def _one_prompt(body: dict[str, Any]) -> Any:
    """A completions ``prompt``: text, token ids, or the one element of a list of them."""
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        return prompt[0]
    return prompt


def _prompt_ids(body: dict[str, Any]) -> list[int]:
    """Token ids of a completions ``prompt``: text, token ids, or a one-element list of them."""
    prompt = _one_prompt(body)
    if isinstance(prompt, str):
        return token_ids(prompt)
    if _is_ids(prompt):
        assert isinstance(prompt, list)
        return [int(t) for t in prompt]
    raise EmulatedRequestError(
        400,
        "`prompt` must be a string or a list of token ids (one prompt per request).",
        param="prompt",
    )


def request_ids(body: dict[str, Any], chat: bool) -> list[int]:
    return token_ids(_chat_text(body)) if chat else _prompt_ids(body)


def _prompt_too_long(limit: int, n_prompt: int, text: bool) -> EmulatedRequestError:
    """vLLM 0.32's 400 for a prompt longer than the context (``renderers/params.py``
    ``_token_len_check``; its tokenizer stops at ``limit + 1`` tokens of a text prompt, so the
    count is "at least" that)."""
    count = limit + 1 if text else n_prompt
    return EmulatedRequestError(
        400,
        f"This model's maximum context length is {limit} tokens. However, your prompt "
        f"contains {'at least ' if count == limit + 1 else ''}{count} input tokens, which "
        "exceeds this limit even without any output tokens. Please reduce the length of the "
        f"input prompt. (parameter=input_tokens, value={count})",
        param="input_tokens",
    )


def _max_tokens(
    body: dict[str, Any], chat: bool, n_prompt: int, model: ServedModel, text: bool = True
) -> int:
    """The tokens to generate, as vLLM 0.32 decides them: a prompt longer than the context is
    a 400 (``input_tokens``), a ``max_tokens`` (``max_completion_tokens``) above the context
    too; otherwise what is asked (the default where nothing is) is cut to the room the prompt
    leaves, and a prompt that leaves none is a 400 (``max_tokens must be at least 1``)."""
    limit = model.max_context
    if n_prompt > limit:
        raise _prompt_too_long(limit, n_prompt, text)
    param = "max_completion_tokens" if chat else "max_tokens"
    raw = body.get(param) if chat else None
    if raw is None:
        param, raw = "max_tokens", body.get("max_tokens")
    if raw is None:
        raw = DEFAULT_CHAT_MAX_TOKENS if chat else DEFAULT_COMPLETION_MAX_TOKENS
    elif not isinstance(raw, int) or isinstance(raw, bool):
        raise EmulatedRequestError(400, "`max_tokens` must be an integer >= 1.", param="max_tokens")
    elif raw < 1:
        raise _no_room(raw)
    elif raw > limit:
        raise EmulatedRequestError(
            400,
            f"{param}={raw} cannot be greater than max_model_len={limit}. Please request fewer "
            f"output tokens. (parameter={param}, value={raw})",
            param=param,
        )
    tokens = min(raw, limit - n_prompt)
    if tokens < 1:
        raise _no_room(tokens)
    return tokens


def _no_room(tokens: int) -> EmulatedRequestError:
    """vLLM 0.32's 400 for a ``max_tokens`` below 1, asked or left by the prompt."""
    return EmulatedRequestError(
        400, f"max_tokens must be at least 1, got {tokens}. (parameter=max_tokens, "
        f"value={tokens})", param="max_tokens",
    )


def generate_model(emu: EmulatedEndpoint, body: dict[str, Any]) -> ServedModel:
    model = body.get("model")
    served = emu.served(model if isinstance(model, str) else None)
    if served.kind != "generate":
        raise EmulatedRequestError(
            400, f"The model `{served.name}` does not support generation.", param="model"
        )
    return served


def _usage(sub: Submission, produced: int) -> dict[str, Any]:
    req = sub.request
    return {
        "prompt_tokens": req.prompt_len,
        "total_tokens": req.prompt_len + produced,
        "completion_tokens": produced,
        "prompt_tokens_details": {"cached_tokens": max(req.num_cached_tokens, 0)},
    }


def _piece(seed: int, i: int) -> str:
    word = output_word(seed, i)
    return word if i == 0 else " " + word


def _cache_salt(body: dict[str, Any]) -> str | None:
    """vLLM's ``cache_salt``: absent, or a non-empty string (else 400, as vLLM answers)."""
    salt = body.get("cache_salt")
    if salt is None:
        return None
    if not isinstance(salt, str) or not salt:
        raise EmulatedRequestError(400, "cache_salt must be a non-empty string", param="cache_salt")
    return salt


async def _generate(request: web.Request, chat: bool) -> web.StreamResponse:
    emu = request.app[EMU]
    arrived = emu.now()
    body = await body_of(request)
    served = generate_model(emu, body)
    prompt = request_ids(body, chat)
    max_tokens = _max_tokens(body, chat, len(prompt), served,
                             text=chat or not _is_ids(_one_prompt(body)))
    stream = bool(body.get("stream", False))
    opts = body.get("stream_options")
    include_usage = stream and isinstance(opts, dict) and bool(opts.get("include_usage"))
    emu.admit()
    reached = await emu.network_delay(arrived, take_round_trip=True)
    rid = new_request_id("chatcmpl" if chat else "cmpl")
    sub = emu.submit(rid, prompt, max_tokens, _cache_salt(body), at=reached)
    try:
        if stream:
            return await _stream(request, sub, served.upstream, chat, include_usage)
        produced = 0
        while (n := await sub.queue.get()) != FINISHED:
            produced += n
        if produced < max_tokens:
            raise EmulatedRequestError(503, "The engine stopped before the request finished.")
        seed = sub.request.seed
        text = "".join(_piece(seed, i) for i in range(produced))
        obj = "chat.completion" if chat else "text_completion"
        out: dict[str, Any] = {
            "id": rid,
            "object": obj,
            "created": int(time.time()),
            "model": served.upstream,
        }
        if chat:
            choice: dict[str, Any] = {
                "index": 0,
                "logprobs": None,
                "finish_reason": "length",
                "stop_reason": None,
                # As vLLM 0.32 sends it (tests/fidelity): "reasoning", not the older
                # "reasoning_content", and no empty "tool_calls".
                "message": {"role": "assistant", "content": text, "reasoning": None},
            }
        else:
            choice = {
                "index": 0,
                "text": text,
                "logprobs": None,
                "finish_reason": "length",
                "stop_reason": None,
                "prompt_logprobs": None,
            }
        out["choices"] = [choice]
        out["usage"] = _usage(sub, produced)
        return json_response(out)
    finally:
        emu.abort(rid)  # a no-op once finished; frees KV when the client went away


async def _stream(
    request: web.Request, sub: Submission, model: str, chat: bool, include_usage: bool
) -> web.StreamResponse:
    resp = web.StreamResponse(
        headers={"Content-Type": "text/event-stream; charset=utf-8", "Cache-Control": "no-cache"}
    )
    await resp.prepare(request)
    req = sub.request
    head = {
        "id": req.request_id,
        "object": "chat.completion.chunk" if chat else "text_completion",
        "created": int(time.time()),
        "model": model,
    }
    produced = 0
    while (n := await sub.queue.get()) != FINISHED:
        frames: list[bytes] = []
        for i in range(produced, produced + n):
            last = i + 1 >= req.max_tokens
            finish = "length" if last else None
            if chat:
                if i == 0:
                    role = {
                        "index": 0,
                        "delta": {"role": "assistant", "content": ""},
                        "logprobs": None,
                        "finish_reason": None,
                    }
                    frames.append(orjson.dumps({**head, "choices": [role]}))
                choice: dict[str, Any] = {
                    "index": 0,
                    "delta": {"content": _piece(req.seed, i)},
                    "logprobs": None,
                    "finish_reason": finish,
                }
            else:
                choice = {
                    "index": 0,
                    "text": _piece(req.seed, i),
                    "logprobs": None,
                    "finish_reason": finish,
                    "stop_reason": None,
                }
            if last:
                choice["stop_reason"] = None
            frames.append(orjson.dumps({**head, "choices": [choice]}))
        produced += n
        await resp.write(b"".join(b"data: " + f + b"\n\n" for f in frames))
    if include_usage:
        final: dict[str, Any] = {**head, "choices": [], "usage": _usage(sub, produced)}
        await resp.write(b"data: " + orjson.dumps(final) + b"\n\n")
    await resp.write(b"data: [DONE]\n\n")
    await resp.write_eof()
    return resp


async def chat_completions(request: web.Request) -> web.StreamResponse:
    return await _generate(request, chat=True)


async def completions(request: web.Request) -> web.StreamResponse:
    return await _generate(request, chat=False)


def _embedding(ids: list[int]) -> list[float]:
    digest = hashlib.blake2b(struct.pack(f"<{len(ids)}q", *ids), digest_size=EMBEDDING_DIM * 2)
    raw = [v / 32768.0 - 1.0 for v in struct.unpack(f"<{EMBEDDING_DIM}H", digest.digest())]
    norm = math.sqrt(sum(v * v for v in raw)) or 1.0
    return [v / norm for v in raw]


async def embeddings(request: web.Request) -> web.StreamResponse:
    emu = request.app[EMU]
    arrived = emu.now()
    body = await body_of(request)
    model = body.get("model")
    served = emu.served(model if isinstance(model, str) else None)
    if served.kind != "embed":
        raise EmulatedRequestError(
            400, f"The model `{served.name}` does not support the Embeddings API.", param="model"
        )
    raw = body.get("input")
    items: Any = [raw] if isinstance(raw, str) or _is_ids(raw) else raw
    if not isinstance(items, list) or not items:
        raise EmulatedRequestError(
            400, "`input` must be text, token ids or a list of them.", param="input"
        )
    inputs: list[list[int]] = []
    for item in items:
        ids = token_ids(item) if isinstance(item, str) else list(item) if _is_ids(item) else []
        if not ids:
            raise EmulatedRequestError(
                400, "Every input must be non-empty text or token ids.", param="input"
            )
        if len(ids) > served.max_context:  # vLLM 0.32 checks an embedding's input as a prompt
            raise _prompt_too_long(served.max_context, len(ids), isinstance(item, str))
        inputs.append(ids)
    emu.admit()
    at: float | None = await emu.network_delay(arrived, take_round_trip=True)
    rids = [new_request_id("embd") for _ in inputs]
    try:
        for rid, ids in zip(rids, inputs, strict=True):
            # a prefill: the engine times it and batches it. Only the first counts from when
            # the request reached the engine; the rest arrive after the one before finished
            sub = emu.submit(rid, ids, 1, at=at)
            at = None
            while await sub.queue.get() != FINISHED:
                pass
    finally:
        for rid in rids:
            emu.abort(rid)
    total = sum(len(i) for i in inputs)
    data: list[dict[str, Any]] = [
        {"index": i, "object": "embedding", "embedding": _embedding(ids)}
        for i, ids in enumerate(inputs)
    ]
    return json_response(
        {
            "id": rids[0],
            "object": "list",
            "created": int(time.time()),
            "model": served.name,
            "data": data,
            "usage": {
                "prompt_tokens": total,
                "total_tokens": total,
                "completion_tokens": 0,
                "prompt_tokens_details": None,
            },
        }
    )
