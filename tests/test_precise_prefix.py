"""Precise prefix affinity: emulated engines publish KV events over ZMQ, the gateway mirrors them
in its prefix index, and placement sends a repeated prompt to the engine that holds its blocks."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from typing import Any

import aiohttp

from inferplane.api.app import serve
from inferplane.api.pipeline import Gateway
from inferplane.config.loader import parse_config
from inferplane.twin.emulator.server import start_emulator
from inferplane.twin.traces.tokens import block_text
from tests.builders import endpoint, model, pool_fleet, tenant, to_yaml
from tests.support.procs import free_port

KEY = "sk-precise"


def fleet_yaml(ports: list[int], ev_ports: list[int], gw: int, *, block_size: int = 16,
               tenants: Sequence[Mapping[str, Any]] | None = None) -> str:
    """Emulated engines ``e0``.. at ``ports`` publishing KV events on ``ev_ports``; one tenant
    ``t`` (key `KEY`) unless ``tenants`` are given. tests/test_tenant_affinity.py uses it too."""
    return to_yaml(pool_fleet(
        gateway={"port": gw, "token_estimate": "words", "scrape_interval_s": 0.05},
        substrate={"cost": {"hourly_usd": 3.0}},
        endpoints=[
            endpoint(f"e{i}", p, kv_events=f"tcp://127.0.0.1:{ev}",
                     models=[model("llama-3.1-8b", None, 32768)],
                     emulation={"block_size": block_size, "num_gpu_blocks": 4096,
                                "kv_events_port": ev})
            for i, (p, ev) in enumerate(zip(ports, ev_ports, strict=True))
        ],
        tenants=tenants if tenants is not None else [tenant("t", KEY)],
    ))


async def test_kv_events_drive_placement_to_the_cached_engine() -> None:
    ports, evs = [free_port() for _ in range(3)], [free_port() for _ in range(3)]
    gw_port = free_port()
    config = parse_config(fleet_yaml(ports, evs, gw_port))
    emu = await start_emulator(config, time_scale=50.0)
    gateway = Gateway(config)
    runner = await serve(gateway, "127.0.0.1", gw_port)
    try:
        assert gateway.prefix_index is not None
        await asyncio.sleep(0.3)  # let the SUB sockets connect (ZMQ drops messages before that)
        prompt = block_text(4242, 2048)
        body = {"model": "llama-3.1-8b", "max_tokens": 4,
                "messages": [{"role": "user", "content": prompt}]}
        url = f"http://127.0.0.1:{gw_port}/v1/chat/completions"
        headers = {"Authorization": f"Bearer {KEY}"}
        async with aiohttp.ClientSession() as s:
            async with s.post(url, json=body, headers=headers) as r:
                assert r.status == 200, await r.text()
                first = r.headers["x-inferplane-endpoint"]
            for _ in range(100):  # the engine's BlockStored events reach the index
                if gateway.prefix_index.size(first) >= 2048 // 16 - 1:
                    break
                await asyncio.sleep(0.02)
            assert gateway.prefix_index.covers(first)
            assert gateway.prefix_index.size(first) >= 100
            assert gateway.kv_events is not None and gateway.kv_events.events_applied > 0
            for _ in range(3):
                async with s.post(url, json=body, headers=headers) as r:
                    assert r.status == 200
                    assert r.headers["x-inferplane-endpoint"] == first
                    did = r.headers["x-inferplane-decision-id"]
                rec = gateway.ledger.get(did)
                assert rec is not None
                chosen = next(c for c in rec["candidates"] if c["endpoint"] == first)
                assert chosen["annotations"]["prefix_match"] > 0
                assert rec["outcome"]["cached_tokens"] >= 2048 - 16
    finally:
        await runner.cleanup()
        await emu.stop()
