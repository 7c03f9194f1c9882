"""The Anthropic Messages dialect: OpenAI chat completions translated to and from ``POST
/v1/messages`` (https://docs.anthropic.com/en/api/messages and .../messages-streaming).

Requests (`to_messages_request`): ``system``/``developer`` messages become the top-level
``system``; ``user`` and ``assistant`` messages become content blocks (text, images from data or
http URLs, an assistant's ``tool_calls`` as ``tool_use`` blocks); ``tool`` messages become
``tool_result`` blocks in a user turn; consecutive turns of one role are merged. ``max_tokens``
(or ``max_completion_tokens``, else the gateway's default) is required by Messages; ``stop`` →
``stop_sequences``; ``temperature`` is clamped to Anthropic's [0, 1]; ``tools`` →
``{name, description, input_schema}``; ``tool_choice`` auto/required/none/a function →
``auto``/``any``/``none``/``tool``; ``parallel_tool_calls: false`` → ``disable_parallel_tool_use``;
``user`` → ``metadata.user_id``. ``n > 1``, ``logprobs`` and a structured ``response_format``
have no Messages equivalent and are refused with a 400 naming the field.

Answers (`to_chat_completion`): text blocks joined into ``message.content``, ``tool_use``
blocks as ``tool_calls`` (arguments as a JSON string), ``stop_reason`` mapped by `FINISH`, and
usage with ``prompt_tokens = input + cache read + cache creation`` and
``prompt_tokens_details.cached_tokens`` = the cache-read tokens.

Streams (`StreamTranslator`): ``message_start`` → the role chunk; ``content_block_start`` of a
tool → a ``tool_calls`` chunk with id and name; ``text_delta`` / ``input_json_delta`` → content
or arguments chunks; ``message_delta`` → the chunk with ``finish_reason``; ``message_stop`` →
the usage chunk (when asked) and ``data: [DONE]``; ``ping``, ``content_block_stop``, thinking
deltas and event types the API may add later are dropped; an ``error`` event ends the stream
with `MessagesStreamError`, and data that is not a JSON event with `MessagesFormatError`.

Errors (`to_openai_error`): ``{"type": "error", "error": {"type", "message"}}`` → OpenAI's
``{"error": {"message", "type", "param", "code"}}``; anything else is `MessagesFormatError`
(the dispatcher answers 502 naming the endpoint).
"""

from __future__ import annotations

import time
from typing import Any

import orjson

from inferplane.errors import InvalidRequestError
from inferplane.types import JSONObject

FINISH: dict[str, str] = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "max_tokens": "length",
    "tool_use": "tool_calls",
    "pause_turn": "stop",
    "refusal": "content_filter",
}

#: Anthropic error types and the OpenAI ``type`` a client sees for them.
ERROR_TYPES: dict[str, str] = {
    "invalid_request_error": "invalid_request_error",
    "authentication_error": "authentication_error",
    "permission_error": "permission_error",
    "not_found_error": "not_found_error",
    "request_too_large": "invalid_request_error",
    "rate_limit_error": "rate_limit_exceeded",
    "api_error": "upstream_error",
    "overloaded_error": "upstream_error",
}


class MessagesFormatError(Exception):
    """The upstream's answer is not a Messages API answer (garbage, or an unknown shape)."""


class MessagesStreamError(Exception):
    """The upstream sent an ``error`` event mid-stream."""

    def __init__(self, error_type: str, message: str) -> None:
        super().__init__(f"{error_type}: {message}")
        self.error_type = error_type


# -- requests ----------------------------------------------------------------------------------


def _str(v: Any) -> str:
    """A text field: a string as it is, anything else (``null``, a number) as ``""``."""
    return v if isinstance(v, str) else ""


def _bad(message: str, param: str) -> InvalidRequestError:
    return InvalidRequestError(f"{message} (the upstream speaks the Anthropic Messages API)",
                               param=param)


def _text_of(content: Any, param: str) -> str:
    """The text of a system/developer message (a string or text parts)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        out = []
        for part in content:
            if isinstance(part, dict) and part.get("type") == "text":
                out.append(_str(part.get("text")))
            else:
                raise _bad("a system message may hold text parts only", param)
        return "\n".join(out)
    raise _bad("a message's content must be a string or a list of parts", param)


def _image_block(part: JSONObject, param: str) -> JSONObject:
    image = part.get("image_url")
    url = image.get("url") if isinstance(image, dict) else image
    if not isinstance(url, str):
        raise _bad("image_url.url must be a string", param)
    if url.startswith("data:"):
        head, sep, data = url[5:].partition(",")
        media_type, _, encoding = head.partition(";")
        if not sep or encoding != "base64":
            raise _bad("a data: image URL must be base64", param)
        return {
            "type": "image",
            "source": {"type": "base64", "media_type": media_type, "data": data},
        }
    return {"type": "image", "source": {"type": "url", "url": url}}


def _content_blocks(content: Any, param: str) -> list[JSONObject]:
    if content is None:
        return []
    if isinstance(content, str):
        return [{"type": "text", "text": content}] if content else []
    if not isinstance(content, list):
        raise _bad("a message's content must be a string or a list of parts", param)
    blocks: list[JSONObject] = []
    for k, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            blocks.append({"type": "text", "text": _str(part.get("text"))})
        elif kind == "image_url":
            blocks.append(_image_block(part, f"{param}[{k}]"))
        else:
            raise _bad(f"content part type {kind!r} is not supported", f"{param}[{k}]")
    return blocks


def _tool_use_blocks(calls: Any, param: str) -> list[JSONObject]:
    if not isinstance(calls, list):
        raise _bad("tool_calls must be a list", param)
    blocks: list[JSONObject] = []
    for k, call in enumerate(calls):
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise _bad("a tool call needs function.name", f"{param}[{k}]")
        args = fn.get("arguments") or "{}"
        try:
            parsed = orjson.loads(args) if isinstance(args, str) else args
        except orjson.JSONDecodeError:
            raise _bad("tool call arguments must be a JSON object", f"{param}[{k}]") from None
        if not isinstance(parsed, dict):
            raise _bad("tool call arguments must be a JSON object", f"{param}[{k}]")
        blocks.append(
            {"type": "tool_use", "id": str(call.get("id", "")), "name": fn["name"],
             "input": parsed}
        )
    return blocks


def _tool_choice(choice: Any, parallel: Any) -> JSONObject | None:
    out: JSONObject | None
    if choice is None:
        out = None
    elif choice == "auto":
        out = {"type": "auto"}
    elif choice == "required":
        out = {"type": "any"}
    elif choice == "none":
        out = {"type": "none"}
    elif isinstance(choice, dict) and isinstance(choice.get("function"), dict):
        out = {"type": "tool", "name": choice["function"].get("name")}
    else:
        raise _bad("tool_choice must be auto, required, none or a function", "tool_choice")
    if parallel is False:
        out = dict(out or {"type": "auto"})
        if out["type"] != "none":
            out["disable_parallel_tool_use"] = True
    return out


def to_messages_request(
    body: JSONObject, *, model: str, default_max_tokens: int
) -> JSONObject:
    """An OpenAI chat completions body as a Messages API body for ``model`` (the upstream's
    name). Raises `InvalidRequestError` for what Messages cannot express."""
    n = body.get("n")
    if n is not None and n != 1:
        raise _bad("n must be 1", "n")
    if body.get("logprobs") or body.get("top_logprobs"):
        raise _bad("logprobs are not available", "logprobs")
    fmt = body.get("response_format")
    if isinstance(fmt, dict) and fmt.get("type") not in (None, "text"):
        raise _bad(f"response_format {fmt.get('type')!r} is not supported", "response_format")

    system: list[str] = []
    messages: list[JSONObject] = []

    def add(role: str, blocks: list[JSONObject]) -> None:
        if messages and messages[-1]["role"] == role:
            messages[-1]["content"].extend(blocks)
        else:
            messages.append({"role": role, "content": blocks})

    for i, m in enumerate(body.get("messages") or []):
        param = f"messages[{i}]"
        if not isinstance(m, dict):
            raise _bad("a message must be an object", param)
        role = m.get("role")
        if role in ("system", "developer"):
            system.append(_text_of(m.get("content"), f"{param}.content"))
        elif role == "user":
            add("user", _content_blocks(m.get("content"), f"{param}.content"))
        elif role == "assistant":
            blocks = _content_blocks(m.get("content"), f"{param}.content")
            if m.get("tool_calls"):
                blocks += _tool_use_blocks(m["tool_calls"], f"{param}.tool_calls")
            add("assistant", blocks)
        elif role == "tool":
            content = m.get("content")
            call_id = m.get("tool_call_id")
            if not isinstance(call_id, str) or not call_id:
                raise _bad("a tool message needs the tool_call_id of the call it answers",
                           f"{param}.tool_call_id")
            result: JSONObject = {
                "type": "tool_result",
                "tool_use_id": call_id,
                "content": content if isinstance(content, str)
                else _content_blocks(content, f"{param}.content"),
            }
            add("user", [result])
        else:
            raise _bad(f"message role {role!r} is not supported", f"{param}.role")

    if not messages:
        raise _bad("a conversation needs a user message; system messages alone have none",
                   "messages")
    max_tokens = body.get("max_completion_tokens") or body.get("max_tokens") or default_max_tokens
    out: JSONObject = {"model": model, "max_tokens": max_tokens, "messages": messages}
    if system:
        out["system"] = "\n\n".join(system)
    stop = body.get("stop")
    if stop:
        if not isinstance(stop, str) and not (
            isinstance(stop, list) and all(isinstance(x, str) for x in stop)
        ):
            raise _bad("stop must be a string or a list of strings", "stop")
        out["stop_sequences"] = [stop] if isinstance(stop, str) else list(stop)
    temperature = body.get("temperature")
    if isinstance(temperature, (int, float)) and not isinstance(temperature, bool):
        out["temperature"] = min(float(temperature), 1.0)
    if body.get("top_p") is not None:
        out["top_p"] = body["top_p"]
    if body.get("stream"):
        out["stream"] = True
    tools = body.get("tools")
    if tools:
        if not isinstance(tools, list):
            raise _bad("tools must be a list of functions", "tools")
        converted = []
        for k, t in enumerate(tools):
            fn = t.get("function") if isinstance(t, dict) else None
            if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
                raise _bad("a tool needs type function and function.name", f"tools[{k}]")
            tool: JSONObject = {
                "name": fn["name"],
                "input_schema": fn.get("parameters") or {"type": "object", "properties": {}},
            }
            if fn.get("description"):
                tool["description"] = fn["description"]
            converted.append(tool)
        out["tools"] = converted
    choice = _tool_choice(body.get("tool_choice"), body.get("parallel_tool_calls"))
    if choice is not None:
        out["tool_choice"] = choice
    if isinstance(body.get("user"), str):
        out["metadata"] = {"user_id": body["user"]}
    return out


# -- answers -----------------------------------------------------------------------------------


def _count(v: Any) -> int | None:
    """A token count from the upstream: a non-negative integer, else None (unreadable)."""
    return v if isinstance(v, int) and not isinstance(v, bool) and v >= 0 else None


def openai_usage(usage: Any) -> JSONObject | None:
    """Messages usage as OpenAI usage (cache reads and writes count as prompt tokens).

    A count that is missing or not a non-negative integer is left out (``prompt_tokens``
    when ``input_tokens`` is, ``completion_tokens`` when ``output_tokens`` is, and then
    ``total_tokens``), never guessed as 0: the gateway then accounts the request's prompt
    estimate and the completion counted from the stream, as for an OpenAI-dialect answer
    without those counts. Missing cache counts are 0. None (no usage at all) when the
    upstream sent neither count."""
    u = usage if isinstance(usage, dict) else {}
    if _count(u.get("input_tokens")) is None and _count(u.get("output_tokens")) is None:
        return None
    read = _count(u.get("cache_read_input_tokens")) or 0
    created = _count(u.get("cache_creation_input_tokens")) or 0
    given = _count(u.get("input_tokens"))
    prompt = None if given is None else given + read + created
    completion = _count(u.get("output_tokens"))
    out: JSONObject = {}
    if prompt is not None:
        out["prompt_tokens"] = prompt
    if completion is not None:
        out["completion_tokens"] = completion
    if prompt is not None and completion is not None:
        out["total_tokens"] = prompt + completion
    if prompt is not None:  # no upstream cache count beside a prompt estimate (nit 8)
        out["prompt_tokens_details"] = {"cached_tokens": read}
    return out


def _filled(usage: JSONObject, prompt_estimate: int, counted: int) -> JSONObject:
    """A partial `openai_usage` as a client gets it: OpenAI's ``CompletionUsage`` requires
    ``prompt_tokens``, ``completion_tokens`` and ``total_tokens`` together (openai-python reads
    them as attributes), so a count left out is the one the gateway's record accounts: the
    request's prompt estimate, the completion counted from the stream (0 for a whole answer).
    ``prompt_tokens_details`` goes with an upstream prompt count only."""
    prompt, completion = _count(usage.get("prompt_tokens")), _count(usage.get("completion_tokens"))
    out = dict(usage)
    if prompt is None:
        prompt = out["prompt_tokens"] = prompt_estimate
        out.pop("prompt_tokens_details", None)
    if completion is None:
        completion = out["completion_tokens"] = counted
    out["total_tokens"] = prompt + completion
    return out


def _partial(data: bytes) -> bool:
    # orjson writes no spaces, and a quote inside a string is escaped (\"), so
    # ``"total_tokens":`` is only ever the key `openai_usage` writes when both counts were read
    return b'"usage":' in data and b'"total_tokens":' not in data


def relayed_answer(data: bytes, prompt_estimate: int) -> bytes:
    """A translated answer (`to_chat_completion`) as the client gets it: a partial ``usage``
    (accounted as it is, before this) completed by `_filled`. Unchanged without one."""
    if not _partial(data):
        return data
    obj = orjson.loads(data)
    if isinstance(obj, dict) and isinstance(obj.get("usage"), dict):
        obj["usage"] = _filled(obj["usage"], prompt_estimate, 0)
        return orjson.dumps(obj)
    return data


def relayed_events(chunk: bytes, prompt_estimate: int, counted: int) -> bytes:
    """Translated SSE (`StreamTranslator`) as the client gets it: a usage chunk with a partial
    ``usage`` (accounted as it is) completed by `_filled`. Unchanged without one."""
    if not _partial(chunk):
        return chunk
    lines = chunk.split(b"\n")
    for i, line in enumerate(lines):
        if line.startswith(b"data: ") and b'"usage":' in line:
            obj = orjson.loads(line[6:])
            if isinstance(obj, dict) and isinstance(obj.get("usage"), dict):
                obj["usage"] = _filled(obj["usage"], prompt_estimate, counted)
                lines[i] = b"data: " + orjson.dumps(obj)
    return b"\n".join(lines)


def _loads(data: bytes) -> JSONObject:
    try:
        obj = orjson.loads(data)
    except orjson.JSONDecodeError:
        raise MessagesFormatError("answered with a body that is not JSON") from None
    if not isinstance(obj, dict):
        raise MessagesFormatError("answered with JSON that is not an object")
    return obj


def to_chat_completion(data: bytes) -> JSONObject:
    """A Messages API answer (``type: message``) as an OpenAI ``chat.completion``."""
    msg = _loads(data)
    content = msg.get("content")
    if msg.get("type") != "message" or not isinstance(content, list):
        raise MessagesFormatError("answered with JSON that is not a Messages API message")
    texts: list[str] = []
    calls: list[JSONObject] = []
    for block in content:
        if not isinstance(block, dict):
            continue
        if block.get("type") == "text":
            texts.append(_str(block.get("text")))
        elif block.get("type") == "tool_use":
            calls.append(
                {
                    "id": block.get("id"),
                    "type": "function",
                    "function": {
                        "name": block.get("name"),
                        "arguments": orjson.dumps(block.get("input") or {}).decode(),
                    },
                }
            )
    message: JSONObject = {"role": "assistant", "content": "".join(texts) if texts else None}
    if calls:
        message["tool_calls"] = calls
    reason = msg.get("stop_reason")
    out: JSONObject = {
        "id": msg.get("id"),
        "object": "chat.completion",
        "created": int(time.time()),
        "model": msg.get("model"),
        "choices": [
            {
                "index": 0,
                "message": message,
                "finish_reason": FINISH.get(reason, "stop") if reason else None,
                "logprobs": None,
            }
        ],
    }
    usage = openai_usage(msg.get("usage"))
    if usage is not None:  # none sent: none relayed, as from an OpenAI-dialect upstream
        out["usage"] = usage
    return out


def to_openai_error(data: bytes) -> JSONObject:
    """A Messages API error body as OpenAI's error body."""
    obj = _loads(data)
    err = obj.get("error")
    if obj.get("type") != "error" or not isinstance(err, dict) or "message" not in err:
        raise MessagesFormatError("answered an error in an unknown format")
    kind = str(err.get("type", "api_error"))
    return {
        "error": {
            "message": str(err["message"]),
            "type": ERROR_TYPES.get(kind, "upstream_error"),
            "param": None,
            "code": kind,
        }
    }


# -- streams -----------------------------------------------------------------------------------


def _sse(obj: JSONObject) -> bytes:
    return b"data: " + orjson.dumps(obj) + b"\n\n"


MAX_EVENT_BYTES = 16 * 1024 * 1024
"""The longest Messages stream event `StreamTranslator` holds while waiting for its end."""


class StreamTranslator:
    """Messages SSE bytes in, OpenAI chat completion chunk SSE bytes out (`feed`, `close`).

    Events may arrive split across reads; only a trailing partial event is held back.
    ``include_usage`` adds OpenAI's usage chunk (empty ``choices``) before ``[DONE]``.
    """

    def __init__(self, *, include_usage: bool) -> None:
        self.include_usage = include_usage
        self._carry = b""
        self._id = ""
        self._model = ""
        self._created = int(time.time())
        self._usage: JSONObject = {}
        self._tools: dict[int, int] = {}  # Messages block index -> OpenAI tool_calls index
        self.finished = False

    def _chunk(self, delta: JSONObject, finish: str | None = None) -> bytes:
        return _sse(
            {
                "id": self._id,
                "object": "chat.completion.chunk",
                "created": self._created,
                "model": self._model,
                "choices": [
                    {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
                ],
            }
        )

    def _take_usage(self, usage: Any, *, final: bool = False) -> None:
        if not isinstance(usage, dict):
            return
        # a later event's unreadable input count keeps an earlier one; but message_start's
        # output count is a placeholder (1), so message_delta's unreadable one drops it and
        # the completion is counted from the stream instead
        if final and "output_tokens" in usage and _count(usage["output_tokens"]) is None:
            self._usage.pop("output_tokens", None)
        self._usage.update({k: v for k, v in usage.items() if _count(v) is not None})

    def feed(self, data: bytes) -> bytes:
        """Translate what arrived; raises `MessagesStreamError` on an ``error`` event and
        `MessagesFormatError` on an event that is not Messages SSE."""
        buf = self._carry + data if self._carry else data
        if b"\r" in buf:
            buf = buf.replace(b"\r\n", b"\n")
        cut = buf.rfind(b"\n\n")
        if cut < 0:
            if len(buf) > MAX_EVENT_BYTES:  # not held without end (the relay buffers nothing)
                raise MessagesFormatError(
                    f"a Messages stream event of more than {MAX_EVENT_BYTES} bytes"
                )
            self._carry = buf
            return b""
        complete, self._carry = buf[:cut], buf[cut + 2 :]
        out = bytearray()
        for event in complete.split(b"\n\n"):
            payload = b"\n".join(
                line[5:].lstrip() for line in event.split(b"\n") if line.startswith(b"data:")
            )
            if payload:
                out += self._event(payload)
        return bytes(out)

    def _event(self, payload: bytes) -> bytes:
        ev = _loads(payload)
        kind = ev.get("type")
        if kind == "message_start":
            msg = ev.get("message") or {}
            self._id = str(msg.get("id", ""))
            self._model = str(msg.get("model", ""))
            self._take_usage(msg.get("usage"))
            return self._chunk({"role": "assistant", "content": ""})
        if kind == "content_block_start":
            block = ev.get("content_block") or {}
            if block.get("type") == "tool_use":
                k = self._tools[int(ev.get("index", 0))] = len(self._tools)
                call = {
                    "index": k,
                    "id": block.get("id"),
                    "type": "function",
                    "function": {"name": block.get("name"), "arguments": ""},
                }
                return self._chunk({"tool_calls": [call]})
            if block.get("type") == "text" and block.get("text"):
                return self._chunk({"content": block["text"]})
            return b""
        if kind == "content_block_delta":
            delta = ev.get("delta") or {}
            if delta.get("type") == "text_delta":
                return self._chunk({"content": delta.get("text", "")})
            if delta.get("type") == "input_json_delta":
                slot = self._tools.get(int(ev.get("index", 0)))
                if slot is None:
                    return b""
                args = {"index": slot, "function": {"arguments": delta.get("partial_json", "")}}
                return self._chunk({"tool_calls": [args]})
            return b""  # thinking, signature and citation deltas have no chat equivalent
        if kind == "message_delta":
            self._take_usage(ev.get("usage"), final=True)
            reason = (ev.get("delta") or {}).get("stop_reason")
            if reason is None:
                return b""
            return self._chunk({}, FINISH.get(reason, "stop"))
        if kind == "message_stop":
            self.finished = True
            out = b""
            usage = openai_usage(self._usage)
            if self.include_usage and usage is not None:
                out += _sse(
                    {
                        "id": self._id,
                        "object": "chat.completion.chunk",
                        "created": self._created,
                        "model": self._model,
                        "choices": [],
                        "usage": usage,
                    }
                )
            return out + b"data: [DONE]\n\n"
        if kind == "error":
            err = ev.get("error") or {}
            raise MessagesStreamError(
                str(err.get("type", "api_error")), str(err.get("message", "stream error"))
            )
        if kind is None:
            raise MessagesFormatError("sent a stream event without a type")
        return b""  # ping, content_block_stop, and event types added later: nothing to relay

    def close(self) -> None:
        """The upstream ended the stream: raise `MessagesFormatError` if it was cut short."""
        if not self.finished:
            raise MessagesFormatError("ended the stream before message_stop")
