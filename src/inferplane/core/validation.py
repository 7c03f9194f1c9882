"""Parse and check request bodies by hand: fast, and every error names its field."""

from __future__ import annotations

from typing import Any

import orjson

from inferplane.errors import InvalidRequestError
from inferplane.types import ApiKind, JSONObject


def _bad(field: str, expected: str, value: Any) -> InvalidRequestError:
    got = type(value).__name__ if value is not None else "null"
    return InvalidRequestError(f"'{field}' must be {expected}, got {got}", param=field)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def parse_json(body: bytes) -> JSONObject:
    """The body as a JSON object, or a 400 that says where it is malformed."""
    if not body:
        raise InvalidRequestError("request body is empty; expected a JSON object")
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise InvalidRequestError(f"malformed JSON in request body: {exc}") from None
    if not isinstance(data, dict):
        raise InvalidRequestError("request body must be a JSON object")
    return data


def _check_prompt_like(field: str, v: Any) -> None:
    if isinstance(v, str):
        return
    if isinstance(v, list) and v:
        if all(isinstance(x, str) for x in v):
            return
        if all(_is_int(x) for x in v):
            return
        if all(isinstance(x, list) and x and all(_is_int(t) for t in x) for x in v):
            return
    raise _bad(field, "a string, a list of strings or a list of token ids", v)


def validate(api: ApiKind, body: JSONObject) -> None:
    """Check the fields the gateway reads or the engines would choke on."""
    model = body.get("model")
    if not isinstance(model, str) or not model:
        if "model" not in body:
            raise InvalidRequestError("'model' is required", param="model")
        raise _bad("model", "a non-empty string", model)
    if api == "chat":
        msgs = body.get("messages")
        if "messages" not in body:
            raise InvalidRequestError("'messages' is required", param="messages")
        if not isinstance(msgs, list) or not msgs:
            raise _bad("messages", "a non-empty array", msgs)
        for i, m in enumerate(msgs):
            if not isinstance(m, dict):
                raise _bad(f"messages[{i}]", "an object", m)
            if not isinstance(m.get("role"), str):
                raise _bad(f"messages[{i}].role", "a string", m.get("role"))
            c = m.get("content")
            if c is not None and not isinstance(c, (str, list)):
                raise _bad(f"messages[{i}].content", "a string or an array of parts", c)
    elif api == "completions":
        if "prompt" not in body:
            raise InvalidRequestError("'prompt' is required", param="prompt")
        _check_prompt_like("prompt", body["prompt"])
    else:
        if "input" not in body:
            raise InvalidRequestError("'input' is required", param="input")
        _check_prompt_like("input", body["input"])
    for key in ("max_tokens", "max_completion_tokens", "n"):
        v = body.get(key)
        if v is not None and (not _is_int(v) or v < 1):
            raise _bad(key, "a positive integer", v)
    for key in ("temperature", "top_p", "presence_penalty", "frequency_penalty"):
        v = body.get(key)
        if v is not None and not _is_number(v):
            raise _bad(key, "a number", v)
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise _bad("stream", "a boolean", stream)
    so = body.get("stream_options")
    if so is not None:
        if not isinstance(so, dict):
            raise _bad("stream_options", "an object", so)
        iu = so.get("include_usage")
        if iu is not None and not isinstance(iu, bool):
            raise _bad("stream_options.include_usage", "a boolean", iu)
