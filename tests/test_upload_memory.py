"""A large batch upload streams to disk (issue 12 item 3): the gateway's Python heap never holds
the file. The upload comes from a curl child process, so the test's heap is the gateway's; the
peak is read with tracemalloc (bytes, not time). bench/upload_rss.py measures the process RSS."""

from __future__ import annotations

import asyncio
import json
import shutil
import tracemalloc
from pathlib import Path

import pytest
from aiohttp import web

from inferplane.api.app import serve
from inferplane.api.pipeline import Gateway
from inferplane.config.loader import parse_config
from tests.builders import model, pool_fleet, tenant, to_yaml
from tests.support.procs import free_port

KEY = "sk-upload"
MB = 1 << 20


async def _empty(request: web.Request) -> web.Response:
    return web.Response(text="")


@pytest.mark.skipif(shutil.which("curl") is None, reason="needs curl")
async def test_a_20_mb_upload_never_sits_in_memory(tmp_path: Path) -> None:
    line = json.dumps({"custom_id": "c{}", "method": "POST", "url": "/v1/chat/completions",
                       "body": {"model": "m", "messages": [{"role": "user",
                                                            "content": "x" * 300}]}})
    src = tmp_path / "in.jsonl"
    with src.open("w") as f:
        for i in range(20 * MB // len(line)):
            f.write(line.replace("c{}", f"c{i}") + "\n")
    up = web.Application()
    up.router.add_get("/health", _empty)
    up.router.add_get("/metrics", _empty)
    up_runner = web.AppRunner(up)
    await up_runner.setup()
    up_port = free_port()
    await web.TCPSite(up_runner, "127.0.0.1", up_port).start()
    cfg = to_yaml(pool_fleet(
        up_port, substrate={"cost": {"hourly_usd": 1.0}}, models=[model(max_context=4096)],
        endpoint_fields={"name": "up"},
        gateway={"scrape_interval_s": 0.05, "ledger_path": str(tmp_path / "ledger.sqlite")},
        batch={"max_file_bytes": 64 * MB, "max_lines": 1000000}, tenants=[tenant("a", KEY)]))
    port = free_port()
    runner = await serve(Gateway(parse_config(cfg)), "127.0.0.1", port)
    tracemalloc.start()
    try:
        curl = await asyncio.create_subprocess_exec(
            "curl", "-sS", "-H", f"Authorization: Bearer {KEY}", "-F", "purpose=batch",
            "-F", f"file=@{src}", f"http://127.0.0.1:{port}/v1/files",
            stdout=asyncio.subprocess.PIPE,
        )
        out, _ = await curl.communicate()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
        await runner.cleanup()
        await up_runner.cleanup()
    answer = json.loads(out)
    assert answer["object"] == "file" and answer["bytes"] == src.stat().st_size, answer
    assert peak < 6 * MB, f"peak Python heap {peak / MB:.1f} MB during a 20 MB upload"
