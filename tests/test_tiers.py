"""Tiered model routing (issue 10 item 3): one model alias served by an 8B and a 70B, a policy
per class and tenant that picks the tier per request, the reason recorded, and the answer naming
the model that served it."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from inferplane.api.app import serve
from inferplane.api.pipeline import Gateway
from inferplane.config.loader import parse_config
from inferplane.config.schema import ModelAlias
from inferplane.errors import ConfigError
from inferplane.placement.tiers import choose_tier
from tests.builders import endpoint, model, pool_fleet, tenant, to_yaml
from tests.support.fake_upstream import build
from tests.support.procs import free_port

ALIAS = ModelAlias.model_validate({
    "name": "llama",
    "tiers": [
        {"model": "m-8b", "quality": 1, "max_prompt_tokens": 4000},
        {"model": "m-70b", "quality": 2},
    ],
    "rules": [
        {"tenants": ["premium"], "min_quality": 2},
        {"classes": ["agent-step"], "max_ttft_slo_ms": 1000},
        {"classes": ["critical"], "prefer": "best"},
    ],
})


@pytest.mark.parametrize(
    ("cls", "tenant", "prompt", "slo", "model", "why"),
    [
        ("interactive", "t", 100, 1.0, "m-8b", "no rule"),  # cheapest that fits
        ("interactive", "t", 9000, 1.0, "m-70b", "prompt 9000 tokens"),  # too long for the 8B
        ("interactive", "premium", 100, 1.0, "m-70b", "quality ≥ 2"),  # the tenant's floor
        ("agent-step", "t", 100, 0.8, "m-8b", "TTFT SLO ≤ 1000 ms"),  # tight SLO: small tier
        ("critical", "t", 100, 0.5, "m-70b", "best of 2 qualifying tiers"),
    ],
)
def test_the_policy_picks_the_tier_and_says_why(
    cls: str, tenant: str, prompt: int, slo: float, model: str, why: str
) -> None:
    c = choose_tier(ALIAS, workload_class=cls, tenant=tenant, prompt_tokens=prompt,
                    ttft_slo_s=slo)
    assert c.model == model and why in c.reason and c.reason.startswith(f"llama → {model}")


def test_nothing_qualifies_falls_back_to_the_best_that_takes_the_prompt() -> None:
    alias = ModelAlias.model_validate({
        "name": "a", "tiers": [{"model": "s", "quality": 1, "max_prompt_tokens": 10},
                               {"model": "l", "quality": 2, "max_prompt_tokens": 100}],
        "rules": [{"min_quality": 5}],
    })
    c = choose_tier(alias, workload_class="x", tenant="t", prompt_tokens=50, ttft_slo_s=None)
    assert c.model == "l" and "no tier qualifies" in c.reason


KEY, PREMIUM = "sk-tier", "sk-premium"


def _fleet(port: int, up: int) -> dict[str, Any]:
    return pool_fleet(
        gateway={"port": port, "scrape_interval_s": 0.05, "token_estimate": "words"},
        substrate={"cost": {"hourly_usd": 3.0}},
        endpoints=[endpoint("small", up, models=[model("m-8b")]),
                   endpoint("large", up + 1, models=[model("m-70b")])],
        tenants=[tenant("t", KEY), tenant("premium", PREMIUM)],
        model_aliases=[{
            "name": "llama",
            "tiers": [{"model": "m-8b", "quality": 1, "max_prompt_tokens": 50},
                      {"model": "m-70b", "quality": 2}],
            "rules": [{"tenants": ["premium"], "min_quality": 2}],
        }],
    )


@pytest.fixture
async def stack() -> AsyncIterator[tuple[Gateway, str]]:
    up = free_port()
    while True:  # two consecutive free ports for the two fake engines
        try:
            runners = []
            for i in range(2):
                r = web.AppRunner(build(f"up{i}", "ok", 0.0))
                await r.setup()
                await web.TCPSite(r, "127.0.0.1", up + i).start()
                runners.append(r)
            break
        except OSError:
            for r in runners:
                await r.cleanup()
            up = free_port()
    port = free_port()
    gw = Gateway(parse_config(to_yaml(_fleet(port, up))))
    runner = await serve(gw, "127.0.0.1", port)
    try:
        yield gw, f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()
        for r in runners:
            await r.cleanup()


async def _ask(base: str, key: str, words: int, stream: bool = False) -> tuple[Any, Any]:
    body = {"model": "llama", "max_tokens": 5, "stream": stream,
            "messages": [{"role": "user", "content": " ".join(["w"] * words)}]}
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {key}"}) as s:
        async with s.post(f"{base}/v1/chat/completions", json=body) as r:
            assert r.status == 200, await r.text()
            text = await r.text()
            headers = r.headers
        async with s.get(f"{base}/v1/decisions/{headers['x-inferplane-decision-id']}") as r:
            rec = await r.json()
    return headers, (text, rec)


async def test_the_alias_is_served_by_the_chosen_tier_and_the_answer_says_which(
    stack: tuple[Gateway, str],
) -> None:
    _, base = stack
    h, (text, rec) = await _ask(base, KEY, 10)
    assert h["x-inferplane-model"] == "m-8b" and h["x-inferplane-endpoint"] == "small"
    assert '"model": "m-8b"' in text  # the engine was asked for the tier, and says so
    assert rec["request"]["model"] == "m-8b" and rec["request"]["model_alias"] == "llama"
    assert "llama → m-8b: no rule" in rec["request"]["tier_reason"]
    h, (text, rec) = await _ask(base, KEY, 200, stream=True)  # beyond the 8B tier's prompts
    assert h["x-inferplane-model"] == "m-70b" and '"model": "m-70b"' in text
    h, (_, rec) = await _ask(base, PREMIUM, 10)  # the premium tenant's quality floor
    assert h["x-inferplane-model"] == "m-70b"
    assert "rule 0 (tenant premium); quality ≥ 2" in rec["request"]["tier_reason"]
    async with (
        aiohttp.ClientSession(headers={"Authorization": f"Bearer {KEY}"}) as s,
        s.get(f"{base}/v1/models") as r,
    ):
        ids = {m["id"]: m for m in (await r.json())["data"]}
    assert ids["llama"]["tiers"] == ["m-8b", "m-70b"]


def test_alias_config_errors_name_the_field() -> None:
    bad = _fleet(1, 2)
    bad["model_aliases"][0]["tiers"][1] = {"model": "m-405b", "quality": 3}
    with pytest.raises(ConfigError, match=r"model_aliases\[0\]\.tiers\[1\]\.model"):
        parse_config(to_yaml(bad))
    bad = _fleet(1, 2)
    bad["model_aliases"][0]["rules"][0]["tenants"] = ["nobody"]
    with pytest.raises(ConfigError, match=r"rules\[0\]\.tenants\[0\]: unknown tenant"):
        parse_config(to_yaml(bad))
    bad = _fleet(1, 2)
    bad["model_aliases"][0]["name"] = "m-8b"
    with pytest.raises(ConfigError, match="a served model's name"):
        parse_config(to_yaml(bad))
