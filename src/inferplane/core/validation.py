"""Parse and check request bodies by hand: fast, and every error names its field."""

from __future__ import annotations

import re
from typing import Any

import orjson

from inferplane.errors import InvalidRequestError, quoted
from inferplane.types import ApiKind, JSONObject


def _got(value: Any) -> str:
    """What a client sent, said precisely enough to fix: a number by its value (a float's
    ``1e+40`` was often written as an integer too large to be one), an empty string or list
    as empty, anything else by its JSON type."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return "an empty string" if not value else "a string"
    if isinstance(value, list):
        return "an empty array" if not value else "an array"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def _bad(field: str, expected: str, value: Any) -> InvalidRequestError:
    return InvalidRequestError(f"'{field}' must be {expected}, got {_got(value)}", param=field)


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
        try:
            body.decode("utf-8")
        except UnicodeDecodeError as bad:
            raise InvalidRequestError(
                f"request body is not valid UTF-8: byte 0x{body[bad.start]:02x} at offset "
                f"{bad.start}"
            ) from None
        if str(exc).startswith("number is infinity"):
            raise _too_large(body, exc) from None
        raise InvalidRequestError(f"malformed JSON in request body: {exc}") from None
    if not isinstance(data, dict):
        raise InvalidRequestError("request body must be a JSON object")
    return data


_KEY_BEFORE = re.compile(rb'"([A-Za-z0-9_.-]{1,64})"\s*:\s*$')


def _too_large(body: bytes, exc: orjson.JSONDecodeError) -> InvalidRequestError:
    """The 400 for a well-formed number too large for a double (orjson's "number is infinity
    when parsed as double"): the body is JSON, the number is what is wrong; the field is named
    when the number is an object member's value."""
    m = _KEY_BEFORE.search(body, max(0, exc.pos - 80), exc.pos)
    field = None if m is None else m.group(1).decode()
    what = "a number" if field is None else f"'{field}'"
    return InvalidRequestError(
        f"{what} at line {exc.lineno} column {exc.colno} of the request body is too large: a "
        "number must fit a 64-bit float (at most about 1.8e308)", param=field)


def _check_prompt_like(field: str, v: Any) -> None:
    """A prompt (an embeddings input): a non-empty string, or a non-empty list of non-empty
    strings, of token ids, or of non-empty lists of token ids (an engine refuses an empty
    prompt; the gateway says so first, naming the field)."""
    if isinstance(v, str) and v:
        return
    if isinstance(v, list) and v:
        if all(isinstance(x, str) for x in v):
            empty = next((i for i, x in enumerate(v) if not x), None)
            if empty is None:
                return
            raise _bad(f"{field}[{empty}]", "a non-empty string", v[empty])
        if all(_is_int(x) for x in v):
            return
        if all(isinstance(x, list) and x and all(_is_int(t) for t in x) for x in v):
            return
    raise _bad(field, "a non-empty string, a non-empty array of non-empty strings or an array "
                      "of token ids", v)


def _check_parts(field: str, parts: list[Any]) -> None:
    """A message's content parts: each an object; its ``type``, when given, a string (vLLM
    also reads parts without one, ``{"image_url": "..."}``); the two the gateway itself reads
    (token estimates, the Anthropic translation) with their payload: a ``text`` part's
    ``text`` a string, an ``image_url`` part's ``image_url`` a URL string or an object with a
    string ``url``. Other types (``input_audio``, an engine's own) pass to the engine."""
    for j, part in enumerate(parts):
        where = f"{field}[{j}]"
        if not isinstance(part, dict):
            raise _bad(where, "a content part (an object)", part)
        kind = part.get("type")
        if kind is None:
            continue
        if not isinstance(kind, str) or not kind:
            raise _bad(f"{where}.type", "a non-empty string", kind)
        if kind == "text" and not isinstance(part.get("text"), str):
            raise _bad(f"{where}.text", "a string in a 'text' part", part.get("text"))
        if kind == "image_url":
            image = part.get("image_url")
            url = image.get("url") if isinstance(image, dict) else image
            if not isinstance(url, str):
                raise _bad(f"{where}.image_url", "a URL or an object with a string 'url'",
                           image)


_CONTENT_OPTIONAL = frozenset({"assistant"})
"""Roles whose message may have no content (an assistant turn that only calls tools)."""


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
            if c is None and m["role"] not in _CONTENT_OPTIONAL:
                raise _bad(f"messages[{i}].content",
                           f"a string or an array of parts in a {quoted(m['role'])} message", c)
            if c is not None and not isinstance(c, (str, list)):
                raise _bad(f"messages[{i}].content", "a string or an array of parts", c)
            if isinstance(c, list):
                _check_parts(f"messages[{i}].content", c)
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
