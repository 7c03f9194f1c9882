"""The hard constraints no placement profile can drop: model served, context window, the
tenant's (and request's) jurisdictions, tolerated precisions and the class's capacity rules
apply whatever a profile lists (`inferplane.placement.build.REQUIRED_FILTERS`).

docs25 M1: a profile ran only the filters it listed, so the docs' own example profile ``fast``
(no ``jurisdiction``, in one copy not even ``model-served``) placed an EU-only tenant in the US
and a request on an endpoint that does not serve its model."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from typer.testing import CliRunner

from inferplane.api.app import serve
from inferplane.api.pipeline import Gateway
from inferplane.cli import app
from inferplane.config.loader import parse_config
from inferplane.fleet.model import Fleet
from inferplane.placement import build
from inferplane.placement.build import build_policies
from inferplane.placement.framework import place
from tests.builders import key_hash
from tests.placement_helpers import MODEL, REGIONS, hetero, profile, snapshot, state, sub
from tests.support.fake_upstream import chat_app
from tests.support.procs import free_port

KEY = "sk-eu-only"
KEY_BOTH = "sk-eu-and-us"  # a tenant allowed both, whose request narrows to the EU
EU = frozenset({"eu"})
#: the required filters, in `REQUIRED_FILTERS` order (spelt out: this file runs on main too)
REQUIRED = ["model-served", "context-window", "jurisdiction", "precision", "capacity-class"]

#: configuration.md's second example profile, as a user would copy it
DOCS_FAST = {"name": "fast", "plugins": [
    {"ref": "health"}, {"ref": "lr", "weight": 2}, {"ref": "round-robin"}]}


def _cfg(*subs: dict[str, Any], profiles: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    return {"regions": REGIONS, "substrates": list(subs),
            "plugins": [{"type": "least-request", "name": "lr"}], "profiles": profiles, **extra}


# -- the gateway ------------------------------------------------------------------------------
def _upstream(name: str) -> web.Application:
    async def reply(prompt: str) -> str:
        return f"from {name}"

    return chat_app(reply)


@pytest.fixture
async def gateway() -> AsyncIterator[tuple[str, aiohttp.ClientSession]]:
    """An EU-only tenant whose class uses the docs' profile ``fast`` (round-robin, no
    jurisdiction or model-served filter), in front of three live upstreams: ``eu-0`` serves
    the model in the EU, ``us-0`` serves it in the US, ``eu-x`` serves another model only."""
    runners: list[web.AppRunner] = []
    ports: dict[str, int] = {}
    for n in ("eu-0", "us-0", "eu-x"):
        r = web.AppRunner(_upstream(n))
        await r.setup()
        runners.append(r)
        ports[n] = free_port()
        await web.TCPSite(r, "127.0.0.1", ports[n]).start()

    def ep(name: str, served: str) -> dict[str, Any]:
        return {"name": name, "url": f"http://127.0.0.1:{ports[name]}",
                "models": [{"name": served, "profile": MODEL, "max_context": 8192}]}

    eu, us = sub("eu"), sub("us", region="us-east", jurisdiction="us")
    eu["endpoints"] = [ep("eu-0", MODEL), ep("eu-x", "other-model")]
    us["endpoints"] = [ep("us-0", MODEL)]
    raw = _cfg(
        eu, us, profiles=[DOCS_FAST],
        gateway={"scrape_interval_s": 0.05, "seed": 1},
        tenants=[{"name": "acme", "api_keys": [key_hash(KEY)], "allowed_jurisdictions": ["eu"],
                  "default_class": "gold", "region": "eu-west"},
                 {"name": "both", "api_keys": [key_hash(KEY_BOTH)],
                  "allowed_jurisdictions": ["eu", "us"], "default_class": "gold",
                  "region": "eu-west"}],
        classes=[{"name": "gold", "ttft_slo_ms": 300, "itl_slo_ms": 40, "priority": "critical",
                  "profile": "fast"}],
    )
    try:
        gw = Gateway(parse_config(json.dumps(raw), "<test>"))
        port = free_port()
        runner = await serve(gw, "127.0.0.1", port)
        try:
            async with aiohttp.ClientSession(
                headers={"Authorization": f"Bearer {KEY}"}
            ) as http:
                yield f"http://127.0.0.1:{port}", http
        finally:
            await runner.cleanup()
    finally:
        for r in runners:
            await r.cleanup()


async def test_a_profile_without_the_filters_keeps_the_tenant_in_its_jurisdiction(
    gateway: tuple[str, aiohttp.ClientSession],
) -> None:
    """Round-robin over every endpoint, as the profile lists no filter but health: before the
    fix every other request went to ``us-0`` (the tenant allows only the EU) or ``eu-x``
    (which does not serve the model)."""
    base, http = gateway
    body = {"model": MODEL, "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}
    served = []
    for _ in range(6):
        async with http.post(base + "/v1/chat/completions", json=body) as r:
            assert r.status == 200, await r.text()
            served.append(r.headers["x-inferplane-endpoint"])
            assert (await r.json())["choices"][0]["message"]["content"] == (
                f"from {served[-1]}")
    assert served == ["eu-0"] * 6


async def test_a_request_narrowing_its_jurisdictions_lands_only_there(
    gateway: tuple[str, aiohttp.ClientSession],
) -> None:
    """A tenant allowed [eu, us] sends ``x-inferplane-jurisdictions: eu`` through the same
    profile: the required jurisdiction filter applies the request's narrowing (before the fix
    round-robin reached ``us-0`` too)."""
    base, http = gateway
    body = {"model": MODEL, "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}
    hdr = {"Authorization": f"Bearer {KEY_BOTH}", "x-inferplane-jurisdictions": "eu"}
    served = []
    for _ in range(6):
        async with http.post(base + "/v1/chat/completions", json=body, headers=hdr) as r:
            assert r.status == 200, await r.text()
            served.append(r.headers["x-inferplane-endpoint"])
    assert served == ["eu-0"] * 6


# -- placement ----------------------------------------------------------------------------------
def _fleet_cfg(profiles: list[dict[str, Any]]) -> Any:
    return parse_config(json.dumps(_cfg(
        sub("eu", n=2),
        sub("us", region="us-east", jurisdiction="us"),
        sub("eu-small", models=[{"name": MODEL, "max_context": 2048}]),
        sub("eu-70b", models=[{"name": "llama-3.1-70b", "max_context": 32768}]),
        sub("eu-burst", capacity="burst", models=[
            {"name": MODEL, "max_context": 32768, "precision": "fp8"}]),
        profiles=profiles)), "<test>")


def test_missing_required_filters_run_and_name_themselves() -> None:
    cfg = _fleet_cfg([DOCS_FAST])
    pol = build_policies(cfg, "<test>")["fast"]
    fl = Fleet.from_config(cfg)
    # 20k prompt tokens: eu-small's 2048 cannot hold it; bf16 only: eu-burst serves fp8
    prof = profile(allowed_jurisdictions=EU, prompt_tokens=20_000,
                   precisions=frozenset({"bf16"}), allow_burst=False)
    for _ in range(8):  # round-robin would visit every endpoint it is given
        d = place(prof, snapshot(fl), pol)
        assert d.endpoint in {"eu-0", "eu-1"}
    assert d.removed_by == {"model-served": 1, "context-window": 1, "jurisdiction": 1,
                            "precision": 1}
    by = {c.endpoint: c for c in d.candidates}
    assert by["us-0"].rejected_by == "jurisdiction"
    assert by["eu-70b-0"].rejected_by == "model-served"
    assert by["eu-small-0"].rejected_by == "context-window"
    assert by["eu-burst-0"].rejected_by == "precision"
    # burst: capacity-class applies too
    assert all(place(profile(allowed_jurisdictions=EU, allow_burst=False), snapshot(fl),
                     pol).endpoint != "eu-burst-0" for _ in range(8))
    # nothing eligible: a 503 naming the filter, never a pick outside the tenant's set
    d = place(profile(allowed_jurisdictions=frozenset({"cn"})), snapshot(fl), pol)
    assert d.picked is None and d.removed_by["jurisdiction"] == 5
    # the ones it does not list, in `REQUIRED_FILTERS` order: at the front, as none is listed
    assert [f.name for f in pol.filters] == [*REQUIRED, "health"]


def test_a_missing_filter_goes_after_the_required_one_before_it() -> None:
    """Not always first: after the listed required filter that precedes it in
    `REQUIRED_FILTERS` order (at the front when none does), and before any set-level one."""
    cfg = _fleet_cfg([
        {"name": "a", "plugins": [{"ref": "health"}, {"ref": "saturation"},
                                  {"ref": "jurisdiction"}, {"ref": "round-robin"}]},
        {"name": "b", "plugins": [{"ref": "jurisdiction"}, {"ref": "model-served"},
                                  {"ref": "failure-domain"}, {"ref": "round-robin"}]}])
    pols = build_policies(cfg, "<test>")
    assert [f.name for f in pols["a"].filters] == [
        "model-served", "context-window", "health", "saturation", "jurisdiction", "precision",
        "capacity-class"]
    assert [f.name for f in pols["b"].filters] == [
        "jurisdiction", "precision", "capacity-class", "model-served", "context-window",
        "failure-domain"]


def test_a_profile_listing_them_runs_them_once_in_its_own_order() -> None:
    assert [name for name, _ in build.REQUIRED_FILTERS] == REQUIRED
    cfg = hetero()
    pols = build_policies(cfg, "<test>")
    spec = {p.name: [r.ref for r in p.plugins] for p in cfg.profiles}
    for name, pol in pols.items():
        # the shipped profiles list every required filter: nothing added, nothing moved
        assert [f.name for f in pol.filters] == [
            r for r in spec[name] if r in {f.name for f in pol.filters}], name
    assert build.unlisted_required(cfg) == {}
    assert pols["default"].fused_filters is not None  # the fused filter pass still compiles


def test_a_set_level_filter_cannot_run_before_a_required_one() -> None:
    """failure-domain keeps the failed EU endpoint's domain out while others remain: listed
    before jurisdiction, it removed ``eu-0`` for ``us-0``, which jurisdiction then removed — no
    endpoint left although ``eu-0`` was eligible. The required filters run first."""
    prof_spec = {"name": "fd-first", "plugins": [
        {"ref": "failure-domain"}, {"ref": "model-served"}, {"ref": "jurisdiction"},
        {"ref": "round-robin"}]}
    eu, us = sub("eu"), sub("us", region="us-east", jurisdiction="us")
    eu["failure_domain"], us["failure_domain"] = "dc-1", "dc-2"
    cfg = parse_config(json.dumps(_cfg(eu, us, profiles=[prof_spec])), "<test>")
    pol = build_policies(cfg, "<test>")["fd-first"]
    fl = Fleet.from_config(cfg)
    d = place(profile(allowed_jurisdictions=EU, avoid_domains=frozenset({"fd:dc-1"})),
              snapshot(fl), pol)
    assert d.endpoint == "eu-0"
    assert [f.name for f in pol.filters] == [
        "model-served", "context-window", "jurisdiction", "precision", "capacity-class",
        "failure-domain"]


def test_a_set_level_filter_cannot_choose_among_unhealthy_endpoints() -> None:
    """reserved-capacity listed before health: the EU reservation is full and the only other
    endpoint (burst) is unhealthy. Seen first, reserved-capacity dropped the reserved endpoint
    because the burst one "remained", and health then removed that — a 503 although ``eu-0``
    is healthy and eligible. A listed health moves with the required filters, so
    reserved-capacity keeps the reservation when nothing else remains."""
    prof_spec = {"name": "rc-first", "plugins": [
        {"ref": "reserved-capacity"}, {"ref": "health"}, {"ref": "model-served"},
        {"ref": "round-robin"}]}
    cfg = parse_config(json.dumps(_cfg(
        sub("eu", max_concurrency=1), sub("eu-burst", capacity="burst"),
        profiles=[prof_spec])), "<test>")
    pol = build_policies(cfg, "<test>")["rc-first"]
    assert [f.name for f in pol.filters] == [
        "health", "model-served", "context-window", "jurisdiction", "precision",
        "capacity-class", "reserved-capacity"]
    fl = Fleet.from_config(cfg)
    states = {"eu-0": state(inflight=1), "eu-burst-0": state(healthy=False)}
    d = place(profile(allowed_jurisdictions=EU, allow_burst=True), snapshot(fl, states), pol)
    assert d.endpoint == "eu-0"
    assert d.removed_by == {"health": 1}


def test_a_filter_listed_twice_runs_once() -> None:
    prof_spec = {"name": "twice", "plugins": [
        {"ref": "jurisdiction"}, {"ref": "health"}, {"ref": "failure-domain"},
        {"ref": "jurisdiction"}, {"ref": "health"}, {"ref": "round-robin"}]}
    cfg = parse_config(json.dumps(_cfg(sub("eu"), profiles=[prof_spec])), "<test>")
    assert [f.name for f in build_policies(cfg, "<test>")["twice"].filters] == [
        "model-served", "context-window", "jurisdiction", "precision", "capacity-class",
        "health", "failure-domain"]


def test_check_notes_what_placement_adds(tmp_path: Path) -> None:
    cfg = _cfg(sub("eu"), profiles=[DOCS_FAST, {"name": "own", "plugins": [
        {"ref": "jur"}, {"ref": "model-served"}, {"ref": "round-robin"}]}])
    cfg["plugins"].append({"type": "jurisdiction", "name": "jur"})
    assert build.unlisted_required(parse_config(json.dumps(cfg), "<test>")) == {
        "fast": REQUIRED, "own": ["context-window", "precision", "capacity-class"]}
    path = tmp_path / "fleet.yaml"
    path.write_text(json.dumps(cfg))
    out = CliRunner().invoke(app, ["check", "--config", str(path)])
    assert out.exit_code == 0, out.output
    assert ("note: profile 'fast' lists no model-served, context-window, jurisdiction, "
            "precision, capacity-class filter: placement runs them anyway (hard "
            ) in out.output
    assert "note: profile 'own'" in out.output and "run before" not in out.output


def test_check_notes_what_placement_moves(tmp_path: Path) -> None:
    cfg = _cfg(sub("eu"), profiles=[{"name": "fd-first", "plugins": [
        {"ref": "model-served"}, {"ref": "failure-domain"}, {"ref": "jurisdiction"},
        {"ref": "health"}, {"ref": "saturation"}, {"ref": "round-robin"}]}])
    path = tmp_path / "fleet.yaml"
    path.write_text(json.dumps(cfg))
    out = CliRunner().invoke(app, ["check", "--config", str(path)])
    assert out.exit_code == 0, out.output
    assert ("note: profile 'fd-first': jurisdiction, health run before 'failure-domain' "
            "(required filters and health run before set-level ones") in out.output
