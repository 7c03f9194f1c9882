"""Evidence over HTTP, against a real gateway process with a signed SQLite ledger: receipts on
answers and streams, the records they name (committed before the answer), the tenant-scoped list
route, billing when a client drops a stream, a record for a request abandoned before its answer,
and `inferplane verify` / `export` on the live file."""

from __future__ import annotations

import hashlib
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import orjson
import pytest
from typer.testing import CliRunner

from inferplane.cli import app
from inferplane.ledger.chain import generate_private_pem
from tests.builders import endpoint, model, pool_fleet, tenant, to_yaml
from tests.support.procs import Proc, free_port

KEY_A, KEY_B = "sk-ev-a", "sk-ev-b"


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    tmp = tmp_path_factory.mktemp("ev")
    procs: list[Proc] = []
    ups = {"ok": free_port(), "slowjson": free_port(), "cut": free_port()}
    try:
        for mode, port in ups.items():
            p = Proc(["-m", "tests.support.fake_upstream", "--port", str(port), "--mode", mode,
                      "--name", mode], tmp / f"{mode}.log")
            procs.append(p)
            p.wait_http(f"http://127.0.0.1:{port}/health")
        key = tmp / "ledger.key"
        key.write_bytes(generate_private_pem())
        ledger = tmp / "ledger.db"
        gw_port = free_port()
        cfg = tmp / "fleet.yaml"
        cfg.write_text(to_yaml(pool_fleet(
            gateway={"port": gw_port, "scrape_interval_s": 0.05, "ledger_path": str(ledger)},
            ledger={"signing_key_file": str(key), "checkpoint_every": 5},
            substrate={"cost": {"input_per_mtok": 1.0, "output_per_mtok": 1000000.0}},
            endpoints=[endpoint(mode, port, engine="vllm",
                                models=[model(f"m-{mode}", max_context=4096)])
                       for mode, port in ups.items()],
            tenants=[tenant("ta", KEY_A), tenant("tb", KEY_B)],
        )))
        gw = Proc(["-m", "inferplane.cli", "serve", "--config", str(cfg)], tmp / "gw.log")
        procs.append(gw)
        base = f"http://127.0.0.1:{gw_port}"
        gw.wait_http(f"{base}/ready")
        yield {"base": base, "ledger": ledger, "config": cfg, "log": tmp / "gw.log"}
    finally:
        for p in procs:
            p.stop()


def _h(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def _committed(ledger: Path, decision_id: str) -> list[tuple[str, str]]:
    """The (record, receipt) rows of a decision as another process sees the file now."""
    conn = sqlite3.connect(f"{ledger.resolve().as_uri()}?mode=ro", uri=True)
    try:
        return list(conn.execute(
            "SELECT record, receipt FROM decisions WHERE decision_id = ? ORDER BY seq",
            (decision_id,)))
    finally:
        conn.close()


CHAT = {"model": "m-ok", "messages": [{"role": "user", "content": "hello"}]}


def test_an_answer_carries_the_receipt_of_its_committed_record(stack: dict[str, Any]) -> None:
    r = httpx.post(f"{stack['base']}/v1/chat/completions", json=CHAT, headers=_h(KEY_A))
    assert r.status_code == 200
    receipt = r.headers["x-inferplane-receipt"]
    # committed before the answer left: another process reads it at once
    rows = _committed(stack["ledger"], r.headers["x-inferplane-decision-id"])
    assert len(rows) == 1
    text, stored = rows[0]
    assert stored == receipt == hashlib.sha256(text.encode()).hexdigest()
    rec = orjson.loads(text)
    assert rec["outcome"]["status"] == 200 and rec["outcome"]["usage_source"] == "upstream"


def test_a_stream_ends_with_its_receipt_before_done(stack: dict[str, Any]) -> None:
    with httpx.stream("POST", f"{stack['base']}/v1/chat/completions",
                      json={**CHAT, "stream": True}, headers=_h(KEY_A)) as r:
        body = b"".join(r.iter_bytes())
        did = r.headers["x-inferplane-decision-id"]
    events = [e for e in body.split(b"\n\n") if e]
    assert events[-1] == b"data: [DONE]"
    assert events[-2].startswith(b": x-inferplane-receipt ")
    receipt = events[-2].split()[-1].decode()
    rows = _committed(stack["ledger"], did)
    assert rows and rows[-1][1] == receipt
    # and an OpenAI client reads the same stream without noticing the comment
    oc = openai.OpenAI(base_url=f"{stack['base']}/v1", api_key=KEY_A, max_retries=0)
    chunks = list(oc.chat.completions.create(model="m-ok", stream=True,
                                             messages=[{"role": "user", "content": "x"}]))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices).split() == [
        f"ok-w{i}" for i in range(5)]


def test_a_receipt_checks_against_the_exported_record(
    stack: dict[str, Any], tmp_path: Path
) -> None:
    r = httpx.post(f"{stack['base']}/v1/chat/completions", json=CHAT, headers=_h(KEY_B))
    receipt, did = r.headers["x-inferplane-receipt"], r.headers["x-inferplane-decision-id"]
    out = tmp_path / "x.ndjson"
    res = CliRunner().invoke(app, ["export", "--config", str(stack["config"]), "--tenant", "tb",
                                   "-o", str(out)])
    assert res.exit_code == 0, res.output
    assert "`inferplane verify` checks each against its hashed record" in res.output  # r27 #9
    lines = [orjson.loads(x) for x in out.read_bytes().splitlines()]
    mine = [x for x in lines if x["record"]["decision_id"] == did]
    assert len(mine) == 1 and mine[0]["receipt"] == receipt
    # what docs/evidence.md tells a customer to do: hash the record in canonical form
    canon = orjson.dumps(mine[0]["record"], option=orjson.OPT_SORT_KEYS)
    assert hashlib.sha256(canon).hexdigest() == receipt
    assert all(x["record"]["tenant"] == "tb" for x in lines)


def test_list_decisions_is_tenant_scoped_filtered_and_paginated(stack: dict[str, Any]) -> None:
    base = stack["base"]
    since = time.time()
    mine = [httpx.post(f"{base}/v1/chat/completions", json=CHAT, headers=_h(KEY_A))
            .headers["x-inferplane-decision-id"] for _ in range(5)]
    httpx.post(f"{base}/v1/chat/completions", json=CHAT, headers=_h(KEY_B))
    seen: list[str] = []
    cursor = None
    for _ in range(10):
        params: dict[str, Any] = {"since": since, "limit": 2, "model": "m-ok"}
        if cursor:
            params["cursor"] = cursor
        page = httpx.get(f"{base}/v1/decisions", params=params, headers=_h(KEY_A)).json()
        assert len(page["data"]) <= 2
        for item in page["data"]:
            assert item["record"]["tenant"] == "ta"
            assert hashlib.sha256(orjson.dumps(item["record"], option=orjson.OPT_SORT_KEYS)) \
                .hexdigest() == item["receipt"]
        seen += [it["record"]["decision_id"] for it in page["data"]]
        cursor = page["next_cursor"]
        assert page["has_more"] == (cursor is not None)
        if not cursor:
            break
    assert seen == mine
    none = httpx.get(f"{base}/v1/decisions", params={"since": since, "substrate": "nope"},
                     headers=_h(KEY_A)).json()
    assert none["data"] == [] and none["next_cursor"] is None
    iso = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(since + 3600))
    later = httpx.get(f"{base}/v1/decisions", params={"since": iso}, headers=_h(KEY_A)).json()
    assert later["data"] == []
    for params, param in [({"cursor": "garbage!"}, "cursor"), ({"limit": "0"}, "limit"),
                          ({"limit": "5000"}, "limit"), ({"since": "yesterday"}, "since"),
                          ({"tenant": "tb"}, "tenant")]:
        bad = httpx.get(f"{base}/v1/decisions", params=params, headers=_h(KEY_A))
        assert bad.status_code == 400, bad.text
        assert bad.json()["error"]["param"] == param
    assert httpx.get(f"{base}/v1/decisions").status_code == 401


def _wait_for(pred: Any, timeout: float = 5.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = pred()
        if got:
            return got
        time.sleep(0.05)
    return pred()


def test_a_dropped_stream_is_billed_for_the_tokens_it_received(stack: dict[str, Any]) -> None:
    """Issue 12 item 11: the client leaves after two tokens; no usage chunk ever arrives."""
    with httpx.stream("POST", f"{stack['base']}/v1/chat/completions",
                      json={**CHAT, "model": "m-slowjson", "stream": True},
                      headers=_h(KEY_A)) as r:
        did = r.headers["x-inferplane-decision-id"]
        got = b""
        for chunk in r.iter_bytes():
            got += chunk
            if got.count(b"slowjson-w") >= 2:
                break
    rows = _wait_for(lambda: _committed(stack["ledger"], did))
    rec = orjson.loads(rows[-1][0])
    out = rec["outcome"]
    assert out["status"] == 499 and out["error"] == "client disconnected"
    assert out["usage_source"] == "counted"
    assert 2 <= out["completion_tokens"] <= 3  # what was generated and relayed, not 0
    assert out["cost_usd"] >= 2.0  # output is priced at $1 a token in this fleet


def test_an_upstream_cut_mid_stream_is_billed_for_what_it_sent(stack: dict[str, Any]) -> None:
    with httpx.stream("POST", f"{stack['base']}/v1/chat/completions",
                      json={**CHAT, "model": "m-cut", "stream": True}, headers=_h(KEY_A)) as r:
        did = r.headers["x-inferplane-decision-id"]
        body = b"".join(r.iter_bytes())
    assert b"cut-w1" in body and b'"error"' in body
    out = orjson.loads(_wait_for(lambda: _committed(stack["ledger"], did))[-1][0])["outcome"]
    assert out["status"] == 502 and out["completion_tokens"] == 2
    assert out["usage_source"] == "counted"


def test_a_non_streamed_request_abandoned_by_its_client_has_a_record(
    stack: dict[str, Any]
) -> None:
    since = time.time()
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{stack['base']}/v1/chat/completions",
                   json={**CHAT, "model": "m-slowjson"}, headers=_h(KEY_B), timeout=0.3)

    def find() -> list[dict[str, Any]]:
        page = httpx.get(f"{stack['base']}/v1/decisions",
                         params={"since": since, "model": "m-slowjson"}, headers=_h(KEY_B))
        return [it["record"] for it in page.json()["data"]]

    recs = _wait_for(find)
    assert len(recs) == 1, recs
    out = recs[0]["outcome"]
    assert out["status"] == 499 and "client disconnected" in out["error"]


def test_verify_the_live_ledger(stack: dict[str, Any]) -> None:
    res = CliRunner().invoke(app, ["verify", "--config", str(stack["config"])])
    assert res.exit_code == 0, res.output
    assert "records intact" in res.output
    assert "Traceback" not in stack["log"].read_text()

