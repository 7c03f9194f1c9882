"""The Anthropic Messages dialect: translation tables, round trips through the gateway (plain,
streamed, tool calls, errors) against a Messages-speaking stand-in, all in process."""

from __future__ import annotations

import json
from typing import Any

import openai
import orjson
import pytest

from inferplane.config.loader import parse_config
from inferplane.dispatch import anthropic as a
from inferplane.errors import InvalidRequestError
from tests.builders import model
from tests.support.fake_provider import SEEN, build_provider
from tests.support.procs import free_port
from tests.test_providers import (  # noqa: F401 (_key_env: the fixture, used by name)
    KEY,
    UPSTREAM_KEY,
    _key_env,
    endpoint,
    fleet_yaml,
    gateway,
    providers,
    session,
)

TOOLS = [{"type": "function", "function": {
    "name": "weather", "description": "the weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]


# -- requests ------------------------------------------------------------------------------------


def test_request_translation() -> None:
    body = {
        "model": "claude", "max_tokens": 100, "temperature": 1.5, "top_p": 0.9,
        "stop": "END", "user": "u-1", "stream": True, "tools": TOOLS,
        "tool_choice": {"type": "function", "function": {"name": "weather"}},
        "parallel_tool_calls": False,
        "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "developer", "content": [{"type": "text", "text": "be kind"}]},
            {"role": "user", "content": [
                {"type": "text", "text": "look"},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
                {"type": "image_url", "image_url": {"url": "https://x.test/cat.png"}}]},
            {"role": "user", "content": "and the weather?"},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "call_1", "type": "function",
                 "function": {"name": "weather", "arguments": '{"city": "Paris"}'}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
        ],
    }
    out = a.to_messages_request(body, model="claude-up", default_max_tokens=7)
    assert out["model"] == "claude-up" and out["max_tokens"] == 100
    assert out["system"] == "be brief\n\nbe kind"
    assert out["temperature"] == 1.0 and out["top_p"] == 0.9  # clamped to Anthropic's range
    assert out["stop_sequences"] == ["END"] and out["metadata"] == {"user_id": "u-1"}
    assert out["stream"] is True
    assert out["tools"] == [{"name": "weather", "description": "the weather in a city",
                             "input_schema": TOOLS[0]["function"]["parameters"]}]
    assert out["tool_choice"] == {"type": "tool", "name": "weather",
                                  "disable_parallel_tool_use": True}
    user, assistant, result = out["messages"]
    assert user["role"] == "user" and [b["type"] for b in user["content"]] == [
        "text", "image", "image", "text"]  # two user turns merged
    assert user["content"][1]["source"] == {"type": "base64", "media_type": "image/png",
                                            "data": "AAAA"}
    assert user["content"][2]["source"] == {"type": "url", "url": "https://x.test/cat.png"}
    assert assistant == {"role": "assistant", "content": [
        {"type": "tool_use", "id": "call_1", "name": "weather", "input": {"city": "Paris"}}]}
    assert result == {"role": "user", "content": [
        {"type": "tool_result", "tool_use_id": "call_1", "content": "sunny"}]}


@pytest.mark.parametrize(("choice", "expected"), [
    ("auto", {"type": "auto"}), ("required", {"type": "any"}), ("none", {"type": "none"}),
])
def test_tool_choice_table(choice: str, expected: dict[str, Any]) -> None:
    body = {"messages": [{"role": "user", "content": "x"}], "tools": TOOLS, "tool_choice": choice}
    assert a.to_messages_request(body, model="m", default_max_tokens=5)["tool_choice"] == expected


def test_default_max_tokens_and_refusals() -> None:
    body: dict[str, Any] = {"messages": [{"role": "user", "content": "x"}]}
    assert a.to_messages_request(body, model="m", default_max_tokens=5)["max_tokens"] == 5
    for field, value in [("n", 2), ("logprobs", True),
                         ("response_format", {"type": "json_schema"})]:
        with pytest.raises(InvalidRequestError) as exc:
            a.to_messages_request({**body, field: value}, model="m", default_max_tokens=5)
        assert exc.value.param == field and "Anthropic Messages" in exc.value.message


@pytest.mark.parametrize(("body", "param", "words"), [
    # audit28 nit 16: sent as "messages": [], which Anthropic refuses
    ({"messages": [{"role": "system", "content": "be brief"}]}, "messages", "a user message"),
    # was sent as tool_use_id ""
    ({"messages": [{"role": "user", "content": "x"}, {"role": "tool", "content": "sunny"}]},
     "messages[1].tool_call_id", "tool_call_id"),
    # was named tools[0]
    ({"messages": [{"role": "user", "content": "x"}], "tools": "x"}, "tools", "a list"),
    # was a TypeError (a 500)
    ({"messages": [{"role": "user", "content": "x"}], "stop": 5}, "stop", "a list of strings"),
], ids=["system-only", "tool-without-id", "tools-not-a-list", "stop-a-number"])
def test_requests_messages_cannot_express_are_refused_naming_the_field(
    body: dict[str, Any], param: str, words: str
) -> None:
    with pytest.raises(InvalidRequestError) as exc:
        a.to_messages_request(body, model="m", default_max_tokens=5)
    assert exc.value.param == param and words in exc.value.message, exc.value.message


# -- answers -------------------------------------------------------------------------------------


@pytest.mark.parametrize(("reason", "finish"), [
    ("end_turn", "stop"), ("max_tokens", "length"), ("stop_sequence", "stop"),
    ("tool_use", "tool_calls"),
])
def test_stop_reasons(reason: str, finish: str) -> None:
    msg = {"id": "msg_1", "type": "message", "role": "assistant", "model": "m",
           "content": [{"type": "text", "text": "hi"}], "stop_reason": reason,
           "usage": {"input_tokens": 3, "output_tokens": 1}}
    out = a.to_chat_completion(orjson.dumps(msg))
    assert out["choices"][0]["finish_reason"] == finish


def test_answer_with_tool_use_and_cache_usage() -> None:
    msg = {"id": "msg_1", "type": "message", "role": "assistant", "model": "claude-x",
           "content": [{"type": "text", "text": "checking"},
                       {"type": "tool_use", "id": "toolu_1", "name": "weather",
                        "input": {"city": "Paris"}}],
           "stop_reason": "tool_use",
           "usage": {"input_tokens": 5, "output_tokens": 9, "cache_read_input_tokens": 100,
                     "cache_creation_input_tokens": 20}}
    out = a.to_chat_completion(orjson.dumps(msg))
    assert out["object"] == "chat.completion" and out["model"] == "claude-x"
    message = out["choices"][0]["message"]
    assert message["content"] == "checking"
    assert message["tool_calls"] == [{"id": "toolu_1", "type": "function", "function": {
        "name": "weather", "arguments": '{"city":"Paris"}'}}]
    assert out["usage"] == {"prompt_tokens": 125, "completion_tokens": 9, "total_tokens": 134,
                            "prompt_tokens_details": {"cached_tokens": 100}}


@pytest.mark.parametrize("data", [b"<html>", b"[1, 2]", b'{"type": "completion"}'])
def test_answers_in_other_shapes_are_format_errors(data: bytes) -> None:
    with pytest.raises(a.MessagesFormatError):
        a.to_chat_completion(data)


def test_error_translation() -> None:
    err = a.to_openai_error(b'{"type": "error", "error": {"type": "overloaded_error", '
                            b'"message": "Overloaded"}}')
    assert err == {"error": {"message": "Overloaded", "type": "upstream_error", "param": None,
                             "code": "overloaded_error"}}
    with pytest.raises(a.MessagesFormatError):
        a.to_openai_error(b'{"detail": "nope"}')


# -- streams -------------------------------------------------------------------------------------


def _events(*events: dict[str, Any]) -> bytes:
    return b"".join(f"event: {e['type']}\ndata: {json.dumps(e)}\n\n".encode() for e in events)


STREAM = _events(
    {"type": "message_start", "message": {"id": "msg_9", "model": "claude-x", "usage": {
        "input_tokens": 4, "output_tokens": 1, "cache_read_input_tokens": 8}}},
    {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
    {"type": "ping"},
    {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Hi"}},
    {"type": "content_block_delta", "index": 0, "delta": {"type": "thinking_delta",
                                                          "thinking": "hidden"}},
    {"type": "content_block_stop", "index": 0},
    {"type": "content_block_start", "index": 1, "content_block": {
        "type": "tool_use", "id": "toolu_1", "name": "weather", "input": {}}},
    {"type": "content_block_delta", "index": 1, "delta": {"type": "input_json_delta",
                                                          "partial_json": '{"city":'}},
    {"type": "content_block_delta", "index": 1, "delta": {"type": "input_json_delta",
                                                          "partial_json": '"Paris"}'}},
    {"type": "content_block_stop", "index": 1},
    {"type": "some_future_event"},
    {"type": "message_delta", "delta": {"stop_reason": "tool_use"}, "usage": {"output_tokens": 12}},
    {"type": "message_stop"},
)


def _chunks(sse: bytes) -> list[Any]:
    out = []
    for ev in sse.decode().split("\n\n"):
        if ev.startswith("data: "):
            payload = ev[6:]
            out.append(payload if payload == "[DONE]" else json.loads(payload))
    return out


@pytest.mark.parametrize("step", [1, 7, 64, len(STREAM)])
def test_stream_translation_in_any_split(step: int) -> None:
    t = a.StreamTranslator(include_usage=True)
    out = b"".join(t.feed(STREAM[i : i + step]) for i in range(0, len(STREAM), step))
    t.close()
    chunks = _chunks(out)
    assert chunks[-1] == "[DONE]"
    first = chunks[0]
    assert first["object"] == "chat.completion.chunk" and first["id"] == "msg_9"
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    deltas = [c["choices"][0]["delta"] for c in chunks[:-2] if c["choices"]]
    assert "".join(d.get("content") or "" for d in deltas) == "Hi"
    calls = [tc for d in deltas for tc in d.get("tool_calls", [])]
    assert calls[0] == {"index": 0, "id": "toolu_1", "type": "function",
                        "function": {"name": "weather", "arguments": ""}}
    assert "".join(c["function"]["arguments"] for c in calls) == '{"city":"Paris"}'
    finish = [c["choices"][0]["finish_reason"] for c in chunks[:-2] if c["choices"]]
    assert finish[-1] == "tool_calls" and all(f is None for f in finish[:-1])
    usage = chunks[-2]
    assert usage["choices"] == [] and usage["usage"] == {
        "prompt_tokens": 12, "completion_tokens": 12, "total_tokens": 24,
        "prompt_tokens_details": {"cached_tokens": 8}}


def test_stream_error_event_and_cut_stream() -> None:
    t = a.StreamTranslator(include_usage=False)
    t.feed(STREAM[:200])
    with pytest.raises(a.MessagesStreamError, match="overloaded_error: Overloaded"):
        t.feed(_events({"type": "error", "error": {"type": "overloaded_error",
                                                  "message": "Overloaded"}}))
    cut = a.StreamTranslator(include_usage=False)
    cut.feed(STREAM[:300])
    with pytest.raises(a.MessagesFormatError, match="before message_stop"):
        cut.close()
    with pytest.raises(a.MessagesFormatError):
        a.StreamTranslator(include_usage=False).feed(b"data: not json\n\n")


# -- through the gateway -------------------------------------------------------------------------


def anthropic_endpoint(name: str, port: int, base: str = "",
                       served: str = "big") -> dict[str, Any]:
    return endpoint(name, port, base=base, dialect="anthropic", models=[
        model(served, "llama-3.1-70b", 200000, upstream_name="claude-big-4")])


def _client(base: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{base}/v1", api_key=KEY, max_retries=0)


async def test_round_trip_plain_and_streamed_with_tools() -> None:
    app = build_provider(base="/v1", dialect="anthropic", key=UPSTREAM_KEY)
    async with providers(p=app) as ports:
        config = parse_config(fleet_yaml(free_port(), [anthropic_endpoint("claude", ports["p"])]))
        async with gateway(config) as (gw, base), _client(base) as client:
            raw = await client.chat.completions.with_raw_response.create(
                model="big", max_tokens=50,
                messages=[{"role": "system", "content": "short"},
                          {"role": "user", "content": "hi"}])
            out = raw.parse()
            assert raw.headers["x-inferplane-model"] == "claude-big-4"
            assert out.model == "claude-big-4"
            assert out.choices[0].message.content == "prov says hi"
            assert out.choices[0].finish_reason == "stop"
            assert out.usage is not None and out.usage.prompt_tokens == 10
            assert out.usage.prompt_tokens_details is not None
            assert out.usage.prompt_tokens_details.cached_tokens == 4
            sent = app[SEEN][-1]
            assert sent["path"] == "/v1/messages"
            assert sent["headers"]["x-api-key"] == UPSTREAM_KEY
            assert "Authorization" not in sent["headers"]
            assert sent["body"]["system"] == "short" and sent["body"]["model"] == "claude-big-4"
            did = raw.headers["x-inferplane-decision-id"]
            outcome = gw.ledger.get(did)["outcome"]  # type: ignore[index]
            assert outcome["prompt_tokens"] == 10 and outcome["cached_tokens"] == 4
            assert outcome["cost_usd"] == pytest.approx((6 + 4 * 0.5 + 3 * 2.0) / 1e6)

            stream = await client.chat.completions.create(
                model="big", messages=[{"role": "user", "content": "weather?"}],
                tools=TOOLS, stream=True, stream_options={"include_usage": True})  # type: ignore[arg-type]
            chunks = [c async for c in stream]
            text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            assert text == "prov says hi"
            calls = [tc for c in chunks if c.choices for tc in c.choices[0].delta.tool_calls or []]
            assert calls[0].function is not None and calls[0].function.name == "weather"
            args = "".join((tc.function.arguments or "") for tc in calls if tc.function)
            assert json.loads(args) == {"city": "Paris"}
            assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"
            assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 3
            # a stream whose client did not ask for usage still gets accounted, without it
            async with session() as s, s.post(
                f"{base}/v1/chat/completions",
                json={"model": "big", "stream": True,
                      "messages": [{"role": "user", "content": "x"}]},
            ) as r:
                body = (await r.read()).decode()
                did = r.headers["x-inferplane-decision-id"]
            assert '"usage"' not in body and body.rstrip().endswith("data: [DONE]")
            assert gw.ledger.get(did)["outcome"]["completion_tokens"] == 3  # type: ignore[index]


async def test_errors_reach_the_client_in_the_openai_shape() -> None:
    bad = build_provider(base="/v1", dialect="anthropic", key=UPSTREAM_KEY, mode="bad_request")
    mid = build_provider(base="/v1", dialect="anthropic", key=UPSTREAM_KEY, mode="stream_error")
    junk = build_provider(base="/v1", dialect="anthropic", key=UPSTREAM_KEY, mode="garbage")
    async with providers(bad=bad, mid=mid, junk=junk) as ports:
        eps = [anthropic_endpoint(n, ports[n], base="/v1", served=f"m-{n}")
               for n in ("bad", "mid", "junk")]
        config = parse_config(fleet_yaml(free_port(), eps))
        async with gateway(config) as (_, base), session() as s:
            msg = {"messages": [{"role": "user", "content": "x"}]}
            async with s.post(f"{base}/v1/chat/completions", json={**msg, "model": "m-bad"}) as r:
                assert r.status == 400
                assert await r.json() == {"error": {
                    "message": "messages: field required", "type": "invalid_request_error",
                    "param": None, "code": "invalid_request_error"}}
            async with s.post(f"{base}/v1/chat/completions",
                              json={**msg, "model": "m-mid", "stream": True}) as r:
                assert r.status == 200
                events = _chunks(await r.read())
            assert events[-1] == "[DONE]"  # the upstream's error event ends it as [DONE] would
            err = events[-2]["error"]
            assert set(err) == {"message", "type", "param", "code"}
            assert "upstream 'mid'" in err["message"] and "overloaded_error" in err["message"]
            async with s.post(f"{base}/v1/chat/completions", json={**msg, "model": "m-junk"}) as r:
                assert r.status == 502
                err = (await r.json())["error"]
            assert "upstream 'junk'" in err["message"] and "not JSON" in err["message"]
            async with s.post(f"{base}/v1/completions",
                              json={"model": "m-bad", "prompt": "x"}) as r:
                assert r.status == 400
                err = (await r.json())["error"]
            assert err["param"] == "model" and "Anthropic Messages" in err["message"]
            async with s.post(f"{base}/v1/chat/completions",
                              json={**msg, "model": "m-bad", "n": 2}) as r:
                assert r.status == 400 and (await r.json())["error"]["param"] == "n"


# -- usage the gateway cannot read ----------------------------------------------------------------


@pytest.mark.parametrize("bad", ["abc", "12", None, -3, True, 1.5, [1], {"n": 1}])
def test_usage_counts_that_are_not_counts_are_left_out(bad: Any) -> None:
    out = a.openai_usage({"input_tokens": bad, "output_tokens": 4,
                          "cache_read_input_tokens": bad})
    assert out == {"completion_tokens": 4}  # no cache count beside no prompt count
    out = a.openai_usage({"input_tokens": 2, "output_tokens": bad})
    assert out == {"prompt_tokens": 2, "prompt_tokens_details": {"cached_tokens": 0}}
    t = a.StreamTranslator(include_usage=True)
    t.feed(_events({"type": "message_start", "message": {"id": "m", "usage": bad}},
                   {"type": "message_delta", "delta": {"stop_reason": "end_turn"},
                    "usage": {"output_tokens": bad}}))
    assert _chunks(t.feed(_events({"type": "message_stop"}))) == ["[DONE]"]  # no usage at all


@pytest.mark.parametrize("bad", ["abc", None, -1])
def test_a_later_unreadable_count_keeps_an_earlier_one(bad: Any) -> None:
    """Newer Messages streams repeat the input counts in ``message_delta``; a compat proxy's
    ``null`` there does not erase the real count from ``message_start`` (review29-fix29a #5)."""
    t = a.StreamTranslator(include_usage=True)
    t.feed(_events({"type": "message_start",
                    "message": {"id": "m", "usage": {"input_tokens": 100, "output_tokens": 1,
                                                     "cache_read_input_tokens": 7}}},
                   {"type": "message_delta", "delta": {"stop_reason": "end_turn"},
                    "usage": {"input_tokens": bad, "output_tokens": 40,
                              "cache_read_input_tokens": bad}}))
    usage = _chunks(t.feed(_events({"type": "message_stop"})))[-2]["usage"]
    assert usage == {"prompt_tokens": 107, "completion_tokens": 40, "total_tokens": 147,
                     "prompt_tokens_details": {"cached_tokens": 7}}
    t = a.StreamTranslator(include_usage=True)  # the final output count unreadable: the
    t.feed(_events({"type": "message_start",  # start's placeholder is not taken for it
                    "message": {"id": "m", "usage": {"input_tokens": 100, "output_tokens": 1}}},
                   {"type": "message_delta", "delta": {"stop_reason": "end_turn"},
                    "usage": {"output_tokens": bad}}))
    usage = _chunks(t.feed(_events({"type": "message_stop"})))[-2]["usage"]
    assert "completion_tokens" not in usage or usage["completion_tokens"] != 1


def test_a_partial_usage_reaches_the_client_whole() -> None:
    """OpenAI's CompletionUsage requires all three counts: a partial one (accounted as it is)
    is relayed with the counts the record uses (review29-fix29a #6)."""
    answer = orjson.dumps({"id": "x", "choices": [{"message": {"content": '"total_tokens":'}}],
                           "usage": {"completion_tokens": 4}})
    relayed = orjson.loads(a.relayed_answer(answer, 9))
    assert relayed["usage"] == {"prompt_tokens": 9, "completion_tokens": 4, "total_tokens": 13}
    whole = orjson.dumps({"usage": {"prompt_tokens": 1, "completion_tokens": 2,
                                    "total_tokens": 3}})
    assert a.relayed_answer(whole, 9) is whole
    chunk = (b'data: {"choices":[],"usage":{"prompt_tokens":5,'
             b'"prompt_tokens_details":{"cached_tokens":1}}}\n\ndata: [DONE]\n\n')
    events = _chunks(a.relayed_events(chunk, 9, 3))
    assert events == [{"choices": [], "usage": {
        "prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8,
        "prompt_tokens_details": {"cached_tokens": 1}}}, "[DONE]"]


async def test_unreadable_usage_counts_are_missing_not_a_500() -> None:
    """A count that is not a number is read as missing (the prompt estimate is billed, the
    completion counted from the stream), never a 500."""
    app = build_provider(base="/v1", dialect="anthropic", key=UPSTREAM_KEY, mode="bad_usage")
    async with providers(p=app) as ports:
        config = parse_config(fleet_yaml(free_port(), [anthropic_endpoint("claude", ports["p"])]))
        async with gateway(config) as (gw, base), session() as s:
            msg = {"model": "big", "max_tokens": 21,
                   "messages": [{"role": "user", "content": "hi"}]}
            async with s.post(f"{base}/v1/chat/completions", json=msg) as r:
                assert r.status == 200
                body = await r.json()
                did = r.headers["x-inferplane-decision-id"]
            usage = body["usage"]  # the prompt as the record bills it: the estimate
            assert usage["completion_tokens"] == 1 and usage["prompt_tokens"] > 0
            assert usage["total_tokens"] == usage["prompt_tokens"] + 1
            assert "prompt_tokens_details" not in usage  # no upstream cache count beside it
            outcome = gw.ledger.get(did)["outcome"]  # type: ignore[index]
            assert outcome["status"] == 200 and outcome["prompt_tokens"] is None
            assert outcome["completion_tokens"] == 1 and outcome["cost_usd"] > 2 / 1e6
            async with s.post(f"{base}/v1/chat/completions", json={**msg, "stream": True}) as r:
                assert r.status == 200
                events = _chunks(await r.read())
                did = r.headers["x-inferplane-decision-id"]
            assert events[-1] == "[DONE]" and not any("error" in e for e in events[:-1])
            outcome = gw.ledger.get(did)["outcome"]  # type: ignore[index]
            assert outcome["status"] == 200 and outcome["prompt_tokens"] == 10
            assert outcome["completion_tokens"] == 3 and outcome["usage_source"] == "counted"
            async with s.post(f"{base}/v1/chat/completions",
                              json={**msg, "stream": True,
                                    "stream_options": {"include_usage": True}}) as r:
                events = _chunks(await r.read())
            usage = next(e["usage"] for e in events[:-1] if e.get("usage"))
            assert (usage["prompt_tokens"], usage["completion_tokens"],
                    usage["total_tokens"]) == (10, 3, 13)  # the counted completion


def test_an_answer_without_usage_has_none() -> None:
    msg = {"id": "msg_1", "type": "message", "role": "assistant", "model": "m",
           "content": [{"type": "text", "text": "hi"}], "stop_reason": "end_turn"}
    assert a.openai_usage(None) is None and a.openai_usage({}) is None
    assert "usage" not in a.to_chat_completion(orjson.dumps(msg))
    t = a.StreamTranslator(include_usage=True)
    out = t.feed(_events({"type": "message_start", "message": {"id": "m"}},
                         {"type": "message_delta", "delta": {"stop_reason": "end_turn"},
                          "usage": {"output_tokens": 5}},
                         {"type": "message_stop"}))
    assert _chunks(out)[-2]["usage"] == {"completion_tokens": 5}


async def test_an_answer_without_usage_bills_the_prompt_estimate() -> None:
    """No usage from the upstream is not 0 tokens: the record bills the request's prompt
    estimate and the streamed completion as counted, as for an OpenAI-dialect upstream."""
    app = build_provider(base="/v1", dialect="anthropic", key=UPSTREAM_KEY, mode="no_usage")
    async with providers(p=app) as ports:
        config = parse_config(fleet_yaml(free_port(), [anthropic_endpoint("claude", ports["p"])]))
        async with gateway(config) as (gw, base), session() as s:
            msg = {"model": "big", "max_tokens": 2,
                   "messages": [{"role": "user", "content": "hi"}]}
            async with s.post(f"{base}/v1/chat/completions", json=msg) as r:
                assert r.status == 200
                body = await r.json()
                did = r.headers["x-inferplane-decision-id"]
            assert "usage" not in body
            outcome = gw.ledger.get(did)["outcome"]  # type: ignore[index]
            assert outcome["prompt_tokens"] is None and outcome["usage_source"] != "upstream"
            assert outcome["cost_usd"] > 0
            async with s.post(f"{base}/v1/chat/completions",
                              json={**msg, "stream": True,
                                    "stream_options": {"include_usage": True}}) as r:
                events = _chunks(await r.read())
                did = r.headers["x-inferplane-decision-id"]
            assert events[-1] == "[DONE]" and not any(e.get("usage") for e in events[:-1])
            outcome = gw.ledger.get(did)["outcome"]  # type: ignore[index]
            assert outcome["prompt_tokens"] is None and outcome["cost_usd"] > 0
            assert outcome["completion_tokens"] == 3 and outcome["usage_source"] == "counted"


def test_a_text_block_with_null_text_is_empty_not_none() -> None:
    msg = {"id": "msg_1", "type": "message", "role": "assistant", "model": "m",
           "content": [{"type": "text", "text": None}, {"type": "text", "text": "ok"}],
           "stop_reason": "end_turn", "usage": {"input_tokens": 1, "output_tokens": 1}}
    assert a.to_chat_completion(orjson.dumps(msg))["choices"][0]["message"]["content"] == "ok"
