"""Reloading the fleet file without a restart (issue 14 item 7).

Real processes (`bench/reload.py`'s scenario): `inferplane serve` with emulated engines e0, e1,
e2 and a fleet file naming e0 and e1 is streamed at while the file is replaced by one naming
e1 and e2 and the gateway gets SIGHUP: no request fails, e2 gets traffic, e0 gets nothing new
and its requests in flight finish (at least one: an anchor request held at e0's gate, its first
token seen, until the reload is applied); then an invalid file is refused (file + field in the
log and the reload metrics) while the fleet keeps serving. Each phase ends on an event (answers
from each endpoint), not at a time. The same with ``--workers 2``: every worker
reloads. In-process: what a reload keeps, what it refuses, and that a refusal changes nothing.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

import pytest

from bench.reload import run_scenario
from inferplane.config.loader import parse_config
from inferplane.core.plane import Core
from inferplane.core.reload import restart_needed
from inferplane.errors import AuthenticationError, ConfigError
from inferplane.fleet.engine_metrics import EngineMetrics
from inferplane.fleet.live import LiveFleet
from inferplane.fleet.model import Fleet
from inferplane.fleet.scraper import StaticMetricsSource
from tests.builders import SMALL_FLEET_YAML, key_hash

# -- real processes ---------------------------------------------------------------------------


def _check(res: object) -> None:
    from bench.reload import Result

    assert isinstance(res, Result)
    assert res.errors == [], res
    assert res.failed == 0 and res.requests > 20, res
    # the anchor: placed on e0, held there (first token seen) until every worker applied the
    # reload, then ended 200 after the SIGHUP; so the gateway had it in flight at the swap
    assert res.anchor_tries > 0 and res.anchor_ok, res
    assert res.drained >= 1, res
    assert res.served.get("e2", 0) > 0, res  # the added endpoint serves
    assert res.removed_after_apply == 0, res  # the removed one takes nothing new ...
    # ... and what was in flight on it at the swap finished there: each request a worker counted
    # (its own, at its swap, after the SIGHUP) ended 200 at the client, after the SIGHUP, from e0
    # (the gateway frees the slot before the last byte); one re-placed elsewhere would not count
    assert res.drained_seen >= res.drained, res
    assert res.served.get("e1", 0) > 0, res
    # ... and the bad file changed nothing: both endpoints still serve after it was refused
    assert res.after_bad.get("e1", 0) > 0 and res.after_bad.get("e2", 0) > 0, res
    assert "e0" not in res.after_bad, res
    assert "fleet.yaml: substrates[0].endpoints[1].max_concurrency:" in res.refusal, res.refusal
    assert res.metrics['inferplane_config_reloads_total{result="ok"}'] == 1.0, res.metrics
    assert res.metrics['inferplane_config_reloads_total{result="error"}'] == 1.0, res.metrics
    assert res.metrics["inferplane_config_last_reload_successful"] == 0.0, res.metrics


# The answers from each endpoint that end each phase. Nothing going to e0 after the apply is
# then checked on >= 4 * PER_WINDOW requests (two windows of e1 + e2), after the refused file on
# >= 2 * PER_WINDOW, whatever the load. The fixed 4 s of the tests before (reload at 1.5 s) gave
# about 97 and 49 with one worker, 72 and 36 with two, unloaded, and fewer under load.
PER_WINDOW = 32


def test_sighup_under_load_adds_and_removes_endpoints(tmp_path: Path) -> None:
    res = asyncio.run(run_scenario(tmp_path, clients=8, per_window=PER_WINDOW, anchor=True))
    _check(res)


def test_every_worker_reloads(tmp_path: Path) -> None:
    # each request is a new connection, so the kernel spreads them over both workers: a worker
    # that had not reloaded would still send to e0, or refuse nothing
    res = asyncio.run(run_scenario(tmp_path, clients=6, workers=2, per_window=PER_WINDOW,
                                   anchor=True))
    _check(res)
    assert res.refusal.count("max_concurrency") == 2, res.refusal  # refused by each worker
    # one scrape shows both workers' reload counts (`telemetry.gather`), each as _check's
    assert all(by == {"0": res.metrics[name], "1": res.metrics[name]}
               for name, by in res.by_worker.items()), res.by_worker
    assert len(res.by_worker) == 3, res.by_worker


# -- in process -------------------------------------------------------------------------------

EXTRA = """\
      - name: eu-2
        url: http://127.0.0.1:9004
        models: [{name: llama-3.1-8b, max_context: 8192}]
"""


def _with_eu2(text: str = SMALL_FLEET_YAML) -> str:
    anchor = "  - name: us-h200\n"
    return text.replace(anchor, EXTRA + anchor)


def _without_eu0(text: str = SMALL_FLEET_YAML) -> str:
    return text.replace(
        "      - name: eu-0\n        url: http://127.0.0.1:9001\n"
        "        models: [{name: llama-3.1-8b, max_context: 8192}]\n", "")


def test_restart_sections_are_refused_with_their_fields() -> None:
    old = parse_config(SMALL_FLEET_YAML, "f.yaml")
    new = parse_config(SMALL_FLEET_YAML.replace("  seed: 7\n", "  seed: 7\n  port: 9999\n")
                       + "admission: {store: memory}\n", "f.yaml")
    got = dict(restart_needed(old, new))
    assert set(got) == {"gateway.port", "admission.store"}, got
    assert "needs a restart" in got["gateway.port"]
    # endpoints, tenants, plugins: reloadable
    assert restart_needed(old, parse_config(_with_eu2(), "f.yaml")) == []
    kv = SMALL_FLEET_YAML.replace(
        "        url: http://127.0.0.1:9002\n",
        "        url: http://127.0.0.1:9002\n        kv_events: tcp://127.0.0.1:5557\n")
    got = dict(restart_needed(old, parse_config(kv, "f.yaml")))
    assert list(got) == ["substrates[0].endpoints[1].kv_events"], got


def test_live_state_survives_and_removed_endpoints_drain() -> None:
    cfg = parse_config(SMALL_FLEET_YAML)
    live = LiveFleet(Fleet.from_config(cfg), clock=lambda: 100.0)
    r0 = live.reserve("eu-0", 100)
    r1 = live.reserve("eu-1", 100)
    live.observe_ttft("eu-1", 0.2, 0.1)
    live.set_health("us-0", False)
    moved = _without_eu0(_with_eu2()).replace("127.0.0.1:9003", "127.0.0.1:9999")
    fresh, removed = live.reconfigure(Fleet.from_config(parse_config(moved)))
    assert removed == ["eu-0"] and sorted(fresh) == ["eu-2", "us-0"]  # us-0's URL changed
    snap = live.snapshot()
    assert [v.name for v in snap.endpoints] == ["eu-1", "eu-2", "us-0"]
    by = snap.by_name
    assert by["eu-1"].state.inflight == 1 and by["eu-1"].state.ttft_ratio_p50 == 2.0
    assert by["us-0"].state.healthy  # a new server: a fresh record
    r0.release()  # a request on the removed endpoint finishes and accounts as usual
    live.observe_outcome("eu-0", True)
    r1.release()
    assert live.snapshot().by_name["eu-1"].state.inflight == 0
    live.reconfigure(Fleet.from_config(parse_config(SMALL_FLEET_YAML)))
    assert live.snapshot().by_name["eu-0"].state.inflight == 0


def _core(text: str = SMALL_FLEET_YAML) -> tuple[Core, StaticMetricsSource]:
    source = StaticMetricsSource()
    return Core(parse_config(text, "f.yaml"), "f.yaml", metrics_source=source), source


def test_reload_applies_endpoints_tenants_and_keeps_policies() -> None:
    async def main() -> None:
        core, source = _core()
        await core.start()
        try:
            policies = core.policies
            core.live.update_metrics("eu-1", EngineMetrics(running=3.0))
            with pytest.raises(AuthenticationError):
                core.authenticate("Bearer sk-new")
            source.health["eu-2"] = False  # probed before it joins: not placed until healthy
            text = _with_eu2().replace(
                "tenants:\n",
                f"tenants:\n  - name: newco\n    api_keys: [\"{key_hash('sk-new')}\"]\n")
            out = await core.reload(parse_config(text, "f.yaml"), "f.yaml", sha256="abc")
            assert out.added == ("eu-2",) and out.removed == () and not out.policies_rebuilt
            assert core.policies is policies  # what they learned is kept
            assert core.authenticate("Bearer sk-new").name == "newco"
            by = core.live.snapshot().by_name
            assert by["eu-1"].state.running == 3.0  # unchanged endpoints keep their state
            assert not by["eu-2"].state.healthy
            assert core.config_sha256 == "abc"
            assert core.metrics.config_reloads.labels("ok")._value.get() == 1
        finally:
            await core.stop()

    asyncio.run(main())


def test_a_reload_counts_the_requests_it_leaves_draining(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # what test_sighup_under_load reads to know that requests were in flight on e0 at the swap
    async def main() -> None:
        core, _ = _core()
        await core.start()
        try:
            held = [core.live.reserve(name, 100) for name in ("eu-0", "eu-0", "eu-1")]
            with caplog.at_level(logging.INFO, "inferplane.core"):
                out = await core.reload(parse_config(_without_eu0(), "f.yaml"), "f.yaml")
            assert out.removed == ("eu-0",) and out.draining == 2, out
            assert "; removed ['eu-0'] (draining 2 in flight); " in caplog.text, caplog.text
            for r in held:
                r.release()
            caplog.clear()
            with caplog.at_level(logging.INFO, "inferplane.core"):
                out = await core.reload(parse_config(SMALL_FLEET_YAML, "f.yaml"), "f.yaml")
            assert out.added == ("eu-0",) and out.draining == 0, out
            assert "; removed none; " in caplog.text, caplog.text
            caplog.clear()
            with caplog.at_level(logging.INFO, "inferplane.core"):
                out = await core.reload(parse_config(_without_eu0(), "f.yaml"), "f.yaml")
            assert out.removed == ("eu-0",) and out.draining == 0, out
            assert "; removed ['eu-0'] (none in flight); " in caplog.text, caplog.text
        finally:
            await core.stop()

    asyncio.run(main())


def test_a_reload_renews_what_the_spans_say_of_a_changed_endpoint() -> None:
    """The telemetry's per-endpoint attributes (cached by name) follow a reload that moves an
    endpoint to another URL under the same name; a request placed on the old fleet before the
    swap does not put the old ones back."""
    telemetry = "telemetry: {enabled: true, exporter: thread}\n"

    async def main() -> None:
        core, _ = _core(SMALL_FLEET_YAML + telemetry)
        await core.start()
        try:
            tel: Any = core.telemetry
            old = core.fleet.by_name["eu-1"]
            old_kept = core.fleet.by_name["eu-0"]
            assert ("server.port", 9002) in tel.endpoint_info(old).attempt("chat", "m")
            moved = SMALL_FLEET_YAML.replace("http://127.0.0.1:9002", "http://127.0.0.1:9012")
            await core.reload(parse_config(moved + telemetry, "f.yaml"), "f.yaml")
            tel.endpoint_info(old)  # in flight since before the swap: its own, not kept
            new = core.fleet.by_name["eu-1"]
            for _ in range(2):  # worked out, then cached
                assert ("server.port", 9012) in tel.endpoint_info(new).attempt("chat", "m")
            assert tel.endpoint_info(new) is tel.endpoint_info(new)
            kept = core.fleet.by_name["eu-0"]  # unchanged: cached again
            # first asked for by a request placed before the swap: made from the new fleet's
            # endpoint, so that its upstream model names are kept for the requests after it
            first = tel.endpoint_info(old_kept)
            assert old_kept is not kept and first.endpoint is kept
            assert tel.endpoint_info(kept) is first
        finally:
            await core.stop()

    asyncio.run(main())


def test_a_refused_reload_changes_nothing(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async def main() -> None:
        core, _ = _core()
        await core.start()
        try:
            before = (core.config, core.fleet, core.policies, dict(core.tenants))
            f = tmp_path / "fleet.yaml"
            f.write_text(_with_eu2().replace("  seed: 7\n", "  seed: 7\n  port: 9999\n"))
            with caplog.at_level(logging.ERROR, "inferplane.core"):
                assert await core.reload_file(f) is None
            assert f"{f}: gateway.port: changed, and this needs a restart" in caplog.text
            f.write_text(_with_eu2().replace(
                "name: eu-2", "name: eu-2\n        bogus: 1"))
            with caplog.at_level(logging.ERROR, "inferplane.core"):
                assert await core.reload_file(f) is None
            assert f"{f}: substrates[0].endpoints[2].bogus: Extra inputs" in caplog.text
            assert (core.config, core.fleet, core.policies, core.tenants) == before
            assert [v.name for v in core.live.snapshot().endpoints] == ["eu-0", "eu-1", "us-0"]
            assert core.metrics.config_reloads.labels("error")._value.get() == 2
            assert core.metrics.config_last_reload_ok._value.get() == 0
            f.write_text(_with_eu2())
            assert await core.reload_file(f) is not None
            assert core.metrics.config_last_reload_ok._value.get() == 1
        finally:
            await core.stop()

    asyncio.run(main())


def test_the_picker_reloads_its_destinations() -> None:
    from inferplane.epp.server import Picker

    async def main() -> None:
        p = Picker(parse_config(SMALL_FLEET_YAML, "f.yaml"), "f.yaml",
                   metrics_source=StaticMetricsSource())
        await p.start()
        try:
            await p.reload(parse_config(_without_eu0(_with_eu2()), "f.yaml"), "f.yaml")
            assert set(p.addresses) == {"eu-1", "eu-2", "us-0"}
            assert p.addresses["eu-2"] == "127.0.0.1:9004"
        finally:
            await p.stop()

    asyncio.run(main())


def test_the_picker_answers_with_a_moved_endpoints_new_address() -> None:
    """The part of a pick's answer the picker keeps per endpoint (destination header and
    ``envoy.lb`` metadata) follows a reload that moves the endpoint."""
    from inferplane.epp import protocol as P
    from inferplane.epp.server import Picker

    def destination(p: Picker) -> tuple[str, str]:
        t = p.route_template(p.fleet.by_name["eu-0"], "llama-3.1-8b", "/v1/chat/completions")
        sets = {h.header.key: h.header.raw_value.decode()
                for h in t.request_body.response.header_mutation.set_headers}
        lb = t.dynamic_metadata.fields[P.DESTINATION_NAMESPACE].struct_value
        return sets[P.DESTINATION_KEY], lb.fields[P.DESTINATION_KEY].string_value

    async def main() -> None:
        p = Picker(parse_config(SMALL_FLEET_YAML, "f.yaml"), "f.yaml",
                   metrics_source=StaticMetricsSource())
        await p.start()
        try:
            assert destination(p) == ("127.0.0.1:9001", "127.0.0.1:9001")
            moved = SMALL_FLEET_YAML.replace("url: http://127.0.0.1:9001",
                                             "url: http://127.0.0.1:9011")
            await p.reload(parse_config(moved, "f.yaml"), "f.yaml")
            assert destination(p) == ("127.0.0.1:9011", "127.0.0.1:9011")
        finally:
            await p.stop()

    asyncio.run(main())


def test_the_picker_refuses_an_endpoint_envoy_has_no_cluster_for() -> None:
    from inferplane.epp.server import Picker

    async def main() -> None:
        p = Picker(parse_config(SMALL_FLEET_YAML, "f.yaml"), "f.yaml",
                   metrics_source=StaticMetricsSource())
        await p.start()
        try:
            hosted = _with_eu2().replace("http://127.0.0.1:9004", "https://api.example.com")
            with pytest.raises(ConfigError) as err:
                await p.reload(parse_config(hosted, "f.yaml"), "f.yaml")
            assert err.value.problems[0][0] == "substrates[0].endpoints[2].url"
            assert "inferplane envoy-config" in err.value.problems[0][1]
            assert "eu-2" not in p.addresses and "eu-2" not in p.fleet.by_name
        finally:
            await p.stop()

    asyncio.run(main())


def test_watch_config_reloads_a_changed_file(tmp_path: Path) -> None:
    from inferplane.core.reload import file_sha256, watch_file

    async def main() -> None:
        f = tmp_path / "fleet.yaml"
        f.write_text(SMALL_FLEET_YAML)
        core, _ = _core()
        core.set_config_sha256(file_sha256(f))
        await core.start()
        watcher = asyncio.create_task(watch_file(core, f, interval_s=0.02))
        try:
            await asyncio.sleep(0.1)  # the watcher has seen the file as it was
            f.write_text(_with_eu2())
            for _ in range(3000):  # polled: applied once the file stayed the same one poll
                if "eu-2" in core.fleet.by_name:
                    break
                await asyncio.sleep(0.01)
            assert "eu-2" in core.fleet.by_name
            assert core.config_sha256 == file_sha256(f)
        finally:
            watcher.cancel()
            await core.stop()

    asyncio.run(main())


def test_epp_process_reloads_on_sighup(tmp_path: Path) -> None:
    import signal
    import time

    from tests.support.procs import Proc, free_port

    f = tmp_path / "fleet.yaml"
    epp = f"  seed: 7\nepp: {{port: {free_port()}}}\n"
    f.write_text(SMALL_FLEET_YAML.replace("  seed: 7\n", epp))
    proc = Proc(["-m", "inferplane.cli", "epp", "--config", str(f)], tmp_path / "epp.log")
    try:
        def wait_for(needle: str) -> str:
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                text = proc.log.read_text()
                if needle in text:
                    return text
                assert proc.p.poll() is None, text
                time.sleep(0.05)
            raise AssertionError(proc.log.read_text())

        wait_for("listening on")
        f.write_text(_with_eu2(f.read_text()))
        proc.p.send_signal(signal.SIGHUP)
        assert "added ['eu-2']" in wait_for("fleet reloaded from")
        f.write_text(f.read_text().replace("eu-2", "eu-1"))  # a duplicate endpoint name
        proc.p.send_signal(signal.SIGHUP)
        text = wait_for("fleet reload refused")
        assert proc.p.poll() is None
        assert f"{f}: substrates[0].endpoints[2]" in text, text
    finally:
        proc.stop()
    assert "Traceback" not in proc.log.read_text()


def test_a_restarted_worker_serves_what_the_others_applied(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker restarted after a reload and then a refused reload starts from the file the
    others applied (the parent keeps it), not from the parent's start-up file: it refuses the
    invalid current file as they did and serves the same fleet (e1, e2)."""
    import signal
    import subprocess
    import time

    import httpx

    from bench.reload import ADMIN_KEY, fleet_yaml
    from tests.support.procs import Proc, free_port
    from tests.support.redis_server import RedisServer

    # a worker killed at once is restarted (not taken for a start-up failure)
    monkeypatch.setenv("INFERPLANE_WORKER_STARTUP_S", "0")
    srv = RedisServer(tmp_path)
    ports = {n: free_port() for n in ("e0", "e1", "e2")}
    f = tmp_path / "fleet.yaml"
    f.write_text(fleet_yaml({n: ports[n] for n in ("e0", "e1")}, srv.url))
    gw_port = free_port()
    gw = Proc(["-m", "inferplane.cli", "serve", "--config", str(f), "--port", str(gw_port),
               "--workers", "2"], tmp_path / "gw.log")

    def count(needle: str, n: int) -> None:
        deadline = time.monotonic() + 60
        while gw.log.read_text().count(needle) < n:
            assert time.monotonic() < deadline and gw.p.poll() is None, gw.log.read_text()
            time.sleep(0.05)

    def fleets() -> set[tuple[str, ...]]:
        """The endpoints served, as each of 40 new connections (spread over both workers by
        the kernel) sees them."""
        seen = set()
        for _ in range(40):
            with httpx.Client(timeout=10) as c:  # a new connection each time
                r = c.get(f"http://127.0.0.1:{gw_port}/v1/fleet/health",
                          headers={"Authorization": f"Bearer {ADMIN_KEY}"})
            assert r.status_code == 200, r.text
            seen.add(tuple(sorted(e["endpoint"] for e in r.json()["endpoints"])))
        return seen

    try:
        count("listening on", 2)
        f.write_text(fleet_yaml({n: ports[n] for n in ("e1", "e2")}, srv.url))
        gw.p.send_signal(signal.SIGHUP)
        count("added ['e2']", 2)
        f.write_text(fleet_yaml({n: ports[n] for n in ("e0", "e2")}, srv.url, bad=True))
        gw.p.send_signal(signal.SIGHUP)
        count("fleet reload refused", 2)
        assert fleets() == {("e1", "e2")}
        kids = subprocess.run(["pgrep", "-P", str(gw.p.pid)], capture_output=True, text=True)
        worker = int(kids.stdout.split()[0])
        subprocess.run(["kill", "-9", str(worker)], check=True)
        count("restarting it", 1)
        count("listening on", 3)
        count("fleet reload refused", 3)  # the new worker refused the invalid file too ...
        assert fleets() == {("e1", "e2")}  # ... and serves what the other one does
        assert gw.log.read_text().count("added ['e2']") == 2  # it started from e1 + e2
        assert gw.p.poll() is None
    finally:
        gw.stop()
        srv.stop()
    assert "Traceback" not in gw.log.read_text()


async def test_a_reload_removes_the_metric_series_of_removed_endpoints() -> None:
    """Issue 14, reliability: ``/metrics`` kept exporting the series of endpoints and pools a
    reload had removed (request counters, TTFT histograms, health and in-flight gauges, pool
    gauges), forever. Now a removed substrate's series go at the reload, and a removed
    endpoint's once its requests in flight drained (they still account to it until then)."""
    import aiohttp
    from aiohttp import web

    from inferplane.api.app import serve
    from inferplane.api.pipeline import Gateway
    from tests.support.fake_upstream import build
    from tests.support.procs import free_port

    modes = {"keep-0": "ok", "gone-0": "ok", "gone-1": "slow"}  # slow: 5 chunks 0.2 s apart
    ports, ups = {}, []
    for name, mode in modes.items():
        ports[name] = free_port()
        up = web.AppRunner(build(name, mode, 0.0), handler_cancellation=True)
        await up.setup()
        await web.TCPSite(up, "127.0.0.1", ports[name]).start()
        ups.append(up)

    def ep(name: str) -> str:
        return (f"{{name: {name}, url: 'http://127.0.0.1:{ports[name]}', "
                "models: [{name: m, profile: llama-3.1-8b, max_context: 8192}]}")

    def fleet(*pools: tuple[str, list[str]]) -> str:
        subs = "".join(
            f"  - {{name: {pool}, kind: gpu, hardware: h100, region: r1, jurisdiction: eu,\n"
            f"     cost: {{hourly_usd: 3.0}}, endpoints: [{', '.join(ep(n) for n in names)}]}}\n"
            for pool, names in pools
        )
        return (f"gateway: {{scrape_interval_s: 0.05, default_profile: round-robin, "
                f"metrics: {{public: true}}}}\nsubstrates:\n{subs}tenants:\n"
                f"  - {{name: t, api_keys: [\"{key_hash('sk-m')}\"]}}\n")

    port = free_port()
    gw = Gateway(parse_config(fleet(("keep", ["keep-0"]), ("gone", ["gone-0", "gone-1"]))))
    runner = await serve(gw, "127.0.0.1", port)
    base = f"http://127.0.0.1:{port}"
    chat = {"model": "m", "max_tokens": 5, "stream": True,
            "messages": [{"role": "user", "content": "hello"}]}
    held: aiohttp.ClientResponse | None = None
    try:
        async with aiohttp.ClientSession(
            headers={"Authorization": "Bearer sk-m"}, timeout=aiohttp.ClientTimeout(total=20)
        ) as s:
            async def scrape() -> str:
                async with s.get(f"{base}/metrics") as r:
                    return await r.text()

            served: set[str] = set()
            for _ in range(30):  # round-robin: every endpoint serves; one slow stream stays open
                r = await s.post(f"{base}/v1/chat/completions", json=chat)
                assert r.status == 200, await r.text()
                name = r.headers["x-inferplane-endpoint"]
                if name == "gone-1" and held is None and served >= {"keep-0", "gone-0"}:
                    held = r
                    break
                await r.read()
                served.add(name)
            assert held is not None, served
            text = await scrape()
            for name in modes:
                assert f'endpoint="{name}"' in text, name
            assert 'substrate="gone"' in text
            await gw.reload(parse_config(fleet(("keep", ["keep-0"]))), "<config>")
            text = await scrape()
            assert 'endpoint="gone-0"' not in text and 'substrate="gone"' not in text
            assert 'endpoint="keep-0"' in text and 'substrate="keep"' in text
            assert 'endpoint="gone-1"' in text  # draining: its stream is still in flight
            assert b"[DONE]" in await held.read()
            held.release()
            async with asyncio.timeout(10):  # the stream's accounting ends its flight
                while 'endpoint="gone-1"' in (text := await scrape()):
                    await asyncio.sleep(0.05)
            assert 'inferplane_requests_total{api="chat",code="200",endpoint="keep-0"}' in text
    finally:
        if held is not None:
            held.release()
        await runner.cleanup()
        for up in ups:
            await up.cleanup()
