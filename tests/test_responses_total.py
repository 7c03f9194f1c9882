"""Every answer a client gets from the gateway's API listener is counted once in
``inferplane_responses_total{api, code}`` (issue 13 follow-ups): answers from an endpoint,
streamed or not, and every refusal before one (auth, malformed JSON or HTTP, oversize body,
unknown model, rate limit, nothing eligible, all attempts failed, a connection past the
per-client limit), a client gone (499), the batch and evidence APIs; scrapes and probes are not.

A real gateway on loopback in front of in-process fake engines (`tests.support.fake_upstream`);
each case compares the whole family on ``/metrics`` before and after its requests."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from inferplane.api.app import RESPONSE_API_PREFIXES, RESPONSE_APIS, serve
from inferplane.api.pipeline import Gateway
from inferplane.api.server import GatewayServer
from inferplane.config.loader import parse_config
from inferplane.telemetry.metrics import RESPONSE_API_LABELS, GatewayMetrics
from tests.builders import endpoint, model, pool_fleet, tenant, to_yaml
from tests.support.fake_upstream import STATS, build
from tests.support.procs import free_port

KEY, RATE_KEY, US_KEY = "sk-resp", "sk-resp-rate", "sk-resp-us"
CHAT = {"model": "m", "messages": [{"role": "user", "content": "hello there"}], "max_tokens": 5}
MAX_BODY = 8192
MAX_CONNECTIONS = 4
# endpoint name -> fake engine mode; each serves the model of its own name, `ok` serves "m"
ENGINES = {"ok": "ok", "bad": "fail500", "cut": "cut", "slow": "slow", "hang": "hang"}

Counts = dict[tuple[str, str], float]


@dataclass
class Stack:
    base: str
    port: int
    session: aiohttp.ClientSession
    runner: web.AppRunner

    async def page(self) -> str:
        async with self.session.get(f"{self.base}/metrics") as r:
            assert r.status == 200
            return await r.text()

    async def counts(self) -> Counts:
        """``inferplane_responses_total`` by (api, code), read over HTTP."""
        out: Counts = {}
        for family in text_string_to_metric_families(await self.page()):
            if family.name == "inferplane_responses":
                assert family.type == "counter"
                for s in family.samples:
                    if s.name == "inferplane_responses_total":
                        out[(s.labels["api"], s.labels["code"])] = s.value
        return out

    async def post(self, path: str, body: Any = None, key: str | None = KEY,
                   **kw: Any) -> int:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        if "data" in kw:  # raw bytes go as JSON (aiohttp would say octet-stream: a 415)
            headers["Content-Type"] = "application/json"
        if body is not None:
            kw["json"] = body
        async with self.session.post(self.base + path, headers=headers, **kw) as r:
            await r.read()
            return r.status

    async def get(self, path: str, key: str | None = KEY) -> int:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        async with self.session.get(self.base + path, headers=headers) as r:
            await r.read()
            return r.status


@pytest.fixture
async def stack() -> AsyncIterator[Stack]:
    runners = []
    ports = {}
    for name, mode in ENGINES.items():
        r = web.AppRunner(build(name, mode, 0.0), handler_cancellation=True)
        await r.setup()
        ports[name] = free_port()
        await web.TCPSite(r, "127.0.0.1", ports[name]).start()
        runners.append(r)
    gw_port = free_port()
    cfg = parse_config(to_yaml(pool_fleet(
        gateway={"port": gw_port, "scrape_interval_s": 0.05, "max_body_bytes": MAX_BODY,
                 "max_connections_per_client": MAX_CONNECTIONS, "metrics": {"public": True}},
        substrate={"cost": {"hourly_usd": 3.0}},
        health={"outlier": {"interval_s": 60}},
        endpoints=[endpoint(name, ports[name], models=(
            [model("m"), model("emb", profile="llama-3.1-8b", kind="embed")] if name == "ok"
            else [model(name)])) for name in ENGINES],
        tenants=[tenant("t", KEY),
                 tenant("rate", RATE_KEY, rate_limits=[{"scope": "key", "requests_per_min": 1}]),
                 tenant("us", US_KEY, allowed_jurisdictions=["us"])],
    )))
    gateway = await serve(Gateway(cfg), "127.0.0.1", gw_port)
    runners.append(gateway)
    try:
        # a connection per request: none held between them (see the connection limit case)
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20),
                                         connector=aiohttp.TCPConnector(force_close=True)) as s:
            yield Stack(f"http://127.0.0.1:{gw_port}", gw_port, s, gateway)
    finally:
        for r in reversed(runners):
            await r.cleanup()


async def _raw(port: int, data: bytes) -> bytes:
    """Send ``data`` on a fresh connection; everything the gateway answers until it closes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        return await asyncio.wait_for(reader.read(), 5)
    finally:
        writer.close()


async def _client_leaves_stream(st: Stack) -> None:
    """Read the head and first event of a slow stream, then close the connection."""
    async with aiohttp.ClientSession() as s, s.post(f"{st.base}/v1/chat/completions",
                      json={**CHAT, "model": "slow", "stream": True},
                      headers={"Authorization": f"Bearer {KEY}"}) as r:
        assert r.status == 200
        await r.content.readline()


async def _client_leaves_while_waiting(st: Stack) -> None:
    """Close the connection once the engine (which never answers) has the request: synchronised
    on the engine's request count, not on a client timeout."""
    seen = STATS["requests"]
    body = json.dumps({**CHAT, "model": "hang"}).encode()
    _, writer = await asyncio.open_connection("127.0.0.1", st.port)
    try:
        writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                     b"Authorization: Bearer " + KEY.encode() + b"\r\n"
                     b"Content-Type: application/json\r\n"
                     b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        await writer.drain()
        for _ in range(250):  # until the engine has it (bounded)
            if STATS["requests"] > seen:
                break
            await asyncio.sleep(0.02)
        assert STATS["requests"] > seen
    finally:
        writer.close()


async def _rate_limited(st: Stack) -> None:
    assert await st.post("/v1/chat/completions", CHAT, key=RATE_KEY) == 200
    assert await st.post("/v1/chat/completions", CHAT, key=RATE_KEY) == 429


async def _malformed_http(st: Stack) -> None:
    got = await _raw(st.port, b"GET /v1/models HTTP/1.1\r\nHost: x\r\nHost: y\r\n\r\n")
    assert got.split(b" ", 2)[1] == b"400"


async def _past_the_connection_limit(st: Stack) -> None:
    held = [await asyncio.open_connection("127.0.0.1", st.port) for _ in range(MAX_CONNECTIONS)]
    try:
        got = await _raw(st.port, b"")
        assert got.startswith(b"HTTP/1.1 429")
    finally:
        for _, w in held:
            w.close()
    server = st.runner.server
    assert isinstance(server, GatewayServer)
    for _ in range(100):  # until the gateway has seen them close (bounded)
        if not server.per_client:
            break
        await asyncio.sleep(0.02)


async def _probes_and_scrapes(st: Stack) -> None:
    assert await st.get("/health") == 200
    assert await st.get("/ready") in (200, 503)
    assert await st.get("/metrics", key=None) == 200


def _expect(status: int, call: Callable[[Stack], Awaitable[int]]) -> Callable[[Stack],
                                                                                Awaitable[None]]:
    async def run(st: Stack) -> None:
        assert await call(st) == status

    return run


CASES: dict[str, tuple[Callable[[Stack], Awaitable[None]], Counts]] = {
    "answered": (_expect(200, lambda s: s.post("/v1/chat/completions", CHAT)),
                 {("chat", "200"): 1}),
    "streamed": (_expect(200, lambda s: s.post("/v1/chat/completions",
                                               {**CHAT, "stream": True})),
                 {("chat", "200"): 1}),
    "completions": (_expect(200, lambda s: s.post(
        "/v1/completions", {"model": "m", "prompt": "hi", "max_tokens": 5, "stream": True})),
        {("completions", "200"): 1}),
    "embeddings": (_expect(200, lambda s: s.post("/v1/embeddings",
                                                 {"model": "emb", "input": "hi"})),
                   {("embeddings", "200"): 1}),
    "no key": (_expect(401, lambda s: s.post("/v1/chat/completions", CHAT, key=None)),
               {("chat", "401"): 1}),
    "malformed json": (_expect(400, lambda s: s.post("/v1/chat/completions", data=b"{nope")),
                       {("chat", "400"): 1}),
    "oversize body": (_expect(413, lambda s: s.post("/v1/chat/completions",
                                                    data=b"x" * (MAX_BODY + 1))),
                      {("chat", "413"): 1}),
    "unknown model": (_expect(404, lambda s: s.post("/v1/chat/completions",
                                                    {**CHAT, "model": "nope"})),
                      {("chat", "404"): 1}),
    "rate limited": (_rate_limited, {("chat", "200"): 1, ("chat", "429"): 1}),
    "nothing eligible": (_expect(503, lambda s: s.post("/v1/chat/completions", CHAT,
                                                       key=US_KEY)),
                         {("chat", "503"): 1}),
    "all attempts failed": (_expect(502, lambda s: s.post("/v1/chat/completions",
                                                          {**CHAT, "model": "bad"})),
                            {("chat", "502"): 1}),
    "stream cut by the engine": (_expect(200, lambda s: s.post(
        "/v1/chat/completions", {**CHAT, "model": "cut", "stream": True})),
        {("chat", "502"): 1}),
    "client left a stream": (_client_leaves_stream, {("chat", "499"): 1}),
    "client left while waiting": (_client_leaves_while_waiting, {("chat", "499"): 1}),
    "wrong method": (_expect(405, lambda s: s.get("/v1/chat/completions")),
                     {("chat", "405"): 1}),
    "models": (_expect(200, lambda s: s.get("/v1/models")), {("models", "200"): 1}),
    "batches": (_expect(200, lambda s: s.get("/v1/batches")), {("batches", "200"): 1}),
    "files without a key": (_expect(401, lambda s: s.post("/v1/files", key=None)),
                            {("files", "401"): 1}),
    "unknown decision": (_expect(404, lambda s: s.get("/v1/decisions/nope")),
                         {("decisions", "404"): 1}),
    "usage": (_expect(200, lambda s: s.get("/v1/usage")), {("usage", "200"): 1}),
    "admin with a tenant key": (_expect(403, lambda s: s.get("/v1/fleet/health")),
                                {("admin", "403"): 1}),
    "unknown route": (_expect(404, lambda s: s.get("/v2/nothing")), {("other", "404"): 1}),
    "malformed http": (_malformed_http, {("other", "400"): 1}),
    "past the connection limit": (_past_the_connection_limit, {("other", "429"): 1}),
    "probes and scrapes": (_probes_and_scrapes, {}),
}


@pytest.mark.parametrize("case", list(CASES))
async def test_each_answer_is_counted_once_by_api_and_code(stack: Stack, case: str) -> None:
    run, expected = CASES[case]
    before = await stack.counts()
    await run(stack)
    after = await stack.counts()
    for _ in range(100):  # a client gone: the gateway notices it a little later
        if after != before or not expected:
            break
        await asyncio.sleep(0.05)
        after = await stack.counts()
    diff = {k: v - before.get(k, 0.0) for k, v in after.items() if v != before.get(k, 0.0)}
    assert diff == expected


async def test_the_family_is_on_the_page_before_any_answer(stack: Stack) -> None:
    """A scraper sees the family's HELP and TYPE from the start; its series appear with the
    first answer (the page has none before, so a rate over it is empty, not 0, until then)."""
    page = await stack.page()
    assert "# TYPE inferplane_responses_total counter" in page
    assert await stack.counts() == {}


def test_the_api_label_comes_from_a_closed_set() -> None:
    """Every label the gateway's routes map to is in the set `responded` accepts; anything
    else is refused, not turned into a new series."""
    mapped = set(RESPONSE_APIS.values()) | {name for _, name in RESPONSE_API_PREFIXES}
    assert mapped | {"other"} == RESPONSE_API_LABELS
    metrics = GatewayMetrics()
    metrics.responded("chat", 200)
    with pytest.raises(ValueError, match="'/v1/x' is not one of"):
        metrics.responded("/v1/x", 200)
