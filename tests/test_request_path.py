"""The request path's bookkeeping, in process: what non-streamed and streamed answers feed back
into fleet state, usage accounting when the client did not ask for it, and request sizing."""

from __future__ import annotations

import aiohttp
import pytest
from aiohttp import web

from inferplane.api.app import serve
from inferplane.api.pipeline import Gateway
from inferplane.config.loader import parse_config
from inferplane.dispatch.upstream import SSEUsageFilter
from tests.builders import model, pool_fleet, tenant, to_yaml
from tests.support.fake_upstream import build
from tests.support.procs import free_port

KEY = "sk-path"


async def _stack() -> tuple[Gateway, web.AppRunner, web.AppRunner, str]:
    up_port, gw_port = free_port(), free_port()
    up = web.AppRunner(build("up", "ok", 0.0))
    await up.setup()
    await web.TCPSite(up, "127.0.0.1", up_port).start()
    config = parse_config(to_yaml(pool_fleet(
        up_port, gateway={"port": gw_port}, endpoint_fields={"name": "e"},
        tenants=[tenant("t", KEY)])))
    gw = Gateway(config)
    runner = await serve(gw, "127.0.0.1", gw_port)
    return gw, runner, up, f"http://127.0.0.1:{gw_port}/v1/chat/completions"


CHAT = {"model": "m", "messages": [{"role": "user", "content": "hello there"}], "max_tokens": 5}


async def test_non_streamed_answers_feed_no_ttft_and_release_pending_prefill() -> None:
    gw, runner, up, url = await _stack()
    try:
        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {KEY}"}) as s:
            for _ in range(3):
                async with s.post(url, json=CHAT) as r:
                    assert r.status == 200
            rec = gw.live.live["e"]
            assert len(rec.ttft) == 0 and len(rec.ttft_ratio) == 0  # whole answer ≠ TTFT
            assert rec.pending_prefill == 0 and rec.pending_prefill_tokens == 0
            assert rec.inflight == 0
            async with s.post(url, json={**CHAT, "stream": True}) as r:
                await r.read()
            assert len(rec.ttft) == 1 and len(rec.ttft_ratio) == 1
            assert rec.pending_prefill == 0 and rec.inflight == 0
    finally:
        await runner.cleanup()
        await up.cleanup()


async def test_stream_without_include_usage_is_still_accounted() -> None:
    gw, runner, up, url = await _stack()
    try:
        async with (
            aiohttp.ClientSession(headers={"Authorization": f"Bearer {KEY}"}) as s,
            s.post(url, json={**CHAT, "stream": True}) as r,
        ):
            text = (await r.read()).decode()
            did = r.headers["x-inferplane-decision-id"]
        assert '"usage"' not in text  # the client did not ask for the usage chunk
        assert text.rstrip().endswith("data: [DONE]") and text.count("data:") == 6
        outcome = gw.ledger.get(did)["outcome"]  # type: ignore[index]
        assert outcome["completion_tokens"] == 5 and outcome["prompt_tokens"] == 7
        assert outcome["cost_usd"] == pytest.approx((7 * 1.0 + 5 * 2.0) / 1e6)
    finally:
        await runner.cleanup()
        await up.cleanup()


@pytest.mark.parametrize("split", [1, 7, 40, 10_000])
def test_sse_usage_filter_across_chunk_boundaries(split: int) -> None:
    stream = (
        b'data: {"choices":[{"delta":{"content":"a"}}]}\n\n'
        b'data: {"choices": [], "usage": {"completion_tokens": 1}}\n\n'
        b"data: [DONE]\n\n"
    )
    f = SSEUsageFilter()
    out = b"".join(f.feed(stream[i : i + split]) for i in range(0, len(stream), split))
    out += f.flush()
    assert out == b'data: {"choices":[{"delta":{"content":"a"}}]}\n\ndata: [DONE]\n\n'


@pytest.mark.parametrize(
    ("body", "sequences"),
    [
        ({"prompt": "a b c"}, 1),
        ({"prompt": "a b c", "n": 3}, 3),
        ({"prompt": ["a b", "c d"], "n": 2}, 4),
        ({"prompt": [[1, 2], [3, 4], [5]]}, 3),
    ],
)
def test_n_and_prompt_lists_size_the_worst_case(body: dict[str, object], sequences: int) -> None:
    from inferplane.placement.classify import Classifier

    config = parse_config(to_yaml(pool_fleet(
        1, substrate={"name": "p", "region": "r", "cost": {"hourly_usd": 1}},
        models=[model(max_context=99)], key=KEY)))
    profile, _ = Classifier(config).classify(
        request_id="r", api="completions", body={"model": "m", "max_tokens": 10, **body},
        headers={}, tenant=config.tenants[0],
    )
    assert profile.max_output_tokens == 10  # per sequence: the context window checks this
    assert profile.sequences == sequences
    assert profile.max_total_output_tokens == 10 * sequences
