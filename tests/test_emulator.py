"""The emulator server: real HTTP over loopback against engines started in-process."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
import zmq
import zmq.asyncio

from inferplane.config.loader import parse_config
from inferplane.config.schema import FleetConfig
from inferplane.fleet.engine_metrics import EngineMetrics, parse_vllm
from inferplane.fleet.kv_events import BlockStored, decode_event_batch
from inferplane.twin.emulator.server import EmulatorError, EmulatorHandle, start_emulator
from inferplane.twin.traces.tokens import token_ids

MODEL = "llama-3.1-8b"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _config(kv_port: int | None = None) -> FleetConfig:
    kv = f", kv_events_port: {kv_port}" if kv_port else ""
    return parse_config(f"""
substrates:
  - name: gpu
    kind: gpu
    hardware: h100
    region: r
    jurisdiction: eu
    cost: {{hourly_usd: 3}}
    endpoints:
      - name: gpu-0
        url: http://127.0.0.1:1
        models: [{{name: {MODEL}, max_context: 4096}}]
        emulation: {{max_num_seqs: 2, num_gpu_blocks: 1024{kv}}}
  - name: embed
    kind: gpu
    hardware: l4
    region: r
    jurisdiction: eu
    cost: {{input_per_mtok: 0.02, output_per_mtok: 0}}
    endpoints:
      - name: emb-0
        url: http://127.0.0.1:2
        models: [{{name: bge-large, max_context: 512, kind: embed}}]
  - name: prov
    kind: provider-api
    hardware: provider-api
    region: r
    jurisdiction: us
    cost: {{input_per_mtok: 0.2, output_per_mtok: 0.2}}
    endpoints:
      - name: prov-0
        url: http://127.0.0.1:3
        models: [{{name: {MODEL}, max_context: 8192}}]
""")


PORTS = {"gpu-0": 0, "emb-0": 0, "prov-0": 0}


@pytest.fixture
async def emu() -> AsyncIterator[EmulatorHandle]:
    handle = await start_emulator(_config(), time_scale=20.0, port_override=PORTS)
    try:
        yield handle
    finally:
        await handle.stop()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def _post(http: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> tuple[int, Any]:
    async with http.post(url, json=body) as r:
        return r.status, await r.json()


async def _metrics(http: aiohttp.ClientSession, base: str) -> EngineMetrics:
    async with http.get(base + "/metrics") as r:
        return parse_vllm(await r.text())


async def _sse(resp: aiohttp.ClientResponse) -> list[Any]:
    events: list[Any] = []
    async for raw in resp.content:
        line = raw.decode().strip()
        if line.startswith("data: "):
            data = line[6:]
            events.append(data if data == "[DONE]" else json.loads(data))
    return events


async def _until(pred: Any, what: str, limit_s: float = 20.0) -> None:
    """Poll ``pred()`` (sync or async) until true; the limit only guards against a hang."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + limit_s
    while True:
        ok = pred()
        if asyncio.iscoroutine(ok):
            ok = await ok
        if ok:
            return
        assert loop.time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.005)


async def test_chat_and_completions_non_streaming(
    emu: EmulatorHandle, http: aiohttp.ClientSession
) -> None:
    base = emu.urls["gpu-0"]
    status, body = await _post(
        http,
        base + "/v1/chat/completions",
        {
            "model": MODEL,
            "messages": [{"role": "user", "content": "hello big world"}],
            "max_tokens": 5,
        },
    )
    assert status == 200
    assert body["object"] == "chat.completion"
    assert body["id"].startswith("chatcmpl-")
    msg = body["choices"][0]["message"]
    assert msg["role"] == "assistant" and len(msg["content"].split()) == 5
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"] == {
        "prompt_tokens": 3,
        "completion_tokens": 5,
        "total_tokens": 8,
        "prompt_tokens_details": {"cached_tokens": 0},
    }

    status, body = await _post(
        http, base + "/v1/completions", {"model": MODEL, "prompt": "one two three four"}
    )
    assert status == 200 and body["object"] == "text_completion"
    assert body["usage"]["prompt_tokens"] == 4
    assert body["usage"]["completion_tokens"] == 16  # the completions default
    assert len(body["choices"][0]["text"].split()) == 16


@pytest.mark.parametrize("chat", [True, False])
async def test_streaming_with_include_usage(
    emu: EmulatorHandle, http: aiohttp.ClientSession, chat: bool
) -> None:
    base = emu.urls["gpu-0"]
    path = "/v1/chat/completions" if chat else "/v1/completions"
    body: dict[str, Any] = {
        "model": MODEL,
        "max_tokens": 4,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if chat:
        body["messages"] = [{"role": "user", "content": "stream me please"}]
    else:
        body["prompt"] = "stream me please"
    async with http.post(base + path, json=body) as r:
        assert r.status == 200
        assert r.headers["Content-Type"].startswith("text/event-stream")
        events = await _sse(r)
    assert events[-1] == "[DONE]"
    usage_chunk, chunks = events[-2], events[:-2]
    assert usage_chunk["choices"] == []
    assert usage_chunk["usage"]["completion_tokens"] == 4
    assert usage_chunk["usage"]["prompt_tokens"] == 3
    kind = "chat.completion.chunk" if chat else "text_completion"
    assert all(c["object"] == kind and "usage" not in c for c in chunks)
    if chat:
        assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
        chunks = chunks[1:]
        text = "".join(c["choices"][0]["delta"]["content"] for c in chunks)
    else:
        text = "".join(c["choices"][0]["text"] for c in chunks)
    assert len(chunks) == 4 and len(text.split()) == 4
    assert [c["choices"][0]["finish_reason"] for c in chunks] == [None, None, None, "length"]

    body["stream_options"] = {"include_usage": False}
    async with http.post(base + path, json=body) as r:
        events = await _sse(r)
    assert events[-1] == "[DONE]" and all(e == "[DONE]" or e["choices"] for e in events)


async def test_prefix_cache_hits_on_repeat_and_follow_up(
    emu: EmulatorHandle, http: aiohttp.ClientSession
) -> None:
    base = emu.urls["gpu-0"]
    prompt = " ".join(f"w{i}" for i in range(100))
    before = await _metrics(http, base)
    req = {"model": MODEL, "messages": [{"role": "user", "content": prompt}], "max_tokens": 20}
    _, first = await _post(http, base + "/v1/chat/completions", req)
    assert first["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    _, second = await _post(http, base + "/v1/chat/completions", req)
    assert second["usage"]["prompt_tokens_details"]["cached_tokens"] == 96  # whole blocks
    after = await _metrics(http, base)
    assert after.prefix_hits_total is not None and before.prefix_hits_total is not None
    assert after.prefix_hits_total > before.prefix_hits_total

    answer = first["choices"][0]["message"]["content"]
    follow = {
        "model": MODEL,
        "max_tokens": 2,
        "messages": [
            {"role": "user", "content": prompt},
            {"role": "assistant", "content": answer},
            {"role": "user", "content": "and then"},
        ],
    }
    _, third = await _post(http, base + "/v1/chat/completions", follow)
    assert third["usage"]["prompt_tokens"] == 122
    assert third["usage"]["prompt_tokens_details"]["cached_tokens"] == 112  # 120 // 16 * 16


async def test_metrics_parse_and_waiting_past_max_num_seqs(
    emu: EmulatorHandle, http: aiohttp.ClientSession
) -> None:
    base = emu.urls["gpu-0"]
    m = await _metrics(http, base)
    assert (m.running, m.waiting, m.kv_usage) == (0, 0, 0)
    assert m.block_size == 16 and m.num_gpu_blocks == 1024
    for field in (
        "prefix_queries_total",
        "prefix_hits_total",
        "preemptions_total",
        "prompt_tokens_total",
        "generation_tokens_total",
        "ttft_count",
        "itl_count",
    ):
        assert getattr(m, field) is not None, field

    body = {"model": MODEL, "prompt": "a b c d", "max_tokens": 3000}
    tasks = [asyncio.create_task(_post(http, base + "/v1/completions", body)) for _ in range(4)]
    try:
        seen: list[EngineMetrics] = []

        async def waiting() -> bool:
            seen.append(await _metrics(http, base))
            return (seen[-1].waiting or 0) > 0

        await _until(waiting, "waiting requests")
        assert seen[-1].running == 2  # max_num_seqs
        assert seen[-1].kv_usage is not None and seen[-1].kv_usage > 0
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    engine = emu.endpoints["gpu-0"].engine
    await _until(lambda: not engine.has_unfinished(), "aborts")

    status, _ = await _post(http, base + "/v1/completions", {**body, "max_tokens": 3})
    assert status == 200
    m = await _metrics(http, base)
    assert m.ttft_count and m.ttft_count >= 1 and m.itl_count and m.itl_count >= 2
    assert m.generation_tokens_total and m.generation_tokens_total >= 3


async def test_token_id_prompts_tokenize_and_render(
    emu: EmulatorHandle, http: aiohttp.ClientSession
) -> None:
    base = emu.urls["gpu-0"]
    ids = list(range(1000, 1040))
    _, body = await _post(
        http, base + "/v1/completions", {"model": MODEL, "prompt": ids, "max_tokens": 2}
    )
    assert body["usage"]["prompt_tokens"] == 40
    _, again = await _post(
        http, base + "/v1/completions", {"model": MODEL, "prompt": [ids], "max_tokens": 2}
    )
    assert again["usage"]["prompt_tokens_details"]["cached_tokens"] == 32

    _, tok = await _post(http, base + "/tokenize", {"model": MODEL, "prompt": "the cat sat"})
    assert tok["count"] == 3 and tok["tokens"] == token_ids("the cat sat")
    assert tok["max_model_len"] == 4096
    _, detok = await _post(http, base + "/detokenize", {"model": MODEL, "tokens": tok["tokens"]})
    assert detok["prompt"] == "the cat sat"
    _, chat = await _post(
        http,
        base + "/v1/chat/completions/render",
        {"model": MODEL, "messages": [{"role": "user", "content": "x y"}]},
    )
    assert chat["token_ids"] == token_ids("x y")
    _, comp = await _post(http, base + "/v1/completions/render", {"model": MODEL, "prompt": ids})
    assert comp[0]["token_ids"] == ids

    async with http.get(base + "/v1/models") as r:
        models = await r.json()
    assert [m["id"] for m in models["data"]] == [MODEL]
    async with http.get(base + "/health") as r:
        assert r.status == 200
    async with http.get(base + "/get_load") as r:
        assert (await r.json())["load"] == 0
    async with http.get(base + "/get_server_info") as r:
        assert (await r.json())["max_total_num_tokens"] == 1024 * 16


async def test_errors(emu: EmulatorHandle, http: aiohttp.ClientSession) -> None:
    base = emu.urls["gpu-0"]
    status, body = await _post(
        http,
        base + "/v1/chat/completions",
        {"model": "nope", "messages": [{"role": "user", "content": "hi"}]},
    )
    assert status == 404 and body["error"]["code"] == 404
    assert body["error"] == {"message": f"The model `nope` does not exist. Valid aliases: {MODEL}.",
                             "type": "NotFoundError", "param": "model", "code": 404}  # vLLM 0.32
    async with http.post(base + "/v1/completions", data=b"{not json") as r:
        assert r.status == 400 and "error" in await r.json()
    # what vLLM 0.32 answers (its renderers/params.py, SamplingParams; harden27)
    long_prompt = " ".join(["w"] * 4200)
    status, body = await _post(
        http, base + "/v1/completions", {"model": MODEL, "prompt": long_prompt}
    )
    assert (status, body) == (400, {"error": {
        "message": "This model's maximum context length is 4096 tokens. However, your prompt "
                   "contains at least 4097 input tokens, which exceeds this limit even without "
                   "any output tokens. Please reduce the length of the input prompt. "
                   "(parameter=input_tokens, value=4097)",
        "type": "BadRequestError", "param": "input_tokens", "code": 400}})
    status, body = await _post(
        http, base + "/v1/completions", {"model": MODEL, "prompt": list(range(4100))}
    )
    assert status == 400 and "prompt contains 4100 input tokens" in body["error"]["message"]
    status, body = await _post(
        http, base + "/v1/completions", {"model": MODEL, "prompt": "a", "max_tokens": 5000}
    )
    assert (status, body) == (400, {"error": {
        "message": "max_tokens=5000 cannot be greater than max_model_len=4096. Please request "
                   "fewer output tokens. (parameter=max_tokens, value=5000)",
        "type": "BadRequestError", "param": "max_tokens", "code": 400}})
    status, body = await _post(http, base + "/v1/chat/completions", {
        "model": MODEL, "max_completion_tokens": 5000,
        "messages": [{"role": "user", "content": "hi"}]})
    assert status == 400 and body["error"]["param"] == "max_completion_tokens"
    # a prompt and max_tokens over the context together: max_tokens is cut to the room left
    status, body = await _post(http, base + "/v1/completions", {
        "model": MODEL, "prompt": list(range(4090)), "max_tokens": 100})
    assert status == 200 and body["usage"]["completion_tokens"] == 6, body
    for prompt, asked in ((list(range(4096)), None), ("a", 0)):  # no room left, or none asked
        status, body = await _post(http, base + "/v1/completions", {
            "model": MODEL, "prompt": prompt, **({} if asked is None else {"max_tokens": asked})})
        assert (status, body["error"]["message"]) == (
            400, "max_tokens must be at least 1, got 0. (parameter=max_tokens, value=0)"), body


async def test_embeddings(emu: EmulatorHandle, http: aiohttp.ClientSession) -> None:
    base = emu.urls["emb-0"]
    req = {"model": "bge-large", "input": ["one two three", "four"]}
    status, body = await _post(http, base + "/v1/embeddings", req)
    assert status == 200 and body["object"] == "list"
    assert [d["index"] for d in body["data"]] == [0, 1]
    assert body["usage"]["prompt_tokens"] == 4
    _, again = await _post(http, base + "/v1/embeddings", req)
    assert again["data"][0]["embedding"] == body["data"][0]["embedding"]  # deterministic
    assert body["data"][0]["embedding"] != body["data"][1]["embedding"]
    status, _ = await _post(
        http, emu.urls["gpu-0"] + "/v1/embeddings", {"model": MODEL, "input": "x"}
    )
    assert status == 400
    # over the context: vLLM 0.32's words, as for a prompt (renderers/params.py, read in its
    # source: embeddings are checked by the same _token_len_check)
    for item, said in (("w " * 600, "at least 513"), (list(range(5, 605)), "600")):
        status, body = await _post(http, base + "/v1/embeddings", {"model": "bge-large",
                                                                   "input": item})
        count = said.split()[-1]
        assert status == 400 and body["error"] == {
            "message": "This model's maximum context length is 512 tokens. However, your prompt "
                       f"contains {said} input tokens, which exceeds this limit even without any "
                       "output tokens. Please reduce the length of the input prompt. "
                       f"(parameter=input_tokens, value={count})",
            "type": "BadRequestError", "param": "input_tokens", "code": 400}, body


async def test_client_disconnect_aborts_the_engine_request(
    emu: EmulatorHandle, http: aiohttp.ClientSession
) -> None:
    base, engine = emu.urls["gpu-0"], emu.endpoints["gpu-0"].engine
    finished = engine.num_finished_total
    body = {"model": MODEL, "prompt": "a b c", "max_tokens": 4000, "stream": True}
    resp = await http.post(base + "/v1/completions", json=body)
    await resp.content.readline()  # the first token arrived: the request is running
    assert engine.num_running == 1
    resp.close()  # drop the connection mid-stream
    await _until(lambda: engine.num_running == 0, "the abort")
    assert engine.num_finished_total == finished  # aborted, not completed
    m = await _metrics(http, base)
    assert m.running == 0 and m.kv_usage == 0


async def test_provider_rate_limit_and_rtt(http: aiohttp.ClientSession) -> None:
    handle = await start_emulator(
        _config(),
        time_scale=10.0,
        port_override=PORTS,
        only=["prov-0"],
        rate_limit_override={"prov-0": 2},
    )
    try:
        assert set(handle.urls) == {"prov-0"}
        assert handle.endpoints["prov-0"].network_rtt_s > 0
        url = handle.urls["prov-0"] + "/v1/completions"
        body = {"model": MODEL, "prompt": "hi", "max_tokens": 1}
        assert (await _post(http, url, body))[0] == 200
        assert (await _post(http, url, body))[0] == 200
        async with http.post(url, json=body) as r:
            assert r.status == 429
            assert int(r.headers["Retry-After"]) >= 1
            assert (await r.json())["error"]["code"] == 429
    finally:
        await handle.stop()


async def test_kv_events_over_zmq(http: aiohttp.ClientSession) -> None:
    port = _free_port()
    handle = await start_emulator(
        _config(port), time_scale=20.0, port_override=PORTS, only=["gpu-0"]
    )
    ctx = zmq.asyncio.Context()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.connect(f"tcp://127.0.0.1:{port}")
    try:
        url = handle.urls["gpu-0"] + "/v1/completions"
        frames: list[bytes] | None = None
        for i in range(200):  # a PUB drops what it sends before the subscription lands
            await _post(http, url, {"model": MODEL, "prompt": f"p{i} " * 40, "max_tokens": 1})
            if await sub.poll(50):
                frames = await sub.recv_multipart()
                break
        assert frames is not None, "no KV event batch received"
        topic, seq, payload = frames
        assert topic == b"" and len(seq) == 8
        _, events, rank = decode_event_batch(payload)
        assert rank == 0
        stored = [e for e in events if isinstance(e, BlockStored)]
        assert stored and stored[0].block_size == 16
        assert len(stored[0].token_ids) == 16 * len(stored[0].block_hashes)
    finally:
        sub.close()
        ctx.term()
        await handle.stop()


async def test_port_in_use_names_the_endpoint_and_stops_the_rest() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = busy.getsockname()[1]
        ports = {"gpu-0": 0, "emb-0": taken, "prov-0": 0}
        with pytest.raises(EmulatorError, match=rf"emb-0.*{taken}"):
            await start_emulator(_config(), port_override=ports)
        # gpu-0 started first and was stopped again: its port can be taken once more
        handle = await start_emulator(_config(), port_override={**ports, "emb-0": 0})
        await handle.stop()
