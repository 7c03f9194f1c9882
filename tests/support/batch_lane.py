"""The batch lane's test environment: an upstream that counts prompts (`Upstream`), a fleet file
with the batch lane on (`config`), a served gateway (`start`), its HTTP client helpers (`Env`)
and JSONL input lines (`line`, `jsonl`)."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson
from aiohttp import web

from inferplane.api.app import serve
from inferplane.api.pipeline import Gateway
from inferplane.batch.routes import BATCH_KEY, BatchService
from inferplane.config.loader import parse_config
from tests.builders import model, pool_fleet, tenant, to_yaml
from tests.support.fake_upstream import chat_app
from tests.support.procs import free_port

KEYS = {"a": "sk-batch-a", "b": "sk-batch-b"}


@dataclass
class Upstream:
    """An OpenAI-style upstream that answers after ``delay`` s and counts each prompt."""

    delay: float = 0.0
    seen: Counter[str] = field(default_factory=Counter)
    port: int = 0

    def app(self) -> web.Application:
        async def reply(prompt: str) -> str:
            self.seen[prompt] += 1
            await asyncio.sleep(self.delay)
            return f"re: {prompt}"

        return chat_app(reply)


def config(up: int, extra: dict[str, Any] | None = None,
           batch: dict[str, Any] | None = None) -> str:
    """The fleet file; ``extra``: more gateway fields; ``batch``: more batch fields."""
    return to_yaml(pool_fleet(
        up, models=[model(max_context=4096)], endpoint_fields={"name": "up", "max_concurrency": 10},
        gateway={"scrape_interval_s": 0.05, "seed": 1, **(extra or {})},
        batch={"poll_interval_s": 0.01, "max_concurrency": 2, "max_file_bytes": 20000,
               **(batch or {})},
        tenants=[tenant("a", KEYS["a"]), tenant("b", KEYS["b"])]))


@dataclass
class Env:
    up: Upstream
    base: str
    gw: Gateway
    runner: web.AppRunner
    http: aiohttp.ClientSession

    @property
    def svc(self) -> BatchService:
        return self.runner.app[BATCH_KEY]

    async def call(self, method: str, path: str, tenant: str = "a", **kw: Any
                   ) -> tuple[int, Any]:
        headers = {"Authorization": f"Bearer {KEYS[tenant]}"}
        async with self.http.request(method, self.base + path, headers=headers, **kw) as r:
            data = await r.read()
            return r.status, orjson.loads(data) if r.content_type == "application/json" else data

    async def upload(self, content: bytes, tenant: str = "a", purpose: str = "batch"
                     ) -> tuple[int, Any]:
        form = aiohttp.FormData()
        form.add_field("purpose", purpose)
        form.add_field("file", content, filename="in.jsonl",
                       content_type="application/jsonl")
        return await self.call("POST", "/v1/files", tenant, data=form)

    async def create(self, content: bytes, tenant: str = "a") -> dict[str, Any]:
        st, f = await self.upload(content, tenant)
        assert st == 200, f
        st, b = await self.call("POST", "/v1/batches", tenant, json={
            "input_file_id": f["id"], "endpoint": "/v1/chat/completions",
            "completion_window": "24h", "metadata": {"job": "t"}})
        assert st == 200, b
        return dict(b)

    async def wait(self, bid: str, *statuses: str, timeout: float = 20.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            st, b = await self.call("GET", f"/v1/batches/{bid}")
            assert st == 200, b
            if b["status"] in statuses:
                return dict(b)
            assert time.monotonic() < deadline, b
            await asyncio.sleep(0.02)


async def start(up: Upstream, extra: dict[str, Any] | None = None,
                batch: dict[str, Any] | None = None) -> tuple[Gateway, web.AppRunner, str]:
    port = free_port()
    gw = Gateway(parse_config(config(up.port, extra, batch)))
    runner = await serve(gw, "127.0.0.1", port)
    return gw, runner, f"http://127.0.0.1:{port}"


def line(cid: str, model: str = "m", **over: Any) -> bytes:
    obj: dict[str, Any] = {"custom_id": cid, "method": "POST", "url": "/v1/chat/completions",
                           "body": {"model": model, "max_tokens": 5,
                                    "messages": [{"role": "user", "content": cid}]}}
    obj.update(over)
    return orjson.dumps(obj)


def jsonl(*lines: bytes) -> bytes:
    return b"\n".join(lines) + b"\n"
