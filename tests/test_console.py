"""The web console over HTTP, against a real gateway process with a SQLite ledger: the admin key
(401/403 in OpenAI's shape, the login cookie's flags, no open redirect), each page with the
gateway's live data, the decision explorer and the receipt check (a tampered record fails), and
a gateway with no admin keys serving no console. The same pages in Chromium:
tests/browser/test_console_browser.py."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from ipaddress import ip_network
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from aiohttp.test_utils import TestClient, TestServer

from inferplane.api.app import build_app
from inferplane.api.console import COOKIE_MAX_AGE_S, GATEWAY, HISTORY, spark_points
from inferplane.api.console_auth import (
    LoginThrottle,
    RedisRevocations,
    Sessions,
    client_address,
    matching_hash,
)
from inferplane.api.pipeline import Gateway, hash_key
from inferplane.config.loader import load_config
from tests.builders import model, pool_fleet, tenant, to_yaml
from tests.support.procs import Proc, free_port

ADMIN, TENANT = "sk-console-admin", "sk-console-tenant"


def _stack(tmp: Path, admin_keys: list[str]) -> tuple[list[Proc], str]:
    procs: list[Proc] = []
    up = free_port()
    p = Proc(["-m", "tests.support.fake_upstream", "--port", str(up), "--mode", "ok",
              "--name", "ok"], tmp / "up.log")
    procs.append(p)
    p.wait_http(f"http://127.0.0.1:{up}/health")
    gw_port = free_port()
    cfg = tmp / "fleet.yaml"
    cfg.write_text(_config(gw_port, up, tmp, admin_keys))
    gw = Proc(["-m", "inferplane.cli", "serve", "--config", str(cfg)], tmp / "gw.log")
    procs.append(gw)
    base = f"http://127.0.0.1:{gw_port}"
    try:
        gw.wait_http(f"{base}/ready")
    except BaseException:
        for q in procs:
            q.stop()
        raise
    return procs, base


def _config(gw_port: int, up: int, tmp: Path, admin_keys: list[str], *,
            gateway: dict[str, Any] | None = None, **sections: Any) -> str:
    """The fleet file: ``gateway`` adds to its gateway block, ``sections`` are further blocks."""
    return to_yaml(pool_fleet(
        up, substrate={"name": "pool-a"}, models=[model("m-ok", max_context=4096)],
        endpoint_fields={"name": "ep-ok", "engine": "vllm"},
        gateway={"port": gw_port, "scrape_interval_s": 0.05, "ledger_path": str(tmp / "ledger.db"),
                 "metrics": {"api_keys": admin_keys}, **(gateway or {})},
        tenants=[tenant("acme", TENANT)], **sections))


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    procs, base = _stack(tmp_path_factory.mktemp("console"), [hash_key(ADMIN)])
    try:
        ids = []
        for i in range(3):
            r = httpx.post(f"{base}/v1/chat/completions", headers=_h(TENANT), json={
                "model": "m-ok", "messages": [{"role": "user", "content": f"hello {i}"}]})
            assert r.status_code == 200, r.text
            ids.append((r.headers["x-inferplane-decision-id"], r.headers["x-inferplane-receipt"]))
        yield {"base": base, "decisions": ids}
    finally:
        for p in procs:
            p.stop()


def _h(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def _admin() -> dict[str, str]:
    return _h(ADMIN)


@pytest.mark.parametrize("path", ["/console/fleet", "/console/fleet/panel", "/console/spend",
                                  "/console/decisions", "/console/receipt",
                                  "/console/economics", "/console/decisions/x"])
def test_every_page_needs_an_admin_key(stack: dict[str, Any], path: str) -> None:
    url = stack["base"] + path
    r = httpx.get(url)
    assert r.status_code == 401
    err = r.json()["error"]
    assert err["code"] == "missing_api_key" and "admin key" in err["message"]
    r = httpx.get(url, headers=_h(TENANT))  # a tenant's key is no admin key
    assert r.status_code == 403 and r.json()["error"]["type"]
    assert TENANT not in r.text
    r = httpx.get(url, cookies={"inferplane_console": "sk-wrong"},
                  headers={"HX-Request": "true"})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_session"
    r = httpx.get(url, cookies={"inferplane_console": ADMIN},  # the key is no session
                  headers={"HX-Request": "true"})
    assert r.status_code == 401


def test_a_browser_without_a_key_is_sent_to_the_login_form(stack: dict[str, Any]) -> None:
    r = httpx.get(f"{stack['base']}/console/spend", headers={"Accept": "text/html"})
    assert r.status_code == 303
    assert r.headers["location"] == "/console/login?next=%2Fconsole%2Fspend"
    form = httpx.get(f"{stack['base']}{r.headers['location']}")
    assert form.status_code == 200 and 'name="key"' in form.text
    assert 'value="/console/spend"' in form.text


def test_login_sets_a_strict_httponly_cookie_and_refuses_other_keys(
    stack: dict[str, Any]
) -> None:
    base = stack["base"]
    bad = httpx.post(f"{base}/console/login", data={"key": TENANT, "next": "/console/spend"})
    assert bad.status_code == 403 and "not an admin key" in bad.text
    assert "set-cookie" not in bad.headers
    ok = httpx.post(f"{base}/console/login", data={"key": ADMIN, "next": "/console/spend"})
    assert ok.status_code == 303 and ok.headers["location"] == "/console/spend"
    cookie = ok.headers["set-cookie"]
    for flag in ("HttpOnly", "SameSite=Strict", "Path=/console", "Max-Age="):
        assert flag in cookie
    # elsewhere than the console: never an open redirect
    for nxt in ("https://evil.example/", "//evil.example/console/", "/v1/models"):
        r = httpx.post(f"{base}/console/login", data={"key": ADMIN, "next": nxt})
        assert r.headers["location"] == "/console/fleet"
    assert "Secure" not in cookie  # plain HTTP here
    token = ok.cookies["inferplane_console"]
    assert token and ADMIN not in token and token != ADMIN
    assert hash_key(ADMIN).split(":")[1] not in token  # nor the key's hash
    again = httpx.post(f"{base}/console/login", data={"key": ADMIN})
    assert again.cookies["inferplane_console"] != token  # a fresh session each time
    with httpx.Client(base_url=base, cookies={"inferplane_console": token}) as c:
        page = c.get("/console/spend")
        assert page.status_code == 200 and "acme" in page.text
        out = c.post("/console/logout")
        assert out.status_code == 303 and 'inferplane_console=""' in out.headers["set-cookie"]
    # the logged-out session is dead even if the browser kept the cookie
    r = httpx.get(f"{base}/console/spend", cookies={"inferplane_console": token},
                  headers={"HX-Request": "true"})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_session"
    r = httpx.get(f"{base}/console/spend", cookies={"inferplane_console": token},
                  headers={"Accept": "text/html"})
    assert r.status_code == 303 and r.headers["location"].startswith("/console/login")
    # a tampered token (a later expiry) is refused
    other = again.cookies["inferplane_console"]
    sid, exp, mac = other.split(".")
    forged = f"{sid}.{int(exp) + 3600}.{mac}"
    r = httpx.get(f"{base}/console/spend", cookies={"inferplane_console": forged},
                  headers={"HX-Request": "true"})
    assert r.status_code == 401
    r = httpx.get(f"{base}/console/spend", cookies={"inferplane_console": other},
                  headers={"HX-Request": "true"})
    assert r.status_code == 200


def test_the_cookie_is_secure_behind_tls(stack: dict[str, Any]) -> None:
    ok = httpx.post(f"{stack['base']}/console/login", data={"key": ADMIN},
                    headers={"X-Forwarded-Proto": "https"})
    assert ok.status_code == 303 and "Secure" in ok.headers["set-cookie"]


def _from(address: str) -> httpx.Client:
    """A client whose connections come from another loopback address (its own throttle)."""
    return httpx.Client(transport=httpx.HTTPTransport(local_address=address))


def test_failed_logins_are_throttled_per_address(stack: dict[str, Any]) -> None:
    url = f"{stack['base']}/console/login"
    with _from("127.0.0.2") as c, _from("127.0.0.3") as other:
        for _ in range(5):
            assert c.post(url, data={"key": "sk-guess"}).status_code == 403
        r = c.post(url, data={"key": "sk-guess"})
        assert r.status_code == 429 and 1 <= int(r.headers["retry-after"]) <= 60
        assert "Too many failed log-ins" in r.text
        r = c.post(url, data={"key": ADMIN})  # even the right key waits
        assert r.status_code == 429 and "set-cookie" not in r.headers
        ok = other.post(url, data={"key": ADMIN})  # another address is not held back
        assert ok.status_code == 303 and ok.cookies["inferplane_console"]


def test_sessions_expire_are_revoked_and_end_with_their_key() -> None:
    s = Sessions(b"k" * 32, ttl_s=60)
    hashes = {hash_key(ADMIN), hash_key("sk-other-admin")}
    token = s.issue(hash_key(ADMIN), now=1000.0)
    assert s.check(token, hashes, now=1059.0)
    assert not s.check(token, hashes, now=1061.0)  # expired
    assert not s.check(token, {hash_key("sk-other-admin")}, now=1001.0)  # its key removed
    assert not Sessions(b"j" * 32, 60).check(token, hashes, now=1001.0)  # another secret
    s.revoke(token, now=1002.0)
    assert not s.check(token, hashes, now=1003.0)
    for bad in ("", "a.b", "a.b.c", "x.1.y.z", token + "x"):
        assert not s.check(bad, hashes, now=1001.0)
    assert matching_hash(hash_key(ADMIN), hashes) == hash_key(ADMIN)
    assert matching_hash(hash_key(TENANT), hashes) is None


def test_the_throttle_window_slides() -> None:
    t = LoginThrottle(max_failures=3, window_s=60)
    for i in range(3):
        assert t.retry_after("a", now=100.0 + i) is None
        t.failed("a", now=100.0 + i)
    assert t.retry_after("a", now=103.0) == 57
    assert t.retry_after("b", now=103.0) is None
    assert t.retry_after("a", now=160.5) is None  # the first failure left the window


def test_pages_carry_a_content_security_policy(stack: dict[str, Any]) -> None:
    r = httpx.get(f"{stack['base']}/console/fleet", headers=_admin())
    assert "script-src 'self'" in r.headers["content-security-policy"]
    assert r.headers["x-frame-options"] == "DENY" and r.headers["cache-control"] == "no-store"
    js = httpx.get(f"{stack['base']}/console/static/htmx.min.js")  # assets need no key
    assert js.status_code == 200 and js.headers["content-type"].startswith("text/javascript")
    assert b"htmx" in js.content[:200]
    # every page links the icon, so a browser never asks for /favicon.ico (a 404 there)
    assert '/console/static/favicon.svg' in r.text
    icon = httpx.get(f"{stack['base']}/console/static/favicon.svg")
    assert icon.status_code == 200 and icon.headers["content-type"].startswith("image/svg+xml")
    assert httpx.get(f"{stack['base']}/console/static/../app.py").status_code == 404


def test_fleet_page_shows_each_endpoint_and_pool(stack: dict[str, Any]) -> None:
    r = httpx.get(f"{stack['base']}/console/fleet", headers=_admin())
    assert r.status_code == 200
    assert "ep-ok" in r.text and "pool-a" in r.text and "healthy" in r.text
    assert 'hx-trigger="every 3s"' in r.text
    panel = httpx.get(f"{stack['base']}/console/fleet/panel", headers=_admin())
    assert panel.status_code == 200 and "<html" not in panel.text and "ep-ok" in panel.text
    assert "1 of 1 endpoints usable" in panel.text


def test_spend_page_sums_the_tenants_usage(stack: dict[str, Any]) -> None:
    usage = httpx.get(f"{stack['base']}/v1/usage?group_by=model", headers=_h(TENANT)).json()
    r = httpx.get(f"{stack['base']}/console/spend", headers=_admin())
    assert r.status_code == 200
    assert "m-ok" in r.text and "acme" in r.text
    assert f">{usage['total']['requests']}<" in r.text.replace(" ", "")


def test_decisions_lists_recent_records_and_finds_one(stack: dict[str, Any]) -> None:
    base = stack["base"]
    did, receipt = stack["decisions"][-1]
    r = httpx.get(f"{base}/console/decisions", headers=_admin())
    assert r.status_code == 200
    assert all(d in r.text for d, _ in stack["decisions"])
    assert r.text.index(stack["decisions"][-1][0]) < r.text.index(stack["decisions"][0][0])
    found = httpx.get(f"{base}/console/decisions?id={did}", headers=_admin())
    assert found.status_code == 303 and found.headers["location"] == f"/console/decisions/{did}"
    page = httpx.get(f"{base}{found.headers['location']}", headers=_admin())
    assert page.status_code == 200
    assert receipt in page.text and "ep-ok" in page.text and "Candidates" in page.text
    filtered = httpx.get(f"{base}/console/decisions?model=nope", headers={
        **_admin(), "HX-Request": "true"})
    assert filtered.status_code == 200 and "no decisions in this window" in filtered.text
    assert "<html" not in filtered.text
    bad = httpx.get(f"{base}/console/decisions?since=yesterday-ish", headers=_admin())
    assert bad.status_code == 200 and "since must be unix seconds or an ISO 8601 time" in bad.text
    missing = httpx.get(f"{base}/console/decisions/no-such-id", headers=_admin())
    assert missing.status_code == 404 and "no record" in missing.text


def test_receipt_check_passes_the_record_and_fails_an_edit(stack: dict[str, Any]) -> None:
    base = stack["base"]
    did, receipt = stack["decisions"][0]
    item = httpx.get(f"{base}/v1/decisions", headers=_h(TENANT)).json()["data"][0]
    assert item["record"]["decision_id"] == did
    text = orjson.dumps(item["record"]).decode()
    ok = httpx.post(f"{base}/console/receipt", headers=_admin(),
                    data={"record": text, "receipt": receipt})
    assert ok.status_code == 200 and "Receipt holds" in ok.text
    assert "the ledger holds this very record" in ok.text
    # the list item as it stands (its own receipt inside)
    ok2 = httpx.post(f"{base}/console/receipt", headers={**_admin(), "HX-Request": "true"},
                     data={"record": orjson.dumps(item).decode()})
    assert "Receipt holds" in ok2.text and "<html" not in ok2.text
    edited = dict(item["record"], tenant="someone-else")
    bad = httpx.post(f"{base}/console/receipt", headers=_admin(),
                     data={"record": orjson.dumps(edited).decode(), "receipt": receipt})
    assert bad.status_code == 200 and "Check failed" in bad.text
    assert "not to the receipt given" in bad.text and "differs" in bad.text
    junk = httpx.post(f"{base}/console/receipt", headers=_admin(),
                      data={"record": "{not json", "receipt": "zz"})
    assert junk.status_code == 200 and "not JSON" in junk.text


def test_economics_page_reads_the_ledger(stack: dict[str, Any]) -> None:
    r = httpx.get(f"{stack['base']}/console/economics", headers=_admin())
    assert r.status_code == 200
    assert "pool-a" in r.text and "served requests" in r.text


async def test_no_admin_keys_no_console(tmp_path: Path) -> None:
    """In process (one gateway process per module is enough): with no admin keys the console
    answers 403 to every key and its log-in sets no cookie."""
    cfg = tmp_path / "fleet.yaml"
    cfg.write_text(_config(free_port(), free_port(), tmp_path, []))
    gateway = Gateway(load_config(cfg), str(cfg))
    async with TestClient(TestServer(build_app(gateway))) as client:
        r = await client.get("/console/fleet", headers=_h(TENANT))
        assert r.status == 403
        assert "gateway.metrics.api_keys" in (await r.json())["error"]["message"]
        login = await client.post("/console/login", data={"key": ADMIN})
        assert login.status == 403 and "Set-Cookie" not in login.headers


def test_spark_points_scale_a_series_into_the_box() -> None:
    assert spark_points([]) == "" and spark_points([3.0]) == ""
    assert spark_points([None, None]) == ""
    assert spark_points([0.0, 1.0], w=64, h=22) == "0.0,21.0 64.0,1.0"
    # a missing sample is skipped, the x positions keep their places
    assert spark_points([2.0, None, 4.0], w=10, h=12) == "0.0,6.0 10.0,1.0"
    # a flat series lies on the floor
    assert spark_points([0.0, 0.0, 0.0], w=10, h=12) == "0.0,11.0 5.0,11.0 10.0,11.0"


async def test_fleet_panel_draws_each_pools_history(tmp_path: Path) -> None:
    """The sampler's history becomes one sparkline per series of each pool."""
    cfg = tmp_path / "fleet.yaml"
    cfg.write_text(_config(free_port(), free_port(), tmp_path, [hash_key(ADMIN)]))
    app = build_app(Gateway(load_config(cfg), str(cfg)))
    async with TestClient(TestServer(app)) as client:
        empty = await (await client.get("/console/fleet/panel", headers=_admin())).text()
        assert "<polyline" not in empty and empty.count('class="spark ') == 3
        history = app[HISTORY]
        gw = app[GATEWAY]
        for _ in range(3):
            history.sample([p.to_json() for p in gw.pool_health().values()])
        r = await client.get("/console/fleet/panel", headers=_admin())
        text = await r.text()
        # no engine answers here: the queue is known (0), KV pressure and P99/P50 are not
        assert r.status == 200 and text.count("<polyline") == 1
        assert 'class="spark s-waiting"' in text
        assert len(history.samples["pool-a"]) >= 4  # the sampler's own (on start-up) and ours


async def test_economics_page_shows_the_refreshers_report(tmp_path: Path) -> None:
    """With ``economics.refresh_s`` the page shows the gateway's latest report (no ledger read
    per view); ``?fresh=1`` computes one now."""
    cfg = tmp_path / "fleet.yaml"
    cfg.write_text(_config(free_port(), free_port(), tmp_path, [hash_key(ADMIN)],
                           economics={"refresh_s": 0.1}))
    app = build_app(Gateway(load_config(cfg), str(cfg)))
    async with TestClient(TestServer(app)) as client:
        collector = app[GATEWAY].economics.collector  # type: ignore[union-attr]
        for _ in range(100):
            if collector.report is not None:
                break
            await asyncio.sleep(0.05)
        assert collector.report is not None
        r = await client.get("/console/economics", headers=_admin())
        text = await r.text()
        assert r.status == 200 and "by the gateway's refresher" in text and "pool-a" in text
        fresh = await (await client.get("/console/economics?fresh=1", headers=_admin())).text()
        assert "pool-a" in fresh and "refresher" not in fresh


async def test_a_malformed_receipt_form_is_a_400(tmp_path: Path) -> None:
    cfg = tmp_path / "fleet.yaml"
    cfg.write_text(_config(free_port(), free_port(), tmp_path, [hash_key(ADMIN)]))
    async with TestClient(TestServer(build_app(Gateway(load_config(cfg), str(cfg))))) as client:
        for ctype, body in [("application/x-www-form-urlencoded", b"\xff\xfe=\xff"),
                            ("multipart/form-data; boundary=X", b"garbage")]:
            r = await client.post("/console/receipt", data=body,
                                  headers={**_admin(), "Content-Type": ctype})
            assert r.status == 400
            assert (await r.json())["error"]["message"].startswith("malformed form")


def test_the_client_address_behind_trusted_proxies() -> None:
    nets = [ip_network("10.0.0.0/8"), ip_network("fd00::/8")]
    assert client_address("192.0.2.9", ["198.51.100.1"], nets) == "192.0.2.9"  # untrusted peer
    assert client_address("10.0.0.2", ["198.51.100.1"], nets) == "198.51.100.1"
    # the right-most untrusted hop: what the client wrote left of it may be forged
    assert client_address("10.0.0.2", ["6.6.6.6, 198.51.100.1, 10.1.1.1"], nets) == "198.51.100.1"
    assert client_address("10.0.0.2", ["6.6.6.6", "198.51.100.1,10.1.1.1"], nets) == "198.51.100.1"
    assert client_address("fd00::1", ["2001:db8::5"], nets) == "2001:db8::5"
    assert client_address("10.0.0.2", [], nets) == "10.0.0.2"  # no header: the proxy itself
    assert client_address("10.0.0.2", ["10.3.3.3"], nets) == "10.3.3.3"  # all trusted
    assert client_address("10.0.0.2", ["junk, 10.3.3.3"], nets) == "10.3.3.3"  # stops at junk
    assert client_address("10.0.0.2", ["198.51.100.1"], []) == "10.0.0.2"  # default: none


async def test_failed_logins_behind_a_trusted_proxy_are_throttled_per_client(
    tmp_path: Path,
) -> None:
    """Review of issue 11: behind Envoy every connection comes from the proxy. With the proxy in
    ``gateway.trusted_proxies`` the throttle keys on the client named by X-Forwarded-For, so one
    client's bad guesses do not lock every admin out (before: all keyed on the proxy, 429)."""
    cfg = tmp_path / "fleet.yaml"
    cfg.write_text(_config(free_port(), free_port(), tmp_path, [hash_key(ADMIN)],
                           gateway={"trusted_proxies": ["127.0.0.0/8", "::1"]}))
    async with TestClient(TestServer(build_app(Gateway(load_config(cfg), str(cfg))))) as c:
        guesser = {"X-Forwarded-For": "203.0.113.7"}
        for _ in range(5):
            r = await c.post("/console/login", data={"key": "sk-guess"}, headers=guesser)
            assert r.status == 403
        r = await c.post("/console/login", data={"key": ADMIN}, headers=guesser)
        assert r.status == 429  # the guesser is held back
        # a forged left-most hop does not help: the proxy appended the real address
        r = await c.post("/console/login", data={"key": ADMIN},
                         headers={"X-Forwarded-For": "198.51.100.99, 203.0.113.7"})
        assert r.status == 429
        ok = await c.post("/console/login", data={"key": ADMIN}, allow_redirects=False,
                          headers={"X-Forwarded-For": "203.0.113.8"})
        assert ok.status == 303  # another admin behind the same proxy logs in


REDIS_URL = "redis://127.0.0.1:6379/0"


def _redis_up() -> bool:
    import redis

    try:
        return bool(redis.Redis.from_url(REDIS_URL, socket_timeout=0.5).ping())
    except redis.RedisError:
        return False


async def test_a_log_out_holds_on_every_replica_through_redis(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Review of issue 11: with ``admission.store: redis`` a log-out on one gateway ends the
    session on another sharing the secret (before: only in the process that served it, so a
    copied cookie stayed valid elsewhere until it expired). The revocation's key expires with the
    session."""
    if not _redis_up():
        pytest.skip(f"no Redis at {REDIS_URL}")
    import redis.asyncio as aioredis

    monkeypatch.setenv("INFERPLANE_CONSOLE_SECRET", "ab" * 32)
    prefix = f"test-console-{uuid.uuid4().hex}:"
    apps = []
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        cfg = tmp_path / name / "fleet.yaml"
        cfg.write_text(_config(free_port(), free_port(), tmp_path / name, [hash_key(ADMIN)],
                               admission={"store": "redis", "redis_url": REDIS_URL,
                                          "redis_prefix": prefix}))
        apps.append(build_app(Gateway(load_config(cfg), str(cfg))))
    r = aioredis.Redis.from_url(REDIS_URL)
    try:
        async with TestClient(TestServer(apps[0])) as a, TestClient(TestServer(apps[1])) as b:
            login = await a.post("/console/login", data={"key": ADMIN}, allow_redirects=False)
            assert login.status == 303
            token = login.cookies["inferplane_console"].value
            page = {"Cookie": f"inferplane_console={token}", "HX-Request": "true"}
            assert (await b.get("/console/spend", headers=page)).status == 200  # one secret
            out = await a.post("/console/logout", headers={"Cookie": f"inferplane_console={token}"},
                               allow_redirects=False)
            assert out.status == 303
            r2 = await b.get("/console/spend", headers=page)
            assert r2.status == 401 and (await r2.json())["error"]["code"] == "invalid_session"
            ttl_ms = await r.pttl(f"{prefix}console:revoked:{token.split('.')[0]}")
            assert 0 < ttl_ms <= COOKIE_MAX_AGE_S * 1000
    finally:
        keys = [k async for k in r.scan_iter(match=f"{prefix}*")]
        if keys:
            await r.delete(*keys)
        await r.aclose()


async def test_log_outs_fall_back_to_the_process_while_redis_is_down() -> None:
    """Redis unreachable: the log-out holds in this process, and it is written to Redis once
    Redis answers (here: a client of a port nobody listens on, then `up` reports it down)."""
    import redis.asyncio as aioredis

    dead = aioredis.Redis.from_url(f"redis://127.0.0.1:{free_port()}/0", socket_timeout=0.5,
                                   socket_connect_timeout=0.5)
    shared = RedisRevocations(dead, "x:")
    s = Sessions(b"k" * 32, ttl_s=60, shared=shared)
    hashes = {hash_key(ADMIN)}
    token, other = s.issue(hash_key(ADMIN)), s.issue(hash_key(ADMIN))
    assert await s.check_shared(token, hashes)  # Redis down: local revocations only
    await s.revoke_shared(token)
    assert not await s.check_shared(token, hashes)  # held here
    assert await s.check_shared(other, hashes)
    assert token.split(".")[0] in shared.pending  # to be written once Redis answers
    shared.up = lambda: False  # the admission store knows Redis is down: not even asked
    assert await shared.is_revoked("anything", 0.0) is None
    await dead.aclose()
