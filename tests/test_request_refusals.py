"""Requests the gateway refuses itself, before any upstream call, with an OpenAI-shaped error
that names the field (audit26 S2, N3, N9, N11): a model asked through an API its ``kind`` does
not serve, a prompt or a user message with nothing in it, a body that says it is not JSON, and
the precise words for an out-of-range number, an empty list and a body that is not UTF-8.
An in-process gateway in front of a fake upstream on loopback, over real HTTP."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web

from inferplane.api.app import serve
from inferplane.api.pipeline import Gateway
from inferplane.config.loader import parse_config
from inferplane.core.validation import parse_json, validate
from inferplane.errors import ConfigError, InvalidRequestError
from tests.builders import model, pool_fleet, to_yaml
from tests.support import fake_upstream
from tests.support.procs import free_port

KEY = "sk-refusals"
CHAT = {"model": "m", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 5}
MODELS = [model("m"), model("emb", profile="llama-3.1-8b", kind="embed")]


class Stack:
    def __init__(self, base: str, session: aiohttp.ClientSession) -> None:
        self.base, self.session = base, session

    async def post(self, path: str, body: Any = None, *, raw: bytes | None = None,
                   content_type: str | None = "application/json") -> tuple[int, dict[str, Any]]:
        data = raw if raw is not None else orjson.dumps(body)
        headers = {"Content-Type": content_type} if content_type is not None else {}
        skip = () if content_type is not None else ("Content-Type",)  # not octet-stream
        async with self.session.post(self.base + path, data=data, headers=headers,
                                     skip_auto_headers=skip) as r:
            payload = await r.read()
            if r.content_type == "text/event-stream":
                return r.status, {"stream": payload.decode()}
            return r.status, orjson.loads(payload)


@pytest.fixture
async def stack() -> AsyncIterator[Stack]:
    up_port, gw_port = free_port(), free_port()
    up = web.AppRunner(fake_upstream.build("up", "ok", 0.0))
    await up.setup()
    await web.TCPSite(up, "127.0.0.1", up_port).start()
    cfg = parse_config(to_yaml(pool_fleet(
        up_port, models=MODELS, key=KEY,
        gateway={"port": gw_port, "scrape_interval_s": 0.05},
        substrate={"cost": {"hourly_usd": 3.0}},
    )))
    gw = await serve(Gateway(cfg), "127.0.0.1", gw_port)
    base = f"http://127.0.0.1:{gw_port}"
    try:
        async with aiohttp.ClientSession(
            headers={"Authorization": f"Bearer {KEY}"}, timeout=aiohttp.ClientTimeout(total=20)
        ) as session:
            for _ in range(200):  # the endpoint probed healthy
                async with session.get(f"{base}/ready") as r:
                    if r.status == 200:
                        break
                await asyncio.sleep(0.05)
            yield Stack(base, session)
    finally:
        await gw.cleanup()
        await up.cleanup()


def _refused(status: int, body: dict[str, Any], param: str | None, *words: str,
             expected: int = 400) -> str:
    assert status == expected, body
    err = body["error"]
    assert err["type"] == "invalid_request_error" and err["param"] == param, err
    for w in words:
        assert w in err["message"], err
    return str(err["message"])


# -- models[].kind (S2) ---------------------------------------------------------------------


@pytest.mark.parametrize(("path", "body", "words"), [
    ("/v1/embeddings", {"model": "m", "input": "hi"},
     ["'m' is a generation model", "not /v1/embeddings"]),
    ("/v1/chat/completions", {**CHAT, "model": "emb"},
     ["'emb' is an embeddings model", "not /v1/chat/completions"]),
    ("/v1/chat/completions", {**CHAT, "model": "emb", "stream": True},
     ["'emb' is an embeddings model"]),
    ("/v1/completions", {"model": "emb", "prompt": "hi", "max_tokens": 5},
     ["'emb' is an embeddings model", "not /v1/completions"]),
], ids=["embeddings-to-generate", "chat-to-embed", "stream-to-embed", "completions-to-embed"])
async def test_an_api_the_models_kind_does_not_serve_is_refused_without_an_upstream_call(
    stack: Stack, path: str, body: dict[str, Any], words: list[str]
) -> None:
    before = fake_upstream.STATS["requests"]
    status, answer = await stack.post(path, body)
    _refused(status, answer, "model", *words)
    assert fake_upstream.STATS["requests"] == before  # never forwarded
    # the same model through its own API is served
    good = ({"model": "emb", "input": "hi"} if path != "/v1/embeddings" else CHAT)
    status, _ = await stack.post("/v1/embeddings" if path != "/v1/embeddings"
                                 else "/v1/chat/completions", good)
    assert status == 200


def test_one_model_name_with_two_kinds_is_a_config_error() -> None:
    text = to_yaml(pool_fleet(endpoints=[
        {"name": "a", "url": "http://127.0.0.1:9001", "models": [model("x")]},
        {"name": "b", "url": "http://127.0.0.1:9002", "models": [model("x", kind="embed")]},
    ]))
    with pytest.raises(ConfigError) as exc:
        parse_config(text, "f.yaml")
    assert ("f.yaml: substrates[0].endpoints[1].models[0].kind: model 'x' is 'embed' here but "
            "'generate' at substrates[0].endpoints[0].models[0].kind") in str(exc.value)


# -- empty prompts and messages (N11) --------------------------------------------------------


@pytest.mark.parametrize(("path", "body", "param", "words"), [
    ("/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": None}]},
     "messages[0].content", ["in a 'user' message, got null"]),
    ("/v1/chat/completions", {**CHAT, "messages": [{"role": "system", "content": "be brief"},
                                                   {"role": "user"}]},
     "messages[1].content", ["in a 'user' message, got null"]),
    ("/v1/completions", {"model": "m", "prompt": "", "max_tokens": 5},
     "prompt", ["got an empty string"]),
    ("/v1/completions", {"model": "m", "prompt": ["a", ""], "max_tokens": 5},
     "prompt[1]", ["a non-empty string, got an empty string"]),
    ("/v1/embeddings", {"model": "emb", "input": ""}, "input", ["got an empty string"]),
], ids=["user-null", "user-missing", "prompt-empty", "prompt-list-empty-item", "input-empty"])
async def test_a_request_with_nothing_to_generate_from_is_refused_naming_the_field(
    stack: Stack, path: str, body: dict[str, Any], param: str, words: list[str]
) -> None:
    before = fake_upstream.STATS["requests"]
    status, answer = await stack.post(path, body)
    _refused(status, answer, param, *words)
    assert fake_upstream.STATS["requests"] == before


def test_an_assistant_turn_that_only_calls_tools_may_have_no_content() -> None:
    validate("chat", {"model": "m", "messages": [
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "w", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
    ]})


# -- precise messages (N3) -------------------------------------------------------------------


async def test_a_number_too_large_for_an_integer_is_named_by_its_value(stack: Stack) -> None:
    raw = (b'{"model":"m","messages":[{"role":"user","content":"hi"}],'
           b'"max_tokens":10000000000000000000000000000000000000000}')
    status, answer = await stack.post("/v1/chat/completions", raw=raw)
    _refused(status, answer, "max_tokens", "'max_tokens' must be a positive integer, got 1e+40")
    status, answer = await stack.post("/v1/chat/completions", {**CHAT, "max_tokens": 0})
    _refused(status, answer, "max_tokens", "got 0")


def test_a_number_too_large_for_a_double_is_named_not_called_malformed() -> None:
    # audit28 nit 14: "malformed JSON in request body: number is infinity when parsed as double"
    raw = b'{"model":"m","messages":[{"role":"user","content":"hi"}],"max_tokens":' + \
        b"9" * 5000 + b"}"
    with pytest.raises(InvalidRequestError) as exc:
        parse_json(raw)
    assert exc.value.param == "max_tokens"
    assert exc.value.message.startswith("'max_tokens' at line 1 column 71"), exc.value.message
    assert "too large" in exc.value.message and "malformed" not in exc.value.message
    with pytest.raises(InvalidRequestError) as exc:
        parse_json(b'{"stop": [1, -' + b"9" * 400 + b"]}")  # not a member's value
    assert exc.value.param is None and exc.value.message.startswith("a number at line 1")


@pytest.mark.parametrize(("content", "param", "words"), [
    ([{"type": "text", "text": "hi"}, 5], "messages[0].content[1]", "got 5"),
    ([None], "messages[0].content[0]", "got null"),
    ([{"type": 3}], "messages[0].content[0].type", "a non-empty string, got 3"),
    ([{"type": "text"}], "messages[0].content[0].text", "got null"),
    ([{"type": "text", "text": ["a"]}], "messages[0].content[0].text", "got an array"),
    ([{"type": "image_url", "image_url": {"detail": "low"}}], "messages[0].content[0].image_url",
     "a string 'url'"),
], ids=["number", "null", "type-number", "text-missing", "text-array", "image-without-url"])
def test_content_parts_of_the_wrong_shape_are_refused_naming_the_part(
    content: list[Any], param: str, words: str
) -> None:
    # audit28 nit 15: these went to the engine ("The prompt must not be empty.", param prompt)
    with pytest.raises(InvalidRequestError) as exc:
        validate("chat", {**CHAT, "messages": [{"role": "user", "content": content}]})
    assert exc.value.param == param and words in exc.value.message, exc.value.message


def test_content_parts_the_gateway_does_not_read_pass_to_the_engine() -> None:
    validate("chat", {**CHAT, "messages": [{"role": "user", "content": [
        {"type": "text", "text": "what is this?"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
        {"type": "image_url", "image_url": "https://example.com/a.png"},
        {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}},
        {"image_url": "https://example.com/b.png"},  # vLLM's part without a type
    ]}]})


async def test_an_empty_input_list_is_called_empty(stack: Stack) -> None:
    status, answer = await stack.post("/v1/embeddings", {"model": "emb", "input": []})
    _refused(status, answer, "input", "non-empty", "got an empty array")


async def test_a_body_that_is_not_utf8_says_so_with_the_offset(stack: Stack) -> None:
    raw = b'{"model":"m","messages":[{"role":"user","content":"h\xffi"}]}'
    offset = raw.index(b"\xff")
    status, answer = await stack.post("/v1/chat/completions", raw=raw)
    message = _refused(status, answer, None,
                       f"request body is not valid UTF-8: byte 0xff at offset {offset}")
    assert "surrogates" not in message


# -- Content-Type (N9) -----------------------------------------------------------------------


@pytest.mark.parametrize("content_type", [
    "text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x",
    "application/octet-stream",
])
async def test_a_body_that_says_it_is_not_json_is_refused(
    stack: Stack, content_type: str
) -> None:
    before = fake_upstream.STATS["requests"]
    status, answer = await stack.post("/v1/chat/completions", CHAT, content_type=content_type)
    message = _refused(status, answer, None, "is not JSON", expected=415)
    assert answer["error"]["code"] == "unsupported_media_type"
    assert content_type.split(";")[0] in message
    assert fake_upstream.STATS["requests"] == before


@pytest.mark.parametrize("content_type", [
    None, "application/json", "Application/JSON; charset=utf-8", "application/vnd.api+json",
])
async def test_json_and_no_content_type_are_read_as_json(
    stack: Stack, content_type: str | None
) -> None:
    status, answer = await stack.post("/v1/chat/completions", CHAT, content_type=content_type)
    assert status == 200, answer


# -- client strings in messages are quoted, bounded (review26 nit 3) -------------------------


async def test_a_long_role_or_content_type_is_quoted_cut_short(stack: Stack) -> None:
    role = "r" * 5000
    body = {**CHAT, "messages": [{"role": role, "content": None}]}
    status, answer = await stack.post("/v1/chat/completions", body)
    message = _refused(status, answer, "messages[0].content", "'" + "r" * 64 + "…'")
    assert len(message) < 200, len(message)
    media = "application/" + "x" * 5000
    status, answer = await stack.post("/v1/chat/completions", CHAT, content_type=media)
    message = _refused(status, answer, None, "is not JSON", expected=415)
    assert len(message) < 200, len(message)
