"""Provider substrates, in process over loopback: base paths, passive health, credentials,
model aliasing, prices, declared rate limits, 429 + Retry-After, unreadable answers, and keys
that never leave the dispatcher."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from inferplane.api.app import serve
from inferplane.api.pipeline import Gateway
from inferplane.config.loader import parse_config
from inferplane.config.schema import FleetConfig
from inferplane.dispatch.credentials import load_credentials
from inferplane.dispatch.upstream import parse_retry_after
from inferplane.errors import ConfigError
from inferplane.fleet.model import Fleet
from tests.builders import endpoint as endpoint_spec
from tests.builders import key_hash, model, pool_fleet, to_yaml
from tests.support.fake_provider import SEEN, build_provider
from tests.support.procs import free_port

KEY = "sk-tenant"
ADMIN = "sk-provider-admin"
UPSTREAM_KEY = "sk-upstream-secret-1234"
CHAT = {"model": "big", "messages": [{"role": "user", "content": "hello there"}], "max_tokens": 8}


def fleet_yaml(gw_port: int, endpoints: Sequence[Mapping[str, Any]],
               gateway: Mapping[str, Any] | None = None, **sections: Any) -> str:
    """The provider substrate ``prov`` holding ``endpoints``; ``gateway``: more gateway fields;
    ``sections``: other top-level blocks."""
    return to_yaml(pool_fleet(
        gateway={"port": gw_port, "seed": 1, "metrics": {"public": True}, **(gateway or {})},
        regions=[{"name": "us-east"}],
        substrate={"name": "prov", "kind": "provider-api", "hardware": "provider-api",
                   "region": "us-east", "jurisdiction": "us", "capacity_class": "burst",
                   "cost": {"input_per_mtok": 1.0, "output_per_mtok": 2.0,
                            "cached_input_per_mtok": 0.5}},
        endpoints=endpoints,
        key=KEY,
        **sections,
    ))


def endpoint(name: str, port: int, *, base: str = "/openai/v1",
             key: Mapping[str, Any] | None = None, **fields: Any) -> dict[str, Any]:
    """An OpenAI-compatible endpoint at ``port`` + ``base`` serving ``big`` (vendor/big-70b);
    ``key``: its upstream key's fields instead of ``api_key_env: TEST_PROVIDER_KEY``;
    ``fields``: other endpoint fields (``models`` included)."""
    fields.setdefault("models", [model("big", "llama-3.1-70b", 32768,
                                       upstream_name="vendor/big-70b")])
    return endpoint_spec(name, url=f"http://127.0.0.1:{port}{base}", engine="openai-compatible",
                         **(key if key is not None else {"api_key_env": "TEST_PROVIDER_KEY"}),
                         **fields)


@pytest.fixture(autouse=True)
def _key_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("TEST_PROVIDER_KEY", UPSTREAM_KEY)
    yield


@asynccontextmanager
async def providers(**apps: web.Application) -> AsyncIterator[dict[str, int]]:
    runners, ports = [], {}
    try:
        for name, app in apps.items():
            runner = web.AppRunner(app)
            await runner.setup()
            ports[name] = free_port()
            await web.TCPSite(runner, "127.0.0.1", ports[name]).start()
            runners.append(runner)
        yield ports
    finally:
        for r in runners:
            await r.cleanup()


@asynccontextmanager
async def gateway(config: FleetConfig) -> AsyncIterator[tuple[Gateway, str]]:
    gw = Gateway(config)
    runner = await serve(gw, "127.0.0.1", config.gateway.port)
    try:
        yield gw, f"http://127.0.0.1:{config.gateway.port}"
    finally:
        await runner.cleanup()


def session() -> aiohttp.ClientSession:
    return aiohttp.ClientSession(headers={"Authorization": f"Bearer {KEY}"})


# -- configuration ------------------------------------------------------------------------------


def test_check_accepts_a_base_path_and_joins_paths_once() -> None:
    config = parse_config(fleet_yaml(1, [endpoint("a", 9, base="/openai/v1"),
                                         endpoint("b", 10, base="/proxy")]))
    a, b = Fleet.from_config(config).endpoints
    assert a.url == "http://127.0.0.1:9/openai/v1"
    assert a.api_url("/v1/chat/completions") == "http://127.0.0.1:9/openai/v1/chat/completions"
    assert a.api_url("/v1/models") == "http://127.0.0.1:9/openai/v1/models"
    assert b.api_url("/v1/chat/completions") == "http://127.0.0.1:10/proxy/v1/chat/completions"
    assert a.health_check == "passive" and not a.scrape_metrics  # provider defaults


def test_inline_keys_are_refused_unless_allowed() -> None:
    inline = endpoint("a", 9, key={"api_key": "sk-inline"})
    with pytest.raises(ConfigError) as exc:
        parse_config(fleet_yaml(1, [inline]))
    assert "substrates[0].endpoints[0]" in str(exc.value)
    assert "inline api_key is refused" in str(exc.value)
    allowed = endpoint("a", 9, key={"api_key": "sk-inline", "allow_inline_key": True})
    assert load_credentials(parse_config(fleet_yaml(1, [allowed]))) == {"a": "sk-inline"}


def test_two_key_sources_are_refused() -> None:
    both = endpoint("a", 9, key={"api_key_env": "X", "api_key_file": "k.txt"})
    with pytest.raises(ConfigError, match="one source of the upstream key"):
        parse_config(fleet_yaml(1, [both]))


def test_missing_variable_is_a_start_up_error_naming_endpoint_and_variable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("TEST_PROVIDER_KEY")
    config = parse_config(fleet_yaml(1, [endpoint("prov-a", 9)]), "fleet.yaml")
    with pytest.raises(ConfigError) as exc:
        Gateway(config, "fleet.yaml")
    text = str(exc.value)
    assert "fleet.yaml: substrates[0].endpoints[0].api_key_env" in text
    assert "'prov-a'" in text and "TEST_PROVIDER_KEY" in text and "is not set" in text


def test_key_file_relative_to_the_fleet_file_and_missing_file(tmp_path: Path) -> None:
    (tmp_path / "secrets").mkdir()
    (tmp_path / "secrets" / "up.key").write_text(f"  {UPSTREAM_KEY}\n")
    ep = endpoint("a", 9, key={"api_key_file": "secrets/up.key"})
    fleet = tmp_path / "fleet.yaml"
    fleet.write_text(fleet_yaml(1, [ep]))
    from inferplane.config.loader import load_config

    assert load_credentials(load_config(fleet)) == {"a": UPSTREAM_KEY}
    (tmp_path / "secrets" / "up.key").unlink()
    with pytest.raises(ConfigError) as exc:
        load_credentials(load_config(fleet), str(fleet))
    assert "endpoint 'a'" in str(exc.value) and "up.key" in str(exc.value)
    assert "api_key_file" in str(exc.value)


def test_dialect_mismatch_is_found_at_start_up() -> None:
    ep = endpoint("a", 9, dialect="anthropic", models=[
        model("big", "llama-3.1-70b", 512, upstream_name="vendor/big-70b", kind="embed")])
    with pytest.raises(ConfigError) as exc:
        parse_config(fleet_yaml(1, [ep]))
    assert "substrates[0].endpoints[0].models[0].kind" in str(exc.value)
    assert "anthropic dialect" in str(exc.value)


def test_retry_after_forms() -> None:
    assert parse_retry_after("7") == 7.0
    assert parse_retry_after("0.5") == 0.5
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now=1445412470.0) == 10.0
    assert parse_retry_after("soon") is None and parse_retry_after(None) is None
    assert parse_retry_after("-3") == 0.0


# -- requests ------------------------------------------------------------------------------------


async def test_hosted_provider_with_base_path_passive_health_alias_and_price() -> None:
    app = build_provider(base="/openai/v1", key=UPSTREAM_KEY)
    async with providers(p=app) as ports:
        config = parse_config(fleet_yaml(free_port(), [endpoint("p", ports["p"])]))
        async with gateway(config) as (gw, base), session() as s:
            async with s.get(f"{base}/ready") as r:  # the provider answers 404 on /health
                assert r.status == 200, await r.text()
            async with s.post(f"{base}/v1/chat/completions", json=CHAT) as r:
                body = await r.json()
                assert r.status == 200, body
                assert r.headers["x-inferplane-model"] == "vendor/big-70b"
                did = r.headers["x-inferplane-decision-id"]
            assert body["model"] == "vendor/big-70b"  # which model answered
            seen = app[SEEN][-1]
            assert seen["path"] == "/openai/v1/chat/completions"
            assert seen["body"]["model"] == "vendor/big-70b"
            assert seen["headers"]["Authorization"] == f"Bearer {UPSTREAM_KEY}"
            out = gw.ledger.get(did)["outcome"]  # type: ignore[index]
            # 6 uncached × $1 + 4 cached × $0.5 + 3 output × $2 per million tokens
            assert out["cost_usd"] == pytest.approx((6 * 1.0 + 4 * 0.5 + 3 * 2.0) / 1e6)
            assert out["cached_tokens"] == 4


async def test_models_health_check_uses_the_key() -> None:
    good = build_provider(key=UPSTREAM_KEY)
    wrong = build_provider(key="sk-something-else")
    async with providers(good=good, wrong=wrong) as ports:
        config = parse_config(fleet_yaml(free_port(), [
            endpoint("good", ports["good"], health_check="models"),
            endpoint("wrong", ports["wrong"], health_check="models")]))
        async with gateway(config) as (gw, _):
            snap = gw.live.snapshot()
            assert snap.by_name["good"].state.healthy
            assert not snap.by_name["wrong"].state.healthy


async def test_429_with_retry_after_ejects_and_the_move_is_a_rate_limited_spillover() -> None:
    limited = build_provider(key=UPSTREAM_KEY, mode="429", retry_after="30")
    ok = build_provider(key=UPSTREAM_KEY, name="ok")
    async with providers(limited=limited, ok=ok) as ports:
        # `limited` is listed first and cheaper: the policy prefers it
        config = parse_config(fleet_yaml(free_port(), [endpoint("limited", ports["limited"]),
                                                        endpoint("ok", ports["ok"])]))
        async with gateway(config) as (gw, base), session() as s:
            gw.live.live["ok"].inflight = 30  # make `limited` the first pick
            async with s.post(f"{base}/v1/chat/completions", json=CHAT) as r:
                assert r.status == 200, await r.text()
                assert r.headers["x-inferplane-endpoint"] == "ok"
                did = r.headers["x-inferplane-decision-id"]
            gw.live.live["ok"].inflight = 0
            rec = gw.ledger.get(did)
            assert rec is not None and rec["outcome"]["status"] == 200
            assert rec["spillover"]["kind"] == "rate_limited"  # the reason vocabulary
            assert rec["spillover"]["preferred"] == "limited"
            assert rec["spillover"]["chosen"] == "ok"
            state = gw.live.snapshot().by_name["limited"].state
            assert state.ejected and "429" in state.ejected_reason
            until = gw.outliers.records["limited"].ejected_until
            assert until is not None and 29 < until - gw.live.clock() <= 30
            async with s.get(f"{base}/metrics") as r:
                text = await r.text()
            sample = 'ejections_total{endpoint="limited",reason_kind="rate_limited"} 1.0'
            assert f"inferplane_endpoint_{sample}" in text
            # while ejected, nothing is sent to it
            n = len(limited[SEEN])
            async with s.post(f"{base}/v1/chat/completions", json=CHAT) as r:
                assert r.headers["x-inferplane-endpoint"] == "ok"
            assert len(limited[SEEN]) == n


async def test_passive_endpoint_failing_is_ejected_and_returns_half_open() -> None:
    bad = build_provider(key=UPSTREAM_KEY, mode="500")
    async with providers(bad=bad) as ports:
        config = parse_config(fleet_yaml(free_port(), [endpoint("bad", ports["bad"])],
                                         health={"outlier": {"base_ejection_s": 5}}))
        async with gateway(config) as (gw, base), session() as s:
            for _ in range(2):  # passive_failures: 2
                async with s.post(f"{base}/v1/chat/completions", json=CHAT) as r:
                    assert r.status == 502
                    err = (await r.json())["error"]
                    assert "'bad'" in err["message"]
            state = gw.live.snapshot().by_name["bad"].state
            assert state.ejected and "2 consecutive failures" in state.ejected_reason
            async with s.get(f"{base}/ready") as r:
                assert r.status == 503
            # the ejection ends: the sweep returns it on probation (half-open)
            now = gw.live.clock()
            actions = gw.outliers.sweep({"bad": _observed()}, now + 5.1)
            assert [(a.endpoint, a.eject) for a in actions] == [("bad", False)]
            assert gw.outliers.records["bad"].probation


def _observed() -> Any:
    from inferplane.fleet.health import Observed

    return Observed()


async def test_declared_rate_limits_are_capacity() -> None:
    a = build_provider(key=UPSTREAM_KEY, name="a")
    b = build_provider(key=UPSTREAM_KEY, name="b")
    async with providers(a=a, b=b) as ports:
        limit = {"requests_per_min": 2}
        config = parse_config(fleet_yaml(
            free_port(), [endpoint("a", ports["a"], limits=limit),
                          endpoint("b", ports["b"], limits=limit)],
            admission={"queue": {"default_deadline_ms": 200}}))
        async with gateway(config) as (gw, base), session() as s:
            picks = []
            for i in range(4):
                ask = {**CHAT, "messages": [{"role": "user", "content": f"question {i}"}]}
                async with s.post(f"{base}/v1/chat/completions", json=ask) as r:
                    assert r.status == 200
                    picks.append(r.headers["x-inferplane-endpoint"])
            assert sorted(picks) == ["a", "a", "b", "b"]
            # no room left in the minute: admission holds the request (no slot), then sheds it
            fresh = {**CHAT, "messages": [{"role": "user", "content": "a new question"}]}
            async with s.post(f"{base}/v1/chat/completions", json=fresh) as r:
                err = (await r.json())["error"]
                assert r.status == 503 and err["code"] == "queue_timeout", err
            assert len(a[SEEN]) == 2 and len(b[SEEN]) == 2  # nothing was sent to a certain 429
            assert gw.live.snapshot().by_name["a"].state.requests_left == 0
            assert gw.admission.free_slots(("big", None, None)) == 0


@pytest.mark.parametrize(
    ("mode", "text"),
    [("garbage", "not JSON"), ("odd_error", "error in an unknown format")],
)
async def test_unreadable_answers_are_502_naming_the_endpoint(mode: str, text: str) -> None:
    app = build_provider(key=UPSTREAM_KEY, mode=mode)
    async with providers(p=app) as ports:
        config = parse_config(fleet_yaml(free_port(), [endpoint("weird", ports["p"])]))
        async with gateway(config) as (_, base), session() as s:
            async with s.post(f"{base}/v1/chat/completions", json=CHAT) as r:
                body = await r.json()
            assert r.status == 502
            assert set(body["error"]) == {"message", "type", "param", "code"}
            assert "upstream 'weird'" in body["error"]["message"]
            assert text in body["error"]["message"]


async def test_upstream_key_never_reaches_logs_records_or_metrics(
    caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    caplog.set_level(logging.DEBUG)
    ok = build_provider(key=UPSTREAM_KEY)
    limited = build_provider(key=UPSTREAM_KEY, mode="429")
    refused = build_provider(key="sk-other")
    async with providers(ok=ok, limited=limited, refused=refused) as ports:
        config = parse_config(fleet_yaml(
            free_port(), [endpoint("ok", ports["ok"]), endpoint("limited", ports["limited"]),
                          endpoint("refused", ports["refused"])],
            gateway={"ledger_path": str(tmp_path / "ledger.sqlite"),
                     "metrics": {"public": True, "api_keys": [key_hash(ADMIN)]}}))
        async with gateway(config) as (gw, base), session() as s:
            dids = []
            for i in range(6):
                async with s.post(f"{base}/v1/chat/completions",
                                  json={**CHAT, "stream": i % 2 == 1}) as r:
                    await r.read()
                    dids.append(r.headers.get("x-inferplane-decision-id"))
            async with s.get(f"{base}/metrics") as r:
                metrics = await r.text()
            # GET /v1/fleet/health is for admin keys; its ejection reasons are where a refused
            # credential's message would carry the key, so the answer read must be the real one
            async with s.get(f"{base}/v1/fleet/health",
                             headers={"Authorization": f"Bearer {ADMIN}"}) as r:
                assert r.status == 200, await r.text()
                health = await r.text()
            refused_row = next(e for e in json.loads(health)["endpoints"]
                               if e["endpoint"] == "refused")
            assert refused_row["ejected"] and "credentials" in refused_row["ejected_reason"]
            records = [json.dumps(gw.ledger.get(d)) for d in dids if d]
        assert records and any("refused" in r or "limited" in r for r in records)
        ledger_bytes = (tmp_path / "ledger.sqlite").read_bytes()
    for where, text in [("log", caplog.text), ("metrics", metrics), ("health", health),
                        ("records", "\n".join(records))]:
        assert UPSTREAM_KEY not in text, where
        assert "sk-other" not in text, where
    assert UPSTREAM_KEY.encode() not in ledger_bytes


def test_cli_check_refuses_inline_keys_and_serve_names_the_missing_variable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from typer.testing import CliRunner

    from inferplane.cli import app

    inline = tmp_path / "inline.yaml"
    inline.write_text(fleet_yaml(1, [endpoint("a", 9, key={"api_key": "sk-inline-secret"})]))
    result = CliRunner().invoke(app, ["check", "--config", str(inline)])
    assert result.exit_code == 2
    assert f"{inline}: substrates[0].endpoints[0]" in result.output
    assert "allow_inline_key" in result.output and "sk-inline-secret" not in result.output

    monkeypatch.delenv("TEST_PROVIDER_KEY")
    fleet = tmp_path / "fleet.yaml"
    fleet.write_text(fleet_yaml(free_port(), [endpoint("prov-a", 9)]))
    assert CliRunner().invoke(app, ["check", "--config", str(fleet)]).exit_code == 0
    result = CliRunner().invoke(app, ["serve", "--config", str(fleet)])
    assert result.exit_code == 2
    assert "invalid configuration" in result.output
    assert (f"{fleet}: substrates[0].endpoints[0].api_key_env: endpoint 'prov-a': the "
            "environment variable TEST_PROVIDER_KEY (api_key_env) is not set") in result.output


def test_cli_check_notes_dialect_limits_and_unset_keys(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from typer.testing import CliRunner

    from inferplane.cli import app

    monkeypatch.delenv("TEST_PROVIDER_KEY")
    ep = endpoint("claude-0", 9, dialect="anthropic")
    fleet = tmp_path / "fleet.yaml"
    fleet.write_text(fleet_yaml(1, [ep]))
    result = CliRunner().invoke(app, ["check", "--config", str(fleet)])
    assert result.exit_code == 0, result.output
    assert "note: model 'big' is served only through the anthropic dialect" in result.output
    assert (f"note: {fleet}: substrates[0].endpoints[0].api_key_env: endpoint 'claude-0': the "
            "environment variable TEST_PROVIDER_KEY (api_key_env) is not set") in result.output


async def test_a_429_with_nowhere_else_to_go_is_a_429_with_the_gateways_retry_after() -> None:
    # audit28 finding 6: this was a 502 without Retry-After, and the requests after it a 503
    # "1 health" without one; OpenAI clients retry a 429 after its Retry-After
    a = build_provider(key=UPSTREAM_KEY, mode="429", retry_after="7", name="a")
    b = build_provider(key=UPSTREAM_KEY, mode="429", retry_after="30", name="b")
    async with providers(a=a, b=b) as ports:
        config = parse_config(fleet_yaml(free_port(), [endpoint("a", ports["a"]),
                                                        endpoint("b", ports["b"])]))
        async with gateway(config) as (gw, base), session() as s:
            async with s.post(f"{base}/v1/chat/completions", json=CHAT) as r:
                err = (await r.json())["error"]
                assert r.status == 429, err
                assert err["code"] == "upstream_rate_limited"
                assert err["type"] == "rate_limit_exceeded"
                assert "no other eligible endpoint" in err["message"]
                # re-placed first (documented): both were tried; back when the first is back
                assert len(a[SEEN]) == 1 and len(b[SEEN]) == 1
                assert r.headers["Retry-After"] == "7"
                did = r.headers["x-inferplane-decision-id"]
            rec = gw.ledger.get(did)
            assert rec is not None and rec["outcome"]["status"] == 429
            # the next request is not sent: both are out after their 429s
            async with s.post(f"{base}/v1/chat/completions", json=CHAT) as r:
                err = (await r.json())["error"]
                assert r.status == 429, err
                assert err["code"] == "upstream_rate_limited"
                assert "2 rate limited after an HTTP 429" in err["message"], err
                assert 1 <= int(r.headers["Retry-After"]) <= 7
            assert len(a[SEEN]) == 1 and len(b[SEEN]) == 1


async def test_a_rate_limited_endpoint_beside_a_failing_one_gives_a_503_with_retry_after(
) -> None:
    limited = build_provider(key=UPSTREAM_KEY, mode="429", retry_after=None, name="limited")
    async with providers(limited=limited) as ports:
        config = parse_config(fleet_yaml(
            free_port(), [endpoint("limited", ports["limited"], limits={"retry_after_s": 4}),
                          endpoint("gone", free_port())]))
        async with gateway(config) as (gw, base), session() as s:
            gw.live.set_health("gone", False)
            async with s.post(f"{base}/v1/chat/completions", json=CHAT) as r:
                err = (await r.json())["error"]
                assert r.status == 429 and r.headers["Retry-After"] == "4", err
            async with s.post(f"{base}/v1/chat/completions", json=CHAT) as r:
                err = (await r.json())["error"]
                # `gone` may be back any time: not only rate limited, so not a 429
                assert r.status == 503 and err["code"] == "no_eligible_endpoint", err
                assert "1 rate limited after an HTTP 429" in err["message"]
                assert 1 <= int(r.headers["Retry-After"]) <= 4


async def test_a_reload_between_placement_and_its_refusal_leaves_a_429_not_a_500(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # review28 S1: the refusal looked a candidate up in the current fleet by index, so one a
    # reload had removed since the snapshot was a KeyError (a 500)
    from inferplane.errors import EndpointsRateLimitedError

    limited = build_provider(key=UPSTREAM_KEY, mode="429", retry_after=None, name="limited")
    async with providers(limited=limited) as ports:
        port = free_port()
        kept = endpoint("limited", ports["limited"], limits={"retry_after_s": 4})
        config = parse_config(fleet_yaml(port, [kept, endpoint("gone", free_port())]))
        async with gateway(config) as (gw, base), session() as s:
            gw.live.set_health("gone", False)
            async with s.post(f"{base}/v1/chat/completions", json=CHAT) as r:
                assert r.status == 429, await r.text()
            seen: list[Any] = []
            refuse = gw._nothing_eligible

            def capture(decision: Any, total: int) -> Any:
                seen.append((decision, total))
                return refuse(decision, total)

            monkeypatch.setattr(gw, "_nothing_eligible", capture)
            async with s.post(f"{base}/v1/chat/completions", json=CHAT) as r:
                assert r.status == 503, await r.text()  # `gone` is a candidate, not only 429s
            await gw.reload(parse_config(fleet_yaml(port, [kept])), "<reloaded>")
            decision, total = seen[-1]
            # the snapshot's `gone` is no longer in the fleet: it serves nothing now
            error = refuse(decision, total)
            assert isinstance(error, EndpointsRateLimitedError), error


@pytest.mark.parametrize(("mode", "dialect", "stream", "status"), [
    ("echo_key", "openai", False, 400),  # relayed as the upstream's answer
    ("echo_key", "anthropic", False, 400),  # translated to OpenAI's shape
    ("echo_key_odd", "openai", False, 502),  # quoted in the gateway's own message
    ("echo_key_stream", "openai", True, 200),  # the stream's error event
    ("echo_key_notjson", "openai", True, 200),  # a quoted excerpt of an event that is not JSON
])
async def test_an_upstream_error_that_echoes_the_key_reaches_no_tenant_with_it(
    mode: str, dialect: str, stream: bool, status: int, caplog: pytest.LogCaptureFixture,
) -> None:
    # audit28 finding 9: an upstream's 400 quoting the credentials it got was relayed byte
    # for byte, the gateway's key for it included
    caplog.set_level(logging.DEBUG)
    anthropic = dialect == "anthropic"
    echo = build_provider(key=UPSTREAM_KEY, mode=mode, dialect=dialect,
                          base="/v1" if anthropic else "/openai/v1")
    async with providers(echo=echo) as ports:
        config = parse_config(fleet_yaml(free_port(), [
            endpoint("echo", ports["echo"], base="" if anthropic else "/openai/v1",
                     dialect=dialect)]))
        async with gateway(config) as (gw, base), session() as s:
            async with s.post(f"{base}/v1/chat/completions",
                              json={**CHAT, "stream": stream}) as r:
                body = await r.text()
                assert r.status == status, body
                did = r.headers["x-inferplane-decision-id"]
            record = json.dumps(gw.ledger.get(did))
        assert len(echo[SEEN]) == 1  # it was sent, with the key
    assert "[redacted]" in body, body
    for where, text in [("answer", body), ("log", caplog.text), ("record", record)]:
        # not the key, nor its first 4 characters or more (a quote cut in the key's middle)
        assert UPSTREAM_KEY[:4] not in text, where


async def test_a_failed_attempt_keeps_the_upstreams_body_without_the_key(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # review28 N2: UpstreamAttemptFailed.body kept a 5xx body quoting the key as it came
    from inferplane.dispatch.answer import UpstreamAttemptFailed

    echo = build_provider(key=UPSTREAM_KEY, mode="echo_key_500", base="/openai/v1")
    async with providers(echo=echo) as ports:
        config = parse_config(fleet_yaml(free_port(), [
            endpoint("echo", ports["echo"], base="/openai/v1")]))
        async with gateway(config) as (gw, base), session() as s:
            failed: list[UpstreamAttemptFailed] = []
            open_ = gw.dispatcher.open

            async def watched(*args: Any, **kwargs: Any) -> Any:
                try:
                    return await open_(*args, **kwargs)
                except UpstreamAttemptFailed as exc:
                    failed.append(exc)
                    raise

            monkeypatch.setattr(gw.dispatcher, "open", watched)
            async with s.post(f"{base}/v1/chat/completions", json=CHAT) as r:
                assert r.status == 502, await r.text()
    assert failed and b"[redacted]" in failed[0].body, failed
    assert all(UPSTREAM_KEY[:4].encode() not in exc.body for exc in failed)


def test_redact_takes_the_key_out_as_is_escaped_and_cut_short() -> None:
    from inferplane.dispatch.credentials import redact, redact_cut

    key = "sk-a/b\"c-0123456789"
    assert redact(f"auth {key} and {key}".encode(), key) == b"auth [redacted] and [redacted]"
    escaped = json.dumps({"message": f"auth was {key}"}).encode()  # JSON escapes the quote
    assert redact(escaped, key) == b'{"message": "auth was [redacted]"}'
    # a quoted error cut at its limit in the middle of the key: the first part goes too
    assert redact_cut(f"auth was {key[:9]}…", key) == "auth was [redacted]…"
    assert redact_cut("auth was sk-…", key) == "auth was sk-…"  # 3 characters say nothing
    # the cut inside a repr'd excerpt (``'…'``), or followed by more text
    assert redact_cut(f"not JSON: 'auth {key[:-1]}…'", key) == "not JSON: 'auth [redacted]…'"
    assert redact_cut(f"a: {key[:6]}… b: {key[:5]}…)", key) == "a: [redacted]… b: [redacted]…)"
    assert redact(b"EMPTY", "EMPTY") == b"EMPTY"  # a placeholder is no secret
    assert redact(b"x", None) == b"x"
