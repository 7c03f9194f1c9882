"""What the gateway passes between tenants and upstreams in headers, over loopback.

Answer direction: of an upstream's response headers a tenant sees only those named in
`inferplane.upstream_headers` (``content-type`` and the upstream's request id) and the names an
operator adds (``gateway.upstream_response_headers``): no ``Set-Cookie`` (a provider's Cloudflare
``__cf_bm``, a sticky balancer's), no provider account ids (``openai-organization``,
``openai-project``, ``anthropic-organization-id``), no quota state of the shared provider key
(``x-ratelimit-*``, ``anthropic-ratelimit-*``), no fingerprints, and no forged ``x-inferplane-*``
— in both dialects, streamed or not, and on the error answers the gateway relays.

Request direction: the gateway sends an upstream only its own headers (the endpoint's key in its
dialect, content type, the trace context): none of the client's, its ``Authorization`` least of
all.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp import web

from inferplane.config.loader import parse_config
from inferplane.errors import ConfigError
from tests.builders import model, tenant, to_yaml
from tests.support.fake_provider import SEEN, build_provider
from tests.support.procs import free_port
from tests.test_providers import (  # noqa: F401 (_key_env: the fixture, used by name)
    CHAT,
    KEY,
    UPSTREAM_KEY,
    _key_env,
    endpoint,
    fleet_yaml,
    gateway,
    providers,
)

#: what hosted providers and the proxies in front of them add to their answers (names as sent)
UPSTREAM_EXTRAS = {
    "Set-Cookie": "__cf_bm=abc123; path=/; domain=.api.example.com; HttpOnly; Secure",
    "openai-organization": "org-shared-account",
    "openai-project": "proj_shared",
    "openai-processing-ms": "212",
    "openai-version": "2020-10-01",
    "x-ratelimit-limit-requests": "10000",
    "x-ratelimit-remaining-requests": "9321",
    "x-ratelimit-remaining-tokens": "1999000",
    "x-ratelimit-reset-requests": "6ms",
    "anthropic-organization-id": "0b8e9a4c-shared-org",
    "anthropic-ratelimit-requests-remaining": "49",
    "anthropic-ratelimit-tokens-reset": "2026-12-07T10:00:00Z",
    "retry-after": "3",
    "cf-ray": "8f1c2d3e4a5b6c7d-FRA",
    "cf-cache-status": "DYNAMIC",
    "strict-transport-security": "max-age=31536000",
    "alt-svc": 'h3=":443"; ma=86400',
    "via": "1.1 vegur",
    "x-envoy-upstream-service-time": "180",
    "x-inferplane-endpoint": "forged",
    "x-inferplane-receipt": "forged",
    "x-request-id": "req_openai_123",
    "request-id": "req_anthropic_456",
}
TENANT_SEES = {"content-type", "x-request-id", "request-id"}
"""Of the above and the stand-in's own, what a tenant sees by default."""


def _with_extras(app: web.Application, extras: Mapping[str, str] = UPSTREAM_EXTRAS
                 ) -> web.Application:
    async def add(request: web.Request, response: web.StreamResponse) -> None:
        for k, v in extras.items():
            response.headers[k] = v
        response.headers["Server"] = "cloudflare"

    app.on_response_prepare.append(add)
    return app


def _client(**headers: str) -> aiohttp.ClientSession:
    return aiohttp.ClientSession(headers={"Authorization": f"Bearer {KEY}", **headers})


def _leaked(headers: Mapping[str, str], sent: Mapping[str, str] = UPSTREAM_EXTRAS) -> set[str]:
    """The upstream's names (lower case) a client got the upstream's value of."""
    lower = {k.lower(): v for k, v in sent.items()}
    return {k.lower() for k, v in headers.items()
            if k.lower() in lower and v == lower[k.lower()]} - TENANT_SEES


def _anthropic(name: str, port: int, served: str) -> dict[str, Any]:
    return endpoint(name, port, base="/v1", dialect="anthropic",
                    models=[model(served, "llama-3.1-70b", 200000, upstream_name="claude-x")])


async def _answers(base: str, models: list[str]) -> list[tuple[str, int, Mapping[str, str]]]:
    """Each model asked plainly and streamed: (what, status, response headers)."""
    out = []
    async with _client() as s:
        for m in models:
            for stream in (False, True):
                async with s.post(f"{base}/v1/chat/completions",
                                  json={**CHAT, "model": m, "stream": stream}) as r:
                    await r.read()
                    out.append((f"{m} stream={stream}", r.status, r.headers))
    return out


async def test_no_cookie_account_id_or_quota_state_reaches_a_tenant() -> None:
    apps = {
        "oa": _with_extras(build_provider(key=UPSTREAM_KEY)),
        "oabad": _with_extras(build_provider(key=UPSTREAM_KEY, mode="bad_request")),
        "an": _with_extras(build_provider(base="/v1", dialect="anthropic", key=UPSTREAM_KEY)),
        "anbad": _with_extras(build_provider(base="/v1", dialect="anthropic", key=UPSTREAM_KEY,
                                             mode="bad_request")),
    }
    async with providers(**apps) as ports:
        eps = [endpoint("oa", ports["oa"], models=[model("m-oa", "llama-3.1-70b", 32768)]),
               endpoint("oabad", ports["oabad"],
                        models=[model("m-oabad", "llama-3.1-70b", 32768)]),
               _anthropic("an", ports["an"], "m-an"), _anthropic("anbad", ports["anbad"],
                                                                 "m-anbad")]
        config = parse_config(fleet_yaml(free_port(), eps))
        async with gateway(config) as (_, base):
            answers = await _answers(base, ["m-oa", "m-oabad", "m-an", "m-anbad"])
    statuses = {what: status for what, status, _ in answers}
    assert statuses == {
        "m-oa stream=False": 200, "m-oa stream=True": 200,
        "m-oabad stream=False": 400, "m-oabad stream=True": 400,
        "m-an stream=False": 200, "m-an stream=True": 200,
        "m-anbad stream=False": 400, "m-anbad stream=True": 400,
    }
    for what, _, headers in answers:
        assert _leaked(headers) == set(), what
        assert "set-cookie" not in {k.lower() for k in headers}, what
        assert headers["x-inferplane-endpoint"] == what.split()[0][2:], what  # not forged
        assert headers["x-request-id"] == "req_openai_123", what  # the upstream's request id
        assert headers["request-id"] == "req_anthropic_456", what
        assert headers.get("Server", "").lower() != "cloudflare", what
        assert headers.get("retry-after") is None, what
    ctypes = {what: headers["Content-Type"] for what, _, headers in answers}
    assert ctypes["m-oa stream=True"].startswith("text/event-stream")
    assert ctypes["m-an stream=True"].startswith("text/event-stream")
    assert ctypes["m-oa stream=False"].startswith("application/json")
    assert ctypes["m-anbad stream=True"].startswith("application/json")
    # relayed event streams carry the gateway's own Cache-Control (the same behind Envoy:
    # tests/test_epp_envoy.py)
    caches = {what: headers.get("Cache-Control") for what, _, headers in answers}
    assert caches["m-oa stream=True"] == caches["m-an stream=True"] == "no-cache", caches


async def test_an_operator_may_pass_more_names_but_never_cookies_or_the_gateways_own() -> None:
    app = _with_extras(build_provider(key=UPSTREAM_KEY))
    async with providers(p=app) as ports:
        config = parse_config(fleet_yaml(
            free_port(), [endpoint("p", ports["p"])],
            gateway={"upstream_response_headers": ["x-ratelimit-*", "OpenAI-Processing-Ms"]}))
        async with gateway(config) as (_, base):
            answers = await _answers(base, ["big"])
    for what, status, headers in answers:
        assert status == 200, what
        assert _leaked(headers) == {
            "x-ratelimit-limit-requests", "x-ratelimit-remaining-requests",
            "x-ratelimit-remaining-tokens", "x-ratelimit-reset-requests",
            "openai-processing-ms"}, what
        assert headers["x-inferplane-endpoint"] == "p", what


def test_the_rule_by_name_and_prefix() -> None:
    from inferplane.upstream_headers import ResponseHeaderRule

    rule = ResponseHeaderRule(["x-ratelimit-*", "x-served-by", "x-*"])
    got = rule({"Content-Type": "a", "X-Ratelimit-Remaining-Tokens": "1", "X-Served-By": "b",
                "Set-Cookie": "c", "x-inferplane-endpoint": "d", "Content-Length": "1",
                "Transfer-Encoding": "chunked", "x-request-id": "e", "openai-project": "f",
                "x-other": "g"})
    # x-* passes x-other, never the gateway's own names
    assert got == {"Content-Type": "a", "X-Ratelimit-Remaining-Tokens": "1", "X-Served-By": "b",
                   "x-request-id": "e", "x-other": "g"}
    assert ResponseHeaderRule()({"Request-Id": "r", "Cf-Ray": "x"}) == {"Request-Id": "r"}


@pytest.mark.parametrize(("entry", "why"), [
    ("set-cookie", "cookie"),
    ("Set-Cookie2", "cookie"),
    ("content-length", "the gateway"),
    ("transfer-encoding", "the gateway"),
    ("x-inferplane-endpoint", "the gateway"),
    ("x-inferplane-*", "the gateway"),
    # families of what never passes: they would pass nothing (review25 S5)
    ("set-cookie*", "cookie"),
    ("Set-Cookie2*", "cookie"),
    ("x-inferplane*", "the gateway"),
    ("content-encoding*", "the gateway"),
    ("date*", "the gateway"),
    ("*", "every"),
    ("x-rate limit", "not a header name"),
    ("x-*-y", "not a header name"),
    ("", "not a header name"),
])
def test_the_knob_refuses_what_must_never_pass(entry: str, why: str) -> None:
    with pytest.raises(ConfigError) as exc:
        parse_config(fleet_yaml(1, [endpoint("p", 9)],
                                gateway={"upstream_response_headers": [entry]}))
    assert "upstream_response_headers" in str(exc.value)
    assert why in str(exc.value)


async def test_no_client_header_reaches_the_upstream() -> None:
    """The gateway builds the upstream request's headers itself: the client's key, cookies,
    other keys and anything else it sent stay at the gateway (with telemetry on, the W3C trace
    context goes on as the gateway's own span's: tests/test_otel.py)."""
    apps = {"oa": build_provider(key=UPSTREAM_KEY),
            "an": build_provider(base="/v1", dialect="anthropic", key=UPSTREAM_KEY)}
    client = {"Cookie": "session=tenant-a", "x-api-key": "sk-tenant-other",
              "api-key": "azure-tenant", "Proxy-Authorization": "Basic dGVuYW50",
              "x-request-id": "tenant-chosen", "anthropic-version": "2099-01-01",
              "OpenAI-Organization": "org-tenant", "x-tenant-secret": "s3cret",
              "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"}
    async with providers(**apps) as ports:
        eps = [endpoint("oa", ports["oa"], models=[model("m-oa", "llama-3.1-70b", 32768)]),
               _anthropic("an", ports["an"], "m-an")]
        config = parse_config(fleet_yaml(free_port(), eps))
        async with gateway(config) as (_, base), _client(**client) as s:
            for m in ("m-oa", "m-an"):
                for stream in (False, True):
                    async with s.post(f"{base}/v1/chat/completions",
                                      json={**CHAT, "model": m, "stream": stream}) as r:
                        assert r.status == 200, await r.text()
    seen = [(h["path"], {k.lower(): v for k, v in h["headers"].items()})
            for app in apps.values() for h in app[SEEN]]
    assert len(seen) == 4
    for path, headers in seen:
        assert KEY not in " ".join(headers.values()), path
        for name, value in client.items():
            if name != "traceparent":
                assert headers.get(name.lower()) != value, (path, name)
        # without telemetry no trace context goes on; with it, the gateway's span's
        # (tests/test_otel.py)
        assert "traceparent" not in headers, path
        common = {"host", "content-type", "content-length", "accept", "accept-encoding"}
        if path == "/v1/messages":
            assert set(headers) == common | {"x-api-key", "anthropic-version"}, path
            assert headers["x-api-key"] == UPSTREAM_KEY
            assert headers["anthropic-version"] == "2023-06-01"
        else:
            assert set(headers) == common | {"authorization"}, path
            assert headers["authorization"] == f"Bearer {UPSTREAM_KEY}"


async def test_the_gateways_own_429_keeps_its_retry_after() -> None:
    app = _with_extras(build_provider(key=UPSTREAM_KEY))
    async with providers(p=app) as ports:
        fleet = yaml.safe_load(fleet_yaml(free_port(), [endpoint("p", ports["p"])]))
        fleet["tenants"] = [tenant("t", KEY, rate_limits=[{"requests_per_min": 1}])]
        config = parse_config(to_yaml(fleet))
        async with gateway(config) as (_, base), _client() as s:
            async with s.post(f"{base}/v1/chat/completions", json=CHAT) as r:
                assert r.status == 200
                assert "retry-after" not in r.headers  # the provider's is not passed
            async with s.post(f"{base}/v1/chat/completions", json=CHAT) as r:
                assert r.status == 429
                assert int(r.headers["Retry-After"]) >= 1
                assert (await r.json())["error"]["code"] == "rate_limit_exceeded"


def test_the_envoy_answer_filter_carries_the_same_rule() -> None:
    """Behind Envoy (`inferplane epp`) the same names pass: the bootstrap's Lua answer filter is
    generated from `inferplane.upstream_headers` and ``gateway.upstream_response_headers``
    (tests/test_epp_envoy.py runs it in a real Envoy)."""
    from inferplane.epp.envoy_config import _answer_filter

    lua = _answer_filter(["x-ratelimit-*", "X-Served-By"])["typed_config"][
        "default_source_code"]["inline_string"]
    keep = lua.split("local keep = ", 1)[1].split("\n", 1)[0]
    for name in ("content-type", "x-request-id", "request-id", "x-served-by",
                 "x-inferplane-endpoint", "x-gateway-destination-endpoint-served"):
        assert f'["{name}"] = true' in keep, name
    for name in ("set-cookie", "openai-organization", "x-inferplane-receipt", "server"):
        assert f'"{name}"' not in keep, name
    assert 'local prefixes = {"x-ratelimit-"}' in lua
    assert '["set-cookie"] = true' in lua.split("local never = ", 1)[1].split("\n", 1)[0]
