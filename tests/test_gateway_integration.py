"""The gateway as a real process on loopback, in front of real HTTP upstreams, driven by the
`openai` client package: streaming, failover, every bad-input case, evidence headers."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from inferplane.api.pipeline import hash_key
from tests.builders import endpoint, model, pool_fleet, tenant, to_yaml
from tests.support.procs import Proc, free_port

KEY_A, KEY_B = "sk-test-a", "sk-test-b"
ADMIN = "sk-test-admin"


def _ep(name: str, port: int, served: str, ctx: int = 4096, embed: str | None = None
        ) -> dict[str, Any]:
    """An endpoint serving ``served``, and the embeddings model ``embed`` when given."""
    models = [model(served, max_context=ctx)]
    if embed is not None:
        models.append(model(embed, max_context=512, kind="embed"))
    return endpoint(name, port, engine="vllm", models=models)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, object]]:
    tmp = tmp_path_factory.mktemp("gw")
    groups = {"ok": ["ok-a", "ok-b", "ok-c", "small"], "fail500": ["bad-1", "dead"],
              "cut": ["cut"], "slow": ["slow"]}
    ups = {name: free_port() for names in groups.values() for name in names}
    procs: list[Proc] = []
    try:
        for mode, names in groups.items():
            ports = [a for n in names for a in ("--port", str(ups[n]))]
            p = Proc(["-m", "tests.support.fake_upstream", *ports, "--mode", mode,
                      "--name", names[0]], tmp / f"{mode}.log")
            procs.append(p)
            p.wait_http(f"http://127.0.0.1:{ups[names[0]]}/health")
        gw_port, metrics_port = free_port(), free_port()
        endpoints = [
            _ep("ok-a", ups["ok-a"], "m-ok", embed="m-embed"), _ep("ok-b", ups["ok-b"], "m-ok"),
            _ep("bad-1", ups["bad-1"], "m-flaky"), _ep("ok-c", ups["ok-c"], "m-flaky"),
            _ep("dead", ups["dead"], "m-dead"),
            _ep("cut", ups["cut"], "m-cut"), _ep("slow", ups["slow"], "m-slow"),
            _ep("small", ups["small"], "m-small", ctx=64),
        ]
        cfg = to_yaml(pool_fleet(
            gateway={"port": gw_port, "max_body_bytes": 20000, "scrape_interval_s": 0.05,
                     "seed": 3, "metrics": {"api_keys": [hash_key(ADMIN)], "port": metrics_port}},
            substrate={"cost": {"hourly_usd": 3.0}},
            endpoints=endpoints,
            tenants=[tenant("ta", KEY_A), tenant("tb", KEY_B)],
        ))
        path = tmp / "fleet.yaml"
        path.write_text(cfg)
        gw = Proc(["-m", "inferplane.cli", "serve", "--config", str(path)], tmp / "gw.log")
        procs.append(gw)
        base = f"http://127.0.0.1:{gw_port}"
        gw.wait_http(f"{base}/ready")
        yield {"base": base, "ups": ups, "log": tmp / "gw.log",
               "metrics": f"http://127.0.0.1:{metrics_port}/metrics"}
    finally:
        for p in procs:
            p.stop()


def scrape(stack: dict[str, object]) -> str:
    r = httpx.get(f"{stack['base']}/metrics", headers={"Authorization": f"Bearer {ADMIN}"})
    assert r.status_code == 200, r.text
    return r.text


def test_metrics_need_an_admin_key_and_hide_tenants(stack: dict[str, object]) -> None:
    """/metrics is for operators (issue 12 item 5): no key 401, a tenant's key 403, an admin
    key or the scraper's own listener 200; no tenant names in it by default."""
    post(stack, "/v1/chat/completions", CHAT)
    url = f"{stack['base']}/metrics"
    assert_openai_error(httpx.get(url), 401)
    assert_openai_error(httpx.get(url, headers={"Authorization": f"Bearer {KEY_A}"}), 403)
    for text in (scrape(stack), httpx.get(str(stack["metrics"])).text):
        assert "inferplane_tenant_tokens_total" in text
        assert 'tenant="ta"' not in text and 'tenant="all"' in text


def client(stack: dict[str, object], key: str = KEY_A) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{stack['base']}/v1", api_key=key, max_retries=0)


def post(stack: dict[str, object], path: str, body: object, key: str | None = KEY_A,
         headers: dict[str, str] | None = None, raw: bytes | None = None) -> httpx.Response:
    h = dict(headers or {})
    if key is not None:
        h["Authorization"] = f"Bearer {key}"
    content = raw if raw is not None else json.dumps(body).encode()
    return httpx.post(f"{stack['base']}{path}", content=content, headers=h, timeout=10)


def assert_openai_error(r: httpx.Response, status: int, param: str | None = None) -> str:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert "Traceback" not in err["message"]
    if param is not None:
        assert err["param"] == param
    return str(err["message"])


CHAT = {"model": "m-ok", "messages": [{"role": "user", "content": "hello there"}]}


def test_chat_non_streaming_with_evidence_headers(stack: dict[str, object]) -> None:
    raw = client(stack).chat.completions.with_raw_response.create(
        model="m-ok", messages=[{"role": "user", "content": "hi"}])
    out = raw.parse()
    assert out.choices[0].message.content
    assert raw.headers["x-inferplane-endpoint"] in {"ok-a", "ok-b"}
    assert raw.headers["x-inferplane-substrate"] == "pool"
    assert len(raw.headers["x-inferplane-decision-id"]) == 16


def test_chat_streaming_passes_chunks_and_usage(stack: dict[str, object]) -> None:
    stream = client(stack).chat.completions.create(
        model="m-ok", messages=[{"role": "user", "content": "hi"}], stream=True,
        stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.split()[0].endswith("-w0") and len(text.split()) == 5
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 5


def test_completions_and_embeddings(stack: dict[str, object]) -> None:
    c = client(stack)
    assert c.completions.create(model="m-ok", prompt="say", max_tokens=5).choices[0].text
    e = c.embeddings.create(model="m-embed", input="embed me")  # an embed model (kind)
    assert e.data[0].embedding == [0.1, 0.2]


def test_models_lists_the_fleet(stack: dict[str, object]) -> None:
    ids = {m.id for m in client(stack).models.list()}
    assert {"m-ok", "m-flaky", "m-dead", "m-cut", "m-slow", "m-small"} <= ids


def test_failover_replaces_once_before_first_byte(stack: dict[str, object]) -> None:
    seen, attempts = set(), set()
    for _ in range(8):
        r = post(stack, "/v1/chat/completions", {**CHAT, "model": "m-flaky"})
        assert r.status_code == 200, r.text
        seen.add(r.headers["x-inferplane-endpoint"])
        rec = httpx.get(f"{stack['base']}/v1/decisions/{r.headers['x-inferplane-decision-id']}",
                        headers={"Authorization": f"Bearer {KEY_A}"}).json()
        out = rec["outcome"]  # the failed attempt is recorded under the same decision id
        attempts.add((out["attempts"], tuple(out["failed_endpoints"])))
    assert seen == {"ok-c"}
    assert (2, ("bad-1",)) in attempts and attempts <= {(1, ()), (2, ("bad-1",))}
    metrics = scrape(stack)
    assert 'inferplane_upstream_failures_total{endpoint="bad-1",reason="http_500"}' in metrics
    assert "inferplane_replacements_total" in metrics


def test_upstream_failure_is_502_naming_upstream(stack: dict[str, object]) -> None:
    msg = assert_openai_error(post(stack, "/v1/chat/completions", {**CHAT, "model": "m-dead"}), 502)
    assert "'dead'" in msg


def test_mid_stream_failure_ends_with_error_event(stack: dict[str, object]) -> None:
    r = post(stack, "/v1/chat/completions", {**CHAT, "model": "m-cut", "stream": True})
    assert r.status_code == 200
    events = [line for line in r.text.splitlines() if line.startswith("data:")]
    assert len(events) == 3  # two relayed chunks, then the error event
    assert json.loads(events[-1][5:])["error"]["type"] == "upstream_error"
    assert 'inferplane_stream_errors_total{endpoint="cut"} 1.0' in scrape(stack)


def test_client_disconnect_cancels_upstream(stack: dict[str, object]) -> None:
    import time

    with httpx.stream("POST", f"{stack['base']}/v1/chat/completions",
                      json={**CHAT, "model": "m-slow", "stream": True},
                      headers={"Authorization": f"Bearer {KEY_A}"}, timeout=10) as r:
        next(r.iter_bytes())
    port = stack["ups"]["slow"]  # type: ignore[index]
    for _ in range(50):
        st = httpx.get(f"http://127.0.0.1:{port}/stats").json()
        if st["cancelled"] >= 1:
            break
        time.sleep(0.05)
    assert st["cancelled"] >= 1 and st["completed"] == 0


@pytest.mark.parametrize(
    ("key", "expected"),
    [(None, "missing API key"), ("sk-wrong", "invalid API key")],
)
def test_auth_errors(stack: dict[str, object], key: str | None, expected: str) -> None:
    msg = assert_openai_error(post(stack, "/v1/chat/completions", CHAT, key=key), 401)
    assert expected in msg


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"messages": [{"role": "user", "content": "x"}]}, "model"),
        ({"model": 3, "messages": []}, "model"),
        ({"model": "m-ok", "messages": "hi"}, "messages"),
        ({"model": "m-ok", "messages": [{"content": "x"}]}, "messages[0].role"),
        ({**CHAT, "max_tokens": "ten"}, "max_tokens"),
        ({**CHAT, "max_tokens": 0}, "max_tokens"),
        ({**CHAT, "stream": "yes"}, "stream"),
        ({**CHAT, "stream_options": {"include_usage": 1}}, "stream_options.include_usage"),
        ({**CHAT, "temperature": "hot"}, "temperature"),
    ],
)
def test_bad_fields_are_400_naming_the_field(
    stack: dict[str, object], body: dict[str, object], param: str
) -> None:
    msg = assert_openai_error(post(stack, "/v1/chat/completions", body), 400, param)
    assert param.split("[")[0].split(".")[0] in msg


@pytest.mark.parametrize("raw", [b"{not json", b"[1, 2]", b""])
def test_malformed_json_is_400(stack: dict[str, object], raw: bytes) -> None:
    assert_openai_error(post(stack, "/v1/chat/completions", None, raw=raw), 400)


def test_unknown_model_is_404(stack: dict[str, object]) -> None:
    r = post(stack, "/v1/chat/completions", {**CHAT, "model": "gpt-nope"})
    msg = assert_openai_error(r, 404, "model")
    assert r.json()["error"]["code"] == "model_not_found" and "gpt-nope" in msg


def test_oversize_body_is_413(stack: dict[str, object]) -> None:
    big = {**CHAT, "messages": [{"role": "user", "content": "x" * 30000}]}
    assert_openai_error(post(stack, "/v1/chat/completions", big), 413)


def test_no_eligible_endpoint_is_503_naming_filter(stack: dict[str, object]) -> None:
    r = post(stack, "/v1/chat/completions", CHAT, headers={"x-inferplane-jurisdictions": "us"})
    msg = assert_openai_error(r, 503)
    assert "0/" in msg and "jurisdiction" in msg


def test_impossible_requests_are_400_naming_the_limit(stack: dict[str, object]) -> None:
    """Beyond every context of the model (m-small: 64 tokens) is the client's error, not
    capacity (issue 12 item 3)."""
    r = post(stack, "/v1/chat/completions", {**CHAT, "model": "m-small", "max_tokens": 100})
    msg = assert_openai_error(r, 400, param="max_tokens")
    assert "64 tokens" in msg and r.json()["error"]["code"] == "context_length_exceeded"
    long = {"model": "m-small", "messages": [{"role": "user", "content": "word " * 400}]}
    msg = assert_openai_error(post(stack, "/v1/chat/completions", long), 400, param="messages")
    assert "64 tokens" in msg
    # no max_tokens: the class default is capped to what the context leaves; it is served
    r = post(stack, "/v1/chat/completions", {**CHAT, "model": "m-small"})
    assert r.status_code == 200, r.text


def test_n_has_an_upper_bound(stack: dict[str, object]) -> None:
    msg = assert_openai_error(post(stack, "/v1/chat/completions", {**CHAT, "n": 10000}), 400,
                              param="n")
    assert "128" in msg


@pytest.mark.parametrize(
    ("header", "value"),
    [
        ("x-inferplane-class", "no-such-class"),
        ("x-inferplane-slo-ttft-ms", "-5"),
        ("x-inferplane-slo-itl-ms", "abc"),
        ("x-inferplane-precision", "fp7"),
        ("x-inferplane-agent-step", "-1"),
    ],
)
def test_bad_headers_are_400_naming_the_header(
    stack: dict[str, object], header: str, value: str
) -> None:
    msg = assert_openai_error(
        post(stack, "/v1/chat/completions", CHAT, headers={header: value}), 400, header)
    assert header in msg


def test_decision_visible_only_to_its_tenant(stack: dict[str, object]) -> None:
    r = post(stack, "/v1/chat/completions", CHAT)
    did = r.headers["x-inferplane-decision-id"]
    mine = httpx.get(f"{stack['base']}/v1/decisions/{did}",
                     headers={"Authorization": f"Bearer {KEY_A}"})
    assert mine.status_code == 200
    rec = mine.json()
    assert rec["picked"]["endpoint"] == r.headers["x-inferplane-endpoint"]
    assert rec["outcome"]["status"] == 200
    other = httpx.get(f"{stack['base']}/v1/decisions/{did}",
                      headers={"Authorization": f"Bearer {KEY_B}"})
    unknown = httpx.get(f"{stack['base']}/v1/decisions/no-such-id",
                        headers={"Authorization": f"Bearer {KEY_B}"})
    # another tenant's id answers exactly like an unknown one: no existence oracle
    assert_openai_error(other, 404)
    assert other.json() == unknown.json()


def test_operational_routes(stack: dict[str, object]) -> None:
    base = stack["base"]
    assert httpx.get(f"{base}/health").json() == {"status": "ok"}
    assert httpx.get(f"{base}/ready").json()["ready"] is True
    m = scrape(stack)
    assert "inferplane_requests_total" in m and "inferplane_placement_plugin_seconds" in m
    assert_openai_error(httpx.get(f"{base}/v1/nothing"), 404)


def test_no_stack_trace_in_gateway_log(stack: dict[str, object]) -> None:
    log = Path(str(stack["log"])).read_text()
    assert "Traceback" not in log, log
