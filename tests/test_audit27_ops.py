"""Operations found by audit27 (F8-F11): the simulator runs from a clean clone on the shipped
sample trace without --json, refuses --duration 0 and says when a fault fell after the replay;
calibrate refuses a URL without a scheme and names --model-profile; `check --connect` asks the
Redis and PostgreSQL a file names; a stop says what it drains and that it stopped; a reload
names the tenants and budgets it changed."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from inferplane.cli import app
from inferplane.config.loader import parse_config
from tests.builders import SMALL_FLEET_YAML, pool_fleet, to_yaml
from tests.support.procs import ROOT, Proc, free_port
from tests.support.redis_server import RedisServer
from tests.test_reload import _core

SAMPLE = ROOT / "examples" / "traces" / "sample_conversation.jsonl"
H100X8 = ROOT / "examples" / "fleets" / "h100x8.yaml"


# -- simulate (F8, F10) ---------------------------------------------------------------------
def test_the_documented_simulate_command_runs_on_the_shipped_sample() -> None:
    """docs/simulator.md's command, from the repository: the trace ships, --json is optional."""
    doc = (ROOT / "docs" / "simulator.md").read_text()
    assert "--trace examples/traces/sample_conversation.jsonl" in doc
    assert "../shared" not in doc
    res = CliRunner().invoke(app, ["simulate", "--fleet", str(H100X8), "--trace", str(SAMPLE),
                                   "--profile", "default", "--duration", "20"])
    assert res.exit_code == 0, res.output
    assert "TTFT" in res.output


def test_the_sample_trace_is_what_its_script_writes(tmp_path: Path) -> None:
    out = tmp_path / "t.jsonl"
    subprocess.run([sys.executable, str(ROOT / "scripts" / "make_sample_trace.py"), "--out",
                    str(out)], check=True)
    assert out.read_bytes() == SAMPLE.read_bytes()
    lines = [json.loads(x) for x in SAMPLE.read_text().splitlines()]
    assert len(lines) > 300 and all(x["hash_ids"][0] == 0 for x in lines)


def test_simulate_refuses_a_zero_duration_and_warns_of_faults_never_applied(
    tmp_path: Path,
) -> None:
    base = ["simulate", "--fleet", str(H100X8), "--trace", str(SAMPLE), "--profile", "default"]
    res = CliRunner().invoke(app, [*base, "--duration", "0"])
    assert res.exit_code == 2 and "--duration must be > 0" in res.output, res.output
    faults = tmp_path / "f.yaml"
    faults.write_text("faults:\n  - {at: 1, endpoint: h100-3, event: down}\n"
                      "  - {at: 500, endpoint: h100-5, event: hung}\n")
    out = tmp_path / "r.json"
    res = CliRunner().invoke(app, [*base, "--duration", "5", "--faults", str(faults),
                                   "--json", str(out)])
    assert res.exit_code == 0, res.output
    assert "warning: 1 of 2 faults were scheduled after the replayed slice ended" in res.output
    r = json.loads(out.read_text())
    assert r["faults"] == 2 and r["faults_applied"] == 1


# -- calibrate (F10) ------------------------------------------------------------------------
def test_calibrate_refuses_a_url_without_a_scheme_and_names_model_profile(
    tmp_path: Path,
) -> None:
    out = str(tmp_path / "p.yaml")
    res = CliRunner().invoke(app, ["calibrate", "--endpoint", "127.0.0.1:18101", "--model", "m",
                                   "-o", out])
    assert res.exit_code == 2
    assert "--endpoint: expected the engine's http:// or https:// base URL" in res.output
    res = CliRunner().invoke(app, ["calibrate", "--endpoint", f"http://127.0.0.1:{free_port()}",
                                   "--model", "meta-llama/Llama-3.1-8B-Instruct", "-o", out])
    assert res.exit_code == 2, res.output
    assert "unknown model profile" in res.output and "--model-profile" in res.output


# -- check --connect (F9) -------------------------------------------------------------------
def test_check_connect_asks_the_redis_and_postgresql_the_file_names(tmp_path: Path) -> None:
    srv = RedisServer(tmp_path)
    good = tmp_path / "good.yaml"
    bad = tmp_path / "bad.yaml"
    try:
        good.write_text(to_yaml(pool_fleet(9001, admission={"store": "redis",
                                                            "redis_url": srv.url})))
        res = CliRunner().invoke(app, ["check", "-c", str(good), "--connect"])
        assert res.exit_code == 0, res.output
    finally:
        srv.stop()
    closed = free_port()
    bad.write_text(to_yaml(pool_fleet(
        9001, admission={"store": "redis", "redis_url": f"redis://:pw@127.0.0.1:{closed}/0"},
        ledger={"postgres_dsn": f"postgresql://u:secret@127.0.0.1:{closed}/db"})))
    plain = CliRunner().invoke(app, ["check", "-c", str(bad)])
    assert plain.exit_code == 0, plain.output  # without --connect nothing is asked
    res = CliRunner().invoke(app, ["check", "-c", str(bad), "--connect"])
    assert res.exit_code == 2, res.output
    assert f"{bad}: admission.redis_url: redis://:***@127.0.0.1:{closed}/0: " in res.output
    assert f"{bad}: ledger.postgres_dsn: cannot connect: " in res.output
    assert "secret" not in res.output and ":pw@" not in res.output


def test_check_connect_names_the_dsn_variable_field_the_file_has(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A DSN read from ``postgres_dsn_env`` is reported under that field (audit29 nit 10)."""
    closed = free_port()
    monkeypatch.setenv("A29_LEDGER_DSN", f"postgresql://u:secret@127.0.0.1:{closed}/db")
    cfg = tmp_path / "env.yaml"
    cfg.write_text(to_yaml(pool_fleet(9001, ledger={"postgres_dsn_env": "A29_LEDGER_DSN"},
                                      batch={"enabled": False})))
    res = CliRunner().invoke(app, ["check", "-c", str(cfg), "--connect"])
    assert res.exit_code == 2, res.output
    assert f"{cfg}: ledger.postgres_dsn_env: cannot connect: " in res.output
    assert "secret" not in res.output


# -- stop and reload lines (F11) ------------------------------------------------------------
def test_sigterm_says_what_it_drains_and_that_it_stopped(tmp_path: Path) -> None:
    """Two requests held by an upstream that never answers fill the endpoint
    (max_concurrency 2), a third waits in the admission queue: SIGTERM says 3 (2 sent, 1
    queued) before it drains."""
    up_port, port = free_port(), free_port()
    up = Proc(["-m", "tests.support.fake_upstream", "--port", str(up_port), "--mode", "hang"],
              tmp_path / "up.log")
    cfg = tmp_path / "gw.yaml"
    cfg.write_text(to_yaml(pool_fleet(
        up_port, gateway={"port": port, "metrics": {"public": True}},
        endpoint_fields={"max_concurrency": 2}, key="sk-stop-test", batch={"enabled": False})))
    gw = Proc(["-m", "inferplane.cli", "serve", "--config", str(cfg)], tmp_path / "gw.log")
    base = f"http://127.0.0.1:{port}"
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}

    def post(i: int) -> None:
        with contextlib.suppress(httpx.HTTPError):
            httpx.post(f"{base}/v1/chat/completions", timeout=30,
                       headers={"Authorization": "Bearer sk-stop-test"},
                       json={**body, "messages": [{"role": "user", "content": f"q{i}"}]})

    clients = [threading.Thread(target=post, args=(i,), daemon=True) for i in range(3)]
    try:
        up.wait_http(f"http://127.0.0.1:{up_port}/health")
        _wait_listening(gw)
        for c in clients:
            c.start()
        deadline = time.monotonic() + 20
        while 'inferplane_admission_queue_depth{band="standard"} 1.0' not in httpx.get(
                f"{base}/metrics").text:
            assert time.monotonic() < deadline, gw.log.read_text()
            time.sleep(0.05)
        gw.p.send_signal(signal.SIGTERM)
        while "draining them" not in gw.log.read_text():  # (the drain waits for the upstream)
            assert time.monotonic() < deadline, gw.log.read_text()
            time.sleep(0.05)
    finally:
        gw.stop()
        up.stop()
    log = gw.log.read_text()
    assert ("inferplane gateway stopping: 3 requests in flight (2 sent to endpoints, 1 queued); "
            "draining them") in log, log


def test_the_stopping_line_never_skips_the_stop(capsys: pytest.CaptureFixture[str]) -> None:
    """A count (or a write) that fails in the "stopping" line is logged, never raised: the stop
    after it (ledger flush, settles) must run."""
    from inferplane.cli import _say_stopping

    class Broken:
        def requests_in_flight(self) -> tuple[int, int]:
            raise RuntimeError("boom")

    _say_stopping("gateway", Broken())  # type: ignore[arg-type]
    assert "stopping" not in capsys.readouterr().err


def _wait_listening(gw: Proc, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while "listening on" not in gw.log.read_text():
        assert gw.p.poll() is None, gw.log.read_text()
        assert time.monotonic() < deadline, gw.log.read_text()
        time.sleep(0.05)


def test_a_reload_names_the_tenants_and_budgets_it_changed(
    caplog: pytest.LogCaptureFixture,
) -> None:
    head, sep, tenants = SMALL_FLEET_YAML.partition("\ntenants:\n")
    budget = "    region: eu-west\n    budgets: [{scope: tenant, window: day, usd: %s}]\n"

    def with_budget(usd: str) -> str:  # acme's, the first tenant's
        return head + sep + tenants.replace("    region: eu-west\n", budget % usd, 1)

    first, second = with_budget("5"), with_budget("50")
    assert sep and first != SMALL_FLEET_YAML and first != second

    async def main() -> None:
        core, _ = _core(first)
        await core.start()
        try:
            with caplog.at_level(logging.INFO, "inferplane.core"):
                await core.reload(parse_config(second, "f.yaml"), "f.yaml")
            assert ("tenants reloaded: added none; removed none; changed ['acme']; "
                    "budgets changed ['acme']") in caplog.text, caplog.text
            caplog.clear()
            with caplog.at_level(logging.INFO, "inferplane.core"):
                await core.reload(parse_config(second, "f.yaml"), "f.yaml")
            assert "tenants reloaded" not in caplog.text  # nothing changed: no line
        finally:
            await core.stop()

    asyncio.run(main())
