"""The web console in headless Chromium (Debian's /usr/bin/chromium driven by Playwright), against
a real gateway process in front of emulated engines on loopback: every page renders with the
gateway's live data, the admin key is required, the fleet panel refreshes itself (htmx), search
finds a decision, and the receipt check passes a kept receipt. No page logs an error (a Content
Security Policy violation included).

Run with ``make test-browser``. With ``INFERPLANE_CONSOLE_SCREENSHOTS=DIR`` each page's screenshot
is written into DIR (the ones in docs/console/ were made so).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from inferplane.api.pipeline import hash_key
from tests.support.procs import Proc, free_port

pytestmark = pytest.mark.browser

CHROMIUM = os.environ.get("INFERPLANE_CHROMIUM", "/usr/bin/chromium")
ADMIN = "sk-console-browser-admin"
TENANTS = {"acme": "sk-console-acme", "globex": "sk-console-globex"}
VIEWPORT = {"width": 1280, "height": 820}


def _fleet(gw_port: int, ports: list[int], ledger: Path) -> str:
    def ep(name: str, port: int) -> str:
        return f"""
      - name: {name}
        url: http://127.0.0.1:{port}
        engine: vllm
        models: [{{name: llama-3.1-8b, max_context: 32768}}]
        max_concurrency: 16"""

    return f"""
gateway:
  port: {gw_port}
  scrape_interval_s: 0.1
  token_estimate: words
  ledger_path: {ledger}
  metrics: {{api_keys: ["{hash_key(ADMIN)}"]}}
regions:
  - {{name: eu-west, egress_usd_per_gb: 0.02}}
  - {{name: us-east, egress_usd_per_gb: 0.02}}
substrates:
  - name: eu-h100
    kind: gpu
    hardware: h100
    region: eu-west
    jurisdiction: eu
    capacity_class: reserved
    cost: {{hourly_usd: 3.50}}
    endpoints:{ep("eu-h100-0", ports[0])}{ep("eu-h100-1", ports[1])}
  - name: us-a100
    kind: gpu
    hardware: a100
    region: us-east
    jurisdiction: us
    capacity_class: burst
    cost: {{input_per_mtok: 0.20, output_per_mtok: 0.60}}
    endpoints:{ep("us-a100-0", ports[2])}
tenants:
  - name: acme
    api_keys: ["{hash_key(TENANTS['acme'])}"]
    default_class: interactive
  - name: globex
    api_keys: ["{hash_key(TENANTS['globex'])}"]
    default_class: batch
"""


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} is absent: install Debian's chromium (apt-get install chromium)")
    tmp = tmp_path_factory.mktemp("console-browser")
    gw_port, ports = free_port(), [free_port() for _ in range(3)]
    cfg = tmp / "fleet.yaml"
    cfg.write_text(_fleet(gw_port, ports, tmp / "ledger.db"))
    procs: list[Proc] = []
    try:
        emu = Proc(["-m", "inferplane.cli", "emulate", "--config", str(cfg), "--time-scale", "20"],
                   tmp / "emu.log")
        procs.append(emu)
        for port in ports:
            emu.wait_http(f"http://127.0.0.1:{port}/health")
        gw = Proc(["-m", "inferplane.cli", "serve", "--config", str(cfg)], tmp / "gw.log")
        procs.append(gw)
        base = f"http://127.0.0.1:{gw_port}"
        gw.wait_http(f"{base}/ready")

        def one(i: int) -> tuple[str, str, str]:
            tenant = "acme" if i % 3 else "globex"
            headers = {"Authorization": f"Bearer {TENANTS[tenant]}",
                       "x-inferplane-workflow": f"wf-{i % 2}"}
            body = {"model": "llama-3.1-8b", "max_tokens": 16, "stream": i % 2 == 1,
                    "messages": [{"role": "user", "content": f"tell me about request {i} " * 8}]}
            with httpx.stream("POST", f"{base}/v1/chat/completions", timeout=30,
                              headers=headers, json=body) as r:
                data = r.read()
                assert r.status_code == 200, data
                did = r.headers["x-inferplane-decision-id"]
                receipt = r.headers.get("x-inferplane-receipt")
            if receipt is None:  # a stream: the receipt is its last comment
                (line,) = [x for x in data.split(b"\n") if x.startswith(b": x-inferplane-receipt")]
                receipt = line.split()[-1].decode()
            return tenant, did, receipt

        with ThreadPoolExecutor(4) as pool:  # bounded: 12 requests
            answers = list(pool.map(one, range(12)))
        yield {"base": base, "answers": answers}
    finally:
        for p in procs:
            p.stop()


@pytest.fixture(scope="module")
def browser(stack: dict[str, Any]) -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, headless=True,
                               args=["--no-sandbox", "--disable-gpu"])
        try:
            yield b
        finally:
            b.close()


@pytest.fixture
def page(browser: Any, stack: dict[str, Any]) -> Iterator[Any]:
    """A logged-in page; every console error (a CSP violation too) fails the test."""
    ctx = browser.new_context(viewport=VIEWPORT, base_url=stack["base"])
    p = ctx.new_page()
    errors: list[str] = []
    p.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    p.on("pageerror", lambda e: errors.append(str(e)))
    p.goto("/console/login")
    p.fill("input[name=key]", ADMIN)
    p.click("button[type=submit]")
    p.wait_for_url("**/console/fleet")
    yield p
    ctx.close()
    assert errors == []


def _shot(page: Any, name: str, full: bool = False) -> None:
    out = os.environ.get("INFERPLANE_CONSOLE_SCREENSHOTS")
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(Path(out) / f"{name}.png"), full_page=full)


def test_the_console_needs_an_admin_key(browser: Any, stack: dict[str, Any]) -> None:
    ctx = browser.new_context(viewport=VIEWPORT, base_url=stack["base"])
    p = ctx.new_page()
    p.goto("/console/spend")
    assert "/console/login" in p.url  # no key: the log-in form
    p.fill("input[name=key]", TENANTS["acme"])  # a tenant's key is not an admin key
    p.click("button[type=submit]")
    assert "not an admin key" in p.text_content("[role=alert]")
    _shot(p, "login")
    assert p.context.cookies() == []
    api = p.request.get("/console/fleet/panel")  # a script with no key: 401 in OpenAI's shape
    assert api.status == 401 and api.json()["error"]["code"] == "missing_api_key"
    p.fill("input[name=key]", ADMIN)
    p.click("button[type=submit]")
    p.wait_for_url("**/console/spend")  # back where it was going
    (cookie,) = p.context.cookies()
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict" and cookie["path"] == "/console"
    assert ADMIN not in cookie["value"]  # a session token, never the key
    assert p.evaluate("document.cookie") == ""  # scripts cannot read it
    p.click("form.logout button")
    p.wait_for_url("**/console/login")
    p.goto("/console/fleet")
    assert "/console/login" in p.url
    ctx.close()


def test_fleet_page_shows_live_health_and_refreshes(page: Any) -> None:
    rows = page.locator("#endpoints tbody tr")
    assert rows.count() == 3
    text = page.text_content("#endpoints")
    for name in ("eu-h100-0", "eu-h100-1", "us-a100-0"):
        assert name in text
    assert "healthy" in text
    assert page.locator("#pools tbody tr").count() == 2
    assert page.text_content("#fleet-stamp").startswith("3 of 3 endpoints usable")
    # the pools' history: sparklines drawn from the sampler (every 5 s), swapped in by htmx
    # (attached, not visible: a series that did not change is a flat line, whose box has no height)
    page.wait_for_selector("#pools svg.spark.s-kv_mean polyline", state="attached", timeout=15000)
    # htmx swaps the panel in again (its time stamp moves on)
    stamp = page.text_content("#fleet-stamp")
    page.wait_for_function(
        "s => document.querySelector('#fleet-stamp').textContent !== s", arg=stamp, timeout=10000
    )
    _shot(page, "fleet")


def test_spend_page_shows_each_tenant_and_model(page: Any, stack: dict[str, Any]) -> None:
    page.goto("/console/spend")
    table = page.text_content("#spend")
    assert "acme" in table and "globex" in table and "llama-3.1-8b" in table
    total = page.text_content("#spend-total")
    assert total.startswith("$") and float(total.strip("$").replace(",", "")) > 0
    usage = httpx.get(f"{stack['base']}/v1/usage?group_by=model",
                      headers={"Authorization": f"Bearer {TENANTS['acme']}"}).json()
    assert str(usage["total"]["requests"]) in page.text_content(".cards")
    _shot(page, "spend")


def test_search_finds_a_decision_with_its_evidence(page: Any, stack: dict[str, Any]) -> None:
    _, did, receipt = stack["answers"][5]
    page.goto("/console/decisions")
    assert page.locator("#recent-table tbody tr").count() == len(stack["answers"])
    _shot(page, "decisions")
    page.fill("#search input[name=id]", did)
    page.click("#search button")
    page.wait_for_url(f"**/console/decisions/{did}")
    assert page.text_content("#decision-id") == did
    assert page.text_content("#receipt") == receipt
    assert page.locator("#candidates tbody tr").count() == 3
    assert page.locator("#candidates tr.picked").count() == 1
    assert "TTFT" in page.text_content("#envelope")
    _shot(page, "decision", full=True)


def test_receipt_check_in_the_page(page: Any, stack: dict[str, Any]) -> None:
    tenant, did, receipt = stack["answers"][1]
    items = httpx.get(f"{stack['base']}/v1/decisions?limit=100",
                      headers={"Authorization": f"Bearer {TENANTS[tenant]}"}).json()["data"]
    (item,) = [i for i in items if i["record"]["decision_id"] == did]
    page.goto("/console/receipt")
    page.fill("textarea[name=record]", orjson.dumps(item["record"]).decode())
    page.fill("input[name=receipt]", receipt)
    page.click("form.stack button")
    page.wait_for_selector("#receipt-verdict")
    assert "Receipt holds" in page.text_content("#receipt-verdict")
    assert page.url.endswith("/console/receipt")  # swapped in by htmx, no navigation
    _shot(page, "receipt")
    page.fill("input[name=receipt]", "0" * 64)
    page.click("form.stack button")
    page.wait_for_selector("#receipt-verdict.fail")
    assert "not to the receipt given" in page.text_content("#receipt-verdict")


def test_economics_page_shows_the_report(page: Any) -> None:
    page.goto("/console/economics")
    pools = page.text_content("#economics-pools")
    assert "eu-h100" in pools and "us-a100" in pools
    assert "served requests" in page.text_content("#economics-window")
    _shot(page, "economics")

