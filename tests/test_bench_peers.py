"""Fast tests of bench/peers' own logic: no peer is installed; one test starts the in-tree
``inferplane envoy`` setup (Envoy + ``inferplane epp``) in front of stand-in engines."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import orjson
import pytest

from bench.peers import metrics, procs, report
from bench.peers.client import Record, StreamTimer, chunk_text
from bench.peers.peers import envoy_config, inferplane_fleet, litellm_config, setups
from bench.peers.run import fleet_copy, write_docs
from bench.peers.workload import SliceSpec, body, encode_bodies, offered_load, plan
from inferplane.twin.traces.loader import TraceRequest
from inferplane.twin.traces.tokens import token_ids

TRACE = [
    TraceRequest(0.0, 1000, 10, (1, 2)),
    TraceRequest(1.0, 600, 5, (1, 3)),
    TraceRequest(2.0, 40000, 5, tuple(range(80))),  # longer than the context window
    TraceRequest(4.0, 512, 700, (7,)),
    TraceRequest(9.0, 100, 1, (8,)),  # outside the window
]


# -- trace → requests ----------------------------------------------------------------------


def test_plan_scales_time_filters_too_long_and_keeps_order() -> None:
    planned, skipped = plan(TRACE, SliceSpec(0.0, 8.0, rate_scale=2.0, time_scale=0.5))
    assert skipped == 1
    assert [p.input_tokens for p in planned] == [1000, 600, 512]
    # trace seconds / rate_scale = engine seconds; / time_scale = real seconds
    assert [p.arrival_s for p in planned] == [0.0, 1.0, 4.0]
    assert [p.index for p in planned] == [0, 1, 2]


def test_plan_caps_output() -> None:
    planned, _ = plan(TRACE, SliceSpec(0.0, 8.0, max_output=64))
    assert [p.output_tokens for p in planned] == [10, 5, 64]


def test_bodies_share_prefix_and_carry_the_same_tokens_in_every_form() -> None:
    planned, _ = plan(TRACE, SliceSpec(0.0, 8.0))
    chat = body(planned[0], "chat-text", "m")
    text = body(planned[0], "completion-text", "m")
    ids = body(planned[0], "completion-ids", "m")
    assert chat["messages"][0]["content"] == text["prompt"]
    assert token_ids(text["prompt"]) == ids["prompt"]
    assert len(ids["prompt"]) == 1000
    for b in (chat, text, ids):
        assert b["stream"] is True and b["stream_options"] == {"include_usage": True}
        assert b["max_tokens"] == 10
    # requests 0 and 1 share block 1: the first 512 tokens are identical
    other = body(planned[1], "completion-ids", "m")["prompt"]
    assert other[:512] == ids["prompt"][:512] and other[512:600] != ids["prompt"][512:600]
    assert orjson.loads(encode_bodies(planned, "completion-ids", "m")[0]) == ids


def test_offered_load() -> None:
    planned, _ = plan(TRACE, SliceSpec(0.0, 8.0))
    load = offered_load(planned)
    assert load["requests"] == 3 and load["span_s"] == 4.0
    assert load["out_tok_per_s"] == pytest.approx(715 / 4)
    assert offered_load([])["requests"] == 0


# -- stream timing and aggregation -----------------------------------------------------------


def _sse(obj: object) -> bytes:
    return b"data: " + orjson.dumps(obj) + b"\n"


def test_stream_timer_ttft_itl_and_usage() -> None:
    rec = Record(0)
    t = StreamTimer(rec, 10.0)
    t.line(_sse({"choices": [{"delta": {"role": "assistant"}}]}), 10.05)  # no text yet
    t.line(b"\n", 10.06)
    t.line(_sse({"choices": [{"delta": {"content": "a"}}]}), 10.1)
    t.line(_sse({"choices": [{"text": " b"}]}), 10.15)
    t.line(_sse({"choices": [{"text": " c"}]}), 10.35)
    t.line(_sse({"choices": [], "usage": {"completion_tokens": 3,
                                          "prompt_tokens_details": {"cached_tokens": 7}}}), 10.4)
    t.line(b"data: [DONE]", 10.41)
    t.finish(10.5)
    assert rec.ok and t.done
    assert rec.ttft_s == pytest.approx(0.1)
    assert rec.itl_s == pytest.approx([0.05, 0.2])
    assert rec.e2e_s == pytest.approx(0.5)
    assert (rec.output_tokens, rec.cached_tokens) == (3, 7)


def test_stream_timer_errors() -> None:
    rec = Record(1)
    t = StreamTimer(rec, 0.0)
    t.line(_sse({"error": {"message": "boom"}}), 0.1)
    t.finish(0.2)
    assert not rec.ok and "boom" in (rec.error or "")
    empty = Record(2)
    StreamTimer(empty, 0.0).finish(1.0)
    assert empty.error == "stream ended without any generated text"
    assert chunk_text({"choices": "x"}) == "" and chunk_text({}) == ""


def _rec(i: int, ttft: float | None, gaps: list[float], n: int, error: str | None = None
         ) -> Record:
    return Record(i, ttft_s=ttft, e2e_s=(ttft or 0) + sum(gaps), itl_s=gaps, output_tokens=n,
                  error=error)


def test_summarize_percentiles_slo_and_errors() -> None:
    recs = [
        _rec(0, 0.1, [0.01, 0.01], 3),
        _rec(1, 0.3, [0.02, 0.2], 3),  # mean ITL 0.11 > 0.1: misses the SLO
        _rec(2, 2.0, [0.01], 2),  # TTFT misses
        _rec(3, None, [], 0, error="HTTP 503: busy"),
    ]
    s = metrics.summarize(recs, wall_s=2.0, slo=metrics.Slo.scaled(1000, 100, 1.0))
    assert (s["requests"], s["ok"], s["errors"]) == (4, 3, 1)
    assert s["error_kinds"] == {"HTTP 503": 1}
    assert s["ttft_ms"]["p50"] == pytest.approx(300.0)
    assert s["ttft_ms"]["p99"] == pytest.approx(300 + 0.98 * 1700)
    assert s["itl_ms"]["p50"] == pytest.approx(10.0)
    assert s["throughput_tok_s"] == pytest.approx(4.0)
    assert s["slo_attainment"] == pytest.approx(0.25)
    # the same SLO at time scale 2 is half as long in real time
    assert metrics.Slo.scaled(1000, 100, 2.0) == metrics.Slo(0.5, 0.05)


def test_pct_interpolates() -> None:
    assert metrics.pct([], 50) is None
    assert metrics.pct([5.0], 99) == 5.0
    assert metrics.pct([1.0, 2.0, 3.0, 4.0], 50) == pytest.approx(2.5)
    assert metrics.pct([3.0, 1.0, 2.0], 100) == 3.0


# -- hit rate from two /metrics pages ------------------------------------------------------------

PAGE = """# HELP vllm:prefix_cache_queries Prefix cache queries.
# TYPE vllm:prefix_cache_queries counter
vllm:prefix_cache_queries_total{{model_name="m",engine="0"}} {q}
# HELP vllm:prefix_cache_hits Prefix cache hits.
# TYPE vllm:prefix_cache_hits counter
vllm:prefix_cache_hits_total{{model_name="m",engine="0"}} {h}
vllm:prefix_cache_hits_created{{model_name="m"}} 1.7e9
vllm:num_requests_running{{model_name="m"}} 0.0
"""


def test_hit_rate_delta_summed_over_endpoints() -> None:
    before = metrics.CacheCounters.from_pages([PAGE.format(q=100.0, h=10.0),
                                               PAGE.format(q=0.0, h=0.0)])
    after = metrics.CacheCounters.from_pages([PAGE.format(q=1100.0, h=410.0),
                                              PAGE.format(q=1000.0, h=100.0)])
    assert before == metrics.CacheCounters(10.0, 100.0)
    assert metrics.hit_rate(before, after) == pytest.approx(500 / 2000)
    assert metrics.hit_rate(after, after) is None
    assert metrics.prom_sum("garbage\nvllm:x{a=\"b\"} nan-ish\n", "vllm:x") == 0.0


# -- configs of the peers ------------------------------------------------------------------------


def test_configs_point_at_the_fleet() -> None:
    urls = ["http://127.0.0.1:9001", "http://127.0.0.1:9002"]
    env = envoy_config(urls, 7000)
    cluster = env["static_resources"]["clusters"][0]
    assert cluster["lb_policy"] == "LEAST_REQUEST"
    ports = [e["endpoint"]["address"]["socket_address"]["port_value"]
             for e in cluster["load_assignment"]["endpoints"][0]["lb_endpoints"]]
    assert ports == [9001, 9002]
    ll = litellm_config(urls, "llama", "least-busy")
    assert [m["litellm_params"]["api_base"] for m in ll["model_list"]] == [u + "/v1" for u in urls]
    assert ll["router_settings"]["routing_strategy"] == "least-busy"
    fleet: dict[str, Any] = {
        "gateway": {"port": 8080}, "substrates": [{"endpoints": [{"url": "a"}, {"url": "b"}]}]
    }
    rr = inferplane_fleet(fleet, urls, 7001, "round-robin")
    assert rr["gateway"]["port"] == 7001 and rr["classes"][-1]["profile"] == "round-robin"
    assert [e["url"] for e in rr["substrates"][0]["endpoints"]] == urls
    assert "classes" not in inferplane_fleet(fleet, urls, 7001, None)
    assert fleet["substrates"][0]["endpoints"][0]["url"] == "a"  # the original is untouched
    moved = fleet_copy(fleet, [1, 2])
    assert [e["url"] for e in moved["substrates"][0]["endpoints"]] == [
        "http://127.0.0.1:1", "http://127.0.0.1:2"]


def test_every_router_gets_the_form_its_policy_reads() -> None:
    forms = {s.name: s.form for s in setups()}
    assert len(forms) == 13
    assert all(f == "completion-ids" for n, f in forms.items() if n.startswith("vllm-router"))
    assert all(f == "completion-text" for n, f in forms.items() if n.startswith("sglang"))


# -- process cleanup -----------------------------------------------------------------------------


def test_stop_ends_the_whole_process_group(tmp_path: Path) -> None:
    script = ("import subprocess, sys, time\n"
              "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
              "time.sleep(60)\n")
    p = procs.Proc("tree", [sys.executable, "-c", script], tmp_path / "tree.log")
    deadline = time.monotonic() + 10
    while len(procs.tree_pids(p.pid)) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    pids = procs.tree_pids(p.pid)
    assert len(pids) == 2
    assert p in procs.running()
    procs.stop_all()
    assert p not in procs.running() and not p.alive()
    time.sleep(0.2)
    for pid in pids:
        assert not Path(f"/proc/{pid}").exists() or "Z" in _state(pid)


def _state(pid: int) -> str:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return "Z"
    return stat[stat.rindex(")") + 2]


def test_tree_sampler_counts_cpu_and_rss(tmp_path: Path) -> None:
    p = procs.Proc("busy", [sys.executable, "-c", "x = bytearray(20 << 20)\nwhile True: pass"],
                   tmp_path / "busy.log")
    try:
        sampler = procs.TreeSampler(p.pid, interval_s=0.05).start()
        time.sleep(0.6)
        cpu, rss = sampler.stop()
    finally:
        p.stop()
    assert cpu > 0.05
    assert rss > 20 << 20


def test_run_queue_wait_is_read_per_thread_of_the_process() -> None:
    waits = procs.run_queue_wait_ns(os.getpid())
    assert threading.get_native_id() in waits  # this thread, by its kernel id
    assert all(isinstance(v, int) and v >= 0 for v in waits.values())
    assert procs.run_queue_wait_ns(2**22 + 7) == {}  # no such process: nothing, no error


def test_tree_sampler_adds_up_the_wait_of_threads_that_come_and_go(
        monkeypatch: pytest.MonkeyPatch) -> None:
    reads = iter([{1: 100}, {1: 400, 2: 50}, {1: 900}])  # thread 2 ends before the last read
    monkeypatch.setattr(procs, "run_queue_wait_ns", lambda pid: next(reads))
    monkeypatch.setattr(procs, "tree_pids", lambda root: [root])
    sampler = procs.TreeSampler(os.getpid(), interval_s=3600)
    sampler.start()
    sampler._sample()
    sampler.stop()
    assert sampler.wait_s == pytest.approx((900 + 50 - 100) / 1e9)


def test_router_niceness_is_given_to_every_process_the_harness_starts(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PEERS_ROUTER_NICE", "3")  # raising it needs no privilege
    p = procs.Proc("nice", [sys.executable, "-c", "import time; time.sleep(30)"],
                   tmp_path / "nice.log")
    try:
        stat = Path(f"/proc/{p.pid}/stat").read_text()
        nice = int(stat[stat.rindex(")") + 2:].split()[16])  # field 19
    finally:
        p.stop()
    assert nice == os.nice(0) + 3


@pytest.mark.skipif(not hasattr(os, "sched_setscheduler"), reason="no sched_setscheduler here")
def test_router_real_time_policy_is_given_to_every_process_the_harness_starts(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    try:  # the privilege to use a real-time policy, tried on a throwaway child
        subprocess.run(["chrt", "-r", "1", "true"], check=True, capture_output=True)
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("no privilege to start a real-time process here (CAP_SYS_NICE)")
    monkeypatch.setenv("PEERS_ROUTER_RT", "2")
    p = procs.Proc("rt", [sys.executable, "-c", "import time; time.sleep(30)"],
                   tmp_path / "rt.log")
    try:
        policy, prio = os.sched_getscheduler(p.pid), os.sched_getparam(p.pid).sched_priority
    finally:
        p.stop()
    assert (policy, prio) == (os.SCHED_RR, 2)


def test_parse_stat_handles_spaces_in_the_name() -> None:
    fields = ["S"] + ["0"] * 10 + ["150", "50"] + ["0"] * 8 + ["1000"]
    cpu, rss = procs.parse_stat("123 (a b) c) " + " ".join(fields))
    assert rss == 1000.0 and cpu == pytest.approx(200 / procs._CLK_TCK)


# -- docs -----------------------------------------------------------------------------------------


def test_write_docs_appends_then_replaces_in_place(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    import bench.peers.run as run

    doc = tmp_path / "benchmarks.md"
    monkeypatch.setattr(run, "DOCS", doc)
    write_docs("first ![x](results.png)", tmp_path / "out", None)
    text = doc.read_text()
    assert text.startswith("# Benchmarks\n") and "## Peers: live trace replay" in text
    assert "](out/results.png)" in text
    doc.write_text(text + "\n## Someone else\n\ntheirs\n")
    write_docs("second", tmp_path / "out", "Discussion.")
    text = doc.read_text()
    assert "first" not in text and "second" in text and "Discussion." in text
    assert text.index("second") < text.index("## Someone else") and text.count("## Peers") == 1


def test_reuse_artefact_detection() -> None:
    def o(mode: str, first: float) -> dict[str, object]:
        return {"mode": mode, "stream": True, "router_first_p50_ms": first}

    rs = [{"name": "a", "overhead": [o("seq", 47.0), o("seq-fresh", 3.0)]},
          {"name": "b", "overhead": [o("seq", 3.0), o("seq-fresh", 3.5)]}]
    notes = report.reuse_artefacts(rs)
    assert len(notes) == 1 and notes[0].startswith("a:")


def test_fleet_of_size_clones_the_first_endpoint_for_external_urls() -> None:
    from bench.peers.run import endpoint_urls, fleet_of_size

    cfg: dict[str, Any] = {"substrates": [
        {"name": "a", "endpoints": [{"name": "e0", "url": "u0"}, {"name": "e1", "url": "u1"}]},
        {"name": "b", "endpoints": [{"name": "f0", "url": "v0"}]}]}
    assert fleet_of_size(cfg, 3) is cfg
    three = fleet_of_size(cfg, 4)
    assert [e["name"] for e in three["substrates"][0]["endpoints"]] == [
        "e0-0", "e0-1", "e0-2", "e0-3"]
    assert len(three["substrates"]) == 1 and len(endpoint_urls(three)) == 4


def test_engine_means_are_taken_between_the_two_scrapes() -> None:
    def page(ttft_sum: float, count: float) -> str:
        return (f"vllm:time_to_first_token_seconds_sum{{engine=\"0\"}} {ttft_sum}\n"
                f"vllm:time_to_first_token_seconds_count{{engine=\"0\"}} {count}\n")

    got = metrics.engine_means_ms([page(1.0, 10), page(0.0, 0)], [page(1.5, 15), page(0.6, 5)])
    assert got["ttft"] == pytest.approx(1e3 * 1.1 / 10)  # (0.5 + 0.6) s over 10 requests
    assert got["queue"] is None and got["prefill"] is None  # no such series: no request


def test_per_engine_counts_requests_steps_and_own_ttft_between_two_scrapes() -> None:
    def page(done: tuple[float, float], steps: float, tokens: float, ttft: tuple[float, float]
             ) -> str:
        return (f'vllm:request_success_total{{finished_reason="stop"}} {done[0]}\n'
                f'vllm:request_success_total{{finished_reason="length"}} {done[1]}\n'
                f'vllm:iteration_tokens_total_bucket{{le="1.0"}} {steps}\n'
                f"vllm:iteration_tokens_total_count {steps}\n"
                f"vllm:iteration_tokens_total_sum {tokens}\n"
                f"vllm:time_to_first_token_seconds_sum {ttft[0]}\n"
                f"vllm:time_to_first_token_seconds_count {ttft[1]}\n")

    before = [page((1, 2), 100, 1000, (0.5, 3)), page((0, 0), 0, 0, (0, 0))]
    after = [page((3, 10), 150, 1600, (2.5, 13)), page((0, 0), 0, 0, (0, 0))]
    got = metrics.per_engine(before, after)
    assert got[0] == {"requests": 10, "steps": 50, "step_tokens": 600, "tokens_per_step": 12.0,
                      "ttft_ms": 200.0}  # 2 s over 10 first tokens
    assert got[1] == {"requests": 0, "steps": 0, "step_tokens": 0, "tokens_per_step": None,
                      "ttft_ms": None}  # an engine the router never sent to
    with pytest.raises(ValueError):
        metrics.per_engine(before, after[:1])
    # an engine whose page has no step histogram (inferplane's emulator): steps unknown, not 0
    plain = "vllm:request_success_total 4\n"
    [got_plain] = metrics.per_engine(["vllm:request_success_total 1\n"], [plain])
    assert got_plain["requests"] == 3 and got_plain["steps"] is None
    assert got_plain["step_tokens"] is None and got_plain["tokens_per_step"] is None


def test_the_gateways_scrapes_and_probes_are_read_from_its_own_page() -> None:
    from bench.peers.real_engines import asks_text

    def page(scrapes: float, probes: float) -> str:
        return ("# TYPE inferplane_engine_scrapes_total counter\n"
                f"inferplane_engine_scrapes_total {scrapes}\n"
                f"inferplane_health_probes_total {probes}\n")

    got = metrics.router_asks(page(10, 2), page(250, 7))
    assert got == {"scrapes": 240, "probes": 5}
    assert asks_text({"router_asks": got}) == "240 / 5"
    # another router's page, an engine's page behind Envoy, an older gateway, a failed read
    engine = "vllm:num_requests_running 0.0\n"
    assert metrics.router_asks(engine, engine) is None
    assert metrics.router_asks(page(1, 1), None) is None
    assert metrics.router_asks("inferplane_engine_scrapes_total 1\n", page(2, 2)) is None
    assert asks_text({"router_asks": None}) == "–"


def test_what_the_engines_were_asked_is_read_from_their_access_logs(tmp_path: Path) -> None:
    """Counted per method, path (filtered scrape apart) and status, summed over the engines,
    from the byte each log had reached; no logs (engines started elsewhere): None."""
    from bench.peers.real_engines import engine_log_sizes, engine_requests

    line = '(APIServer pid=7) INFO:     127.0.0.1:{} - "{} HTTP/1.1" {} OK\n'
    (tmp_path / "vllm0.log").write_text(line.format(1, "GET /metrics", 200))
    (tmp_path / "vllm1.log").write_text("INFO starting\n")
    sizes = engine_log_sizes(tmp_path)
    with (tmp_path / "vllm0.log").open("a") as f:
        f.write(line.format(2, "GET /metrics/?name[]=vllm:num_requests_running", 200))
        f.write(line.format(3, "POST /v1/completions", 200))
        f.write("some other line\n")
    with (tmp_path / "vllm1.log").open("a") as f:
        f.write(line.format(4, "GET /metrics/?name[]=x&name[]=y", 200))
        f.write(line.format(5, "GET /health", 200))
        f.write(line.format(6, "POST /v1/completions", 200))
    assert engine_requests(tmp_path, sizes) == {
        "GET /health 200": 1, "GET /metrics/?filtered 200": 2, "POST /v1/completions 200": 2}
    assert engine_requests(tmp_path / "none", engine_log_sizes(tmp_path / "none")) is None


def test_the_bench_opens_the_gateways_metrics_page() -> None:
    import yaml

    from bench.peers.real_engines import fleet_yaml
    from inferplane.config.loader import parse_config

    text = fleet_yaml([("http://127.0.0.1:9", "ipc:///tmp/x")], 64, 4, True, tokenizer=False)
    assert yaml.safe_load(text)["gateway"]["metrics"] == {"public": True}
    assert parse_config(text).gateway.metrics.public


def test_results_sum_the_engine_steps_and_show_each_engine() -> None:
    from bench.peers.real_engines import aggregate, engines_text, summed_steps, table

    def res(steps: list[float] | None, p90: float = 200) -> dict[str, Any]:
        per = None if steps is None else [
            {"requests": 10 * (i + 1), "steps": n, "step_tokens": 5 * n,
             "tokens_per_step": 5.0, "ttft_ms": None if i else 123.4}
            for i, n in enumerate(steps)]
        return {"name": "inferplane default", "status": "ok", "hit_rate": 0.1,
                "engine_cpu_s": None, "api_cpu_s": None, "cpu_s": None, "engine_ms": None,
                "per_engine": per,
                "summary": {"ttft_ms": {"p50": p90 / 2, "p90": p90, "p99": p90 * 2},
                            "errors": 0, "requests": 307}}

    runs = [res([100, 200, 300]), res([300, 300, 300]), res([10, 20, 30])]
    assert [summed_steps(r) for r in runs] == [600, 900, 60]
    rows = aggregate(runs)
    assert rows[0]["engine_steps"] == {"median": 600, "min": 60, "max": 900}
    assert "| 600 (60–900) |" in table(rows)
    assert engines_text(runs[0]) == "10/100/123, 20/200/–, 30/300/–"
    # a replay recorded before per-engine counts (or without them): no summed steps
    assert summed_steps(res(None)) is None and engines_text(res(None)) == "–"
    unknown = res([1, 2, 3])
    unknown["per_engine"][1]["steps"] = None  # an engine without the step histogram
    assert summed_steps(unknown) is None and engines_text(unknown).startswith("10/1/123, 20/–/–")
    assert aggregate([*runs, res(None)])[0]["engine_steps"] is None


def test_the_stand_in_engine_logs_arrival_and_first_event(tmp_path: Path) -> None:
    """`fake_engine --arrivals` writes the prompt's key, when the request arrived and when its
    first event left; `burst_transit.split` turns that and the client's records into the way
    in and the way out."""
    import asyncio
    import io

    import aiohttp
    from aiohttp.test_utils import TestServer

    from bench.peers.burst_transit import split
    from bench.peers.fake_engine import build, prompt_key

    arrivals = io.StringIO()
    body = orjson.dumps({"model": "m", "prompt": "a b c", "stream": True})

    async def main() -> tuple[float, float]:
        server = TestServer(build(0.01, None, arrivals))
        await server.start_server()
        try:
            async with aiohttp.ClientSession() as s:
                t0 = time.perf_counter()
                async with s.post(server.make_url("/v1/completions"), data=body) as r:
                    first = await r.content.readline()
                    t1 = time.perf_counter()
                    assert first.startswith(b"data: ")
                    await r.read()
                return t0, t1
        finally:
            await server.close()

    t0, t1 = asyncio.run(main())
    key, arrived, first = arrivals.getvalue().split()
    assert key == prompt_key("a b c")
    assert t0 <= float(arrived) <= float(first) <= t1
    f = tmp_path / "arrivals.txt"
    f.write_text(arrivals.getvalue())
    rec = Record(0, sent_s=t0, ttft_s=t1 - t0, status=200)
    got = split([rec], [body], [f])
    assert got["matched"] == 1
    assert got["in_p50"] == pytest.approx(1e3 * (float(arrived) - t0))
    assert got["out_p50"] == pytest.approx(1e3 * (t1 - float(first)))
    assert got["ttft_p50"] == pytest.approx(1e3 * (t1 - t0))


def test_the_client_records_the_endpoint_the_router_names() -> None:
    """`client.send` keeps inferplane's ``x-inferplane-endpoint`` answer header in the record
    (run.py's per_request rows carry it: which engine answered each request); a router that
    names none leaves it None."""
    import asyncio

    import aiohttp
    from aiohttp import web
    from aiohttp.test_utils import TestServer

    from bench.peers.client import send

    async def answer(request: web.Request) -> web.StreamResponse:
        named = request.path.endswith("/named/v1/completions")
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", **(
            {"x-inferplane-endpoint": "vllm-1"} if named else {})})
        await resp.prepare(request)
        await resp.write(b'data: {"choices": [{"index": 0, "text": "hi"}]}\n\n')
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp

    app = web.Application()
    app.router.add_post("/named/v1/completions", answer)
    app.router.add_post("/v1/completions", answer)

    async def main() -> tuple[Record, Record]:
        server = TestServer(app)
        await server.start_server()
        try:
            async with aiohttp.ClientSession() as s:
                named = await send(s, str(server.make_url("/named/v1/completions")), b"{}",
                                   {}, Record(0), 10)
                plain = await send(s, str(server.make_url("/v1/completions")), b"{}", {},
                                   Record(1), 10)
            return named, plain
        finally:
            await server.close()

    named, plain = asyncio.run(main())
    assert named.ok and plain.ok
    assert (named.endpoint, plain.endpoint) == ("vllm-1", None)


def test_gateway_gap_reads_the_engines_means_and_hit_rate_between_two_pages() -> None:
    from bench.peers.gateway_gap import engine_side

    def page(ttft_sum: float, count: float, hits: float, queries: float) -> str:
        return (f"vllm:time_to_first_token_seconds_sum {ttft_sum}\n"
                f"vllm:time_to_first_token_seconds_count {count}\n"
                f"vllm:prefix_cache_hits_total {hits}\n"
                f"vllm:prefix_cache_queries_total {queries}\n")

    got = engine_side(page(1.0, 10, 5, 50), page(1.4, 14, 15, 100))
    assert got == {"engine_ttft_ms": pytest.approx(100.0), "engine_hit_pct": pytest.approx(20.0)}
    assert engine_side(page(1.0, 10, 5, 50), page(1.0, 10, 5, 50)) == {"engine_hit_pct": 0.0}


def test_the_python_proxy_relays_in_turn_and_streams() -> None:
    """`python_proxy`: request *i* to upstream *i* mod N, the body and end-to-end headers as
    sent (hop-by-hop ones dropped), a stream relayed event by event (the upstream sends its
    second event only once the client has read the first), the upstream's status kept, 502
    for an upstream that cannot be reached."""
    import asyncio

    import aiohttp
    from aiohttp import web
    from aiohttp.test_utils import TestServer

    from bench.peers.procs import free_port
    from bench.peers.python_proxy import build

    seen: list[tuple[int, bytes, str | None, str | None]] = []
    read_first: dict[int, asyncio.Event] = {}

    def upstream(i: int) -> web.Application:
        async def answer(request: web.Request) -> web.StreamResponse:
            k = int(orjson.loads(await request.read())["k"])
            seen.append((i, await request.read(), request.headers.get("Authorization"),
                         request.headers.get("Proxy-Authorization")))
            if request.query.get("status"):
                return web.Response(status=int(request.query["status"]), text="no")
            resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await resp.prepare(request)
            for n in range(3):
                await resp.write(f"data: {i}-{n}\n\n".encode())
                if n == 0:  # a proxy that waits for the whole answer never gets the rest
                    await asyncio.wait_for(read_first[k].wait(), 10)
            return resp

        app = web.Application()
        app.router.add_post("/v1/completions", answer)
        return app

    async def main() -> list[tuple[int, list[bytes]]]:
        ups = [TestServer(upstream(i)) for i in range(2)]
        for u in ups:
            await u.start_server()
        dead = f"http://127.0.0.1:{free_port()}"
        proxy = TestServer(await build([str(u.make_url("")) for u in ups] + [dead]))
        await proxy.start_server()
        out = []
        try:
            async with aiohttp.ClientSession() as s:
                for k in range(5):  # upstream 0, 1, the dead one, 0 (asked for 429), 1
                    read_first[k] = asyncio.Event()
                    url = proxy.make_url("/v1/completions" + ("?status=429" if k == 3 else ""))
                    async with s.post(url, data=orjson.dumps({"k": k}),
                                      headers={"Authorization": "Bearer x",
                                               "Proxy-Authorization": "y"}) as r:
                        if k in (2, 3):
                            assert r.status == (502 if k == 2 else 429)
                            continue
                        assert r.status == 200
                        assert r.headers["Content-Type"] == "text/event-stream"
                        lines = [await r.content.readline()]
                        read_first[k].set()
                        lines += [line async for line in r.content]
                        out.append((k, [x for x in lines if x.strip()]))
        finally:
            await proxy.close()
            for u in ups:
                await u.close()
        return out

    got = asyncio.run(main())
    assert [(i, b) for i, b, _, _ in seen] == [
        (i, orjson.dumps({"k": k})) for k, i in ((0, 0), (1, 1), (3, 0), (4, 1))]
    assert all(a == "Bearer x" and p is None for _, _, a, p in seen)
    assert got == [(k, [f"data: {i}-{n}\n".encode() for n in range(3)])
                   for k, i in ((0, 0), (1, 1), (4, 1))]


def test_a_variant_sets_dotted_keys_and_list_items() -> None:
    import yaml

    from bench.peers.real_engines import apply_variant, fleet_yaml

    text = fleet_yaml([("http://a", "tcp://x"), ("http://b", "tcp://y")], 1024, 16, True)
    got = yaml.safe_load(apply_variant(
        text, "gateway.scrape_interval_s:60,substrates.0.endpoints.1.kv_events:null,"
              "substrates.0.endpoints.0.models.0.tokenizer:null,gateway.new.key:yes"))
    eps = got["substrates"][0]["endpoints"]
    assert got["gateway"]["scrape_interval_s"] == 60
    assert got["gateway"]["new"] == {"key": True}
    assert (eps[0]["kv_events"], eps[1]["kv_events"]) == ("tcp://x", None)
    assert eps[0]["models"][0]["tokenizer"] is None
    assert eps[1]["models"][0]["tokenizer"] is not None
    with pytest.raises(ValueError, match="not KEY:VALUE"):
        apply_variant(text, "gateway.port")


def test_a_variant_is_checked_on_a_fleet_of_the_runs_size(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from bench.peers.real_engines import main

    def error(*variant: str, urls: str = "http://a,http://b,http://c") -> str:
        args = [x for v in variant for x in ("--variant", v)]
        with pytest.raises(SystemExit):  # --executor with --urls: refused after the variants
            main([*args, "--only", "inferplane default", "--urls", urls, "--executor", "mp"])
        return capsys.readouterr().err

    assert "--executor starts the engines" in error("nokv=substrates.0.endpoints.2.kv_events:null")
    got = error("nokv=substrates.0.endpoints.3.kv_events:null")
    assert "--variant 'nokv=" in got and "list index out of range" in got
    got = error("nokv=substrates.0.endpoints.2.kv_events:null", urls="http://a,http://b")
    assert "list index out of range" in got


def test_every_peer_is_installed_or_in_tree() -> None:
    from bench.peers import venvs
    from bench.peers.peers import IN_TREE
    from bench.peers.run import python_proxy_version

    assert {s.peer for s in setups()} <= IN_TREE | set(venvs.PACKAGES)
    assert not IN_TREE & set(venvs.PACKAGES)
    assert python_proxy_version().startswith("aiohttp ")


def test_a_setup_outside_the_default_list_gets_its_row() -> None:
    from bench.peers.real_engines import aggregate

    def res(name: str, p90: float) -> dict[str, Any]:
        return {"name": name, "status": "ok", "hit_rate": 0.1, "engine_cpu_s": None,
                "api_cpu_s": None, "cpu_s": None, "engine_ms": None,
                "summary": {"ttft_ms": {"p50": p90 / 2, "p90": p90, "p99": p90 * 2},
                            "errors": 0, "requests": 307}}

    rows = aggregate([res("python-proxy round_robin", 170), res("inferplane default", 200),
                      res("python-proxy round_robin", 180)])
    assert [r["name"] for r in rows] == ["inferplane default", "python-proxy round_robin"]
    assert rows[1]["runs"] == 2 and rows[1]["ttft_p90_ms"]["median"] == 175
    assert rows[1]["pooled_ttft_ms"] is None  # no per-request records


def test_pooled_ttft_takes_every_answered_request_of_every_run() -> None:
    from bench.peers.real_engines import pooled_ttft, table

    def run(ttfts: list[float | None], ok: bool = True) -> dict[str, Any]:
        # [index, arrival s, input tokens, blocks, TTFT ms, cached tokens, ok]
        return {"per_request": [[i, 0.0, 10, 1, t, None, ok] for i, t in enumerate(ttfts)]}

    got = pooled_ttft([run([10.0, 20.0, None]), run([30.0, 40.0, 50.0]),
                       run([1000.0], ok=False)])  # no first token / failed: left out
    assert got == {"p50": 30.0, "p90": 46.0, "p99": pytest.approx(49.6), "mean": 30.0,
                   "requests": 5}
    assert pooled_ttft([run([10.0]), {"per_request": None}]) is None
    row = {"name": "x", "runs": 2, "hit_rate": None, "ttft_p50_ms": {"median": 1, "min": 1,
           "max": 1}, "ttft_p90_ms": {"median": 2, "min": 2, "max": 2},
           "ttft_p99_ms": {"median": 3, "min": 3, "max": 3}, "pooled_ttft_ms": got,
           "errors": [0, 0], "requests": 3}
    assert "| 30 / 46 / 30 |" in table([row])


def test_the_warm_up_replays_the_slices_first_seconds_through_the_relay(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import argparse

    from bench.peers import real_engines

    calls: list[tuple[str, int, float]] = []

    def run_one(name: str, rep: int, urls: list[str], fleet: Path, a: argparse.Namespace,
                work: Path, python: str | None = None) -> dict[str, Any]:
        calls.append((name, rep, a.duration))
        if len(calls) > 1:
            raise RuntimeError("engine gone")
        return {"status": "ok", "summary": {"ttft_ms": {"p90": 99.0}}, "wall_s": 40.0}

    monkeypatch.setattr(real_engines, "run_one", run_one)
    a = argparse.Namespace(duration=120.0, warmup_s=30.0)
    got = real_engines.warm_up(["u"], tmp_path / "f.yaml", a, tmp_path)
    assert calls == [("python-proxy round_robin", -1, 30.0)] and a.duration == 120.0
    assert got["status"] == "ok" and got["ttft_ms"] == {"p90": 99.0}
    assert real_engines.warm_up(["u"], tmp_path / "f.yaml", a, tmp_path)["status"] == "failed"


def test_cpu_per_request_counts_every_live_thread_in_nanoseconds() -> None:
    """`procs.cpu_ns` sums every thread's schedstat: a thread that is still alive and
    has run adds its time to the process's."""
    import os
    import threading

    from bench.peers.procs import cpu_ns

    pid = os.getpid()
    done, stop = threading.Event(), threading.Event()

    def spin() -> None:
        sum(range(2_000_000))
        done.set()
        stop.wait(10)

    before = cpu_ns(pid)
    t = threading.Thread(target=spin)
    t.start()
    try:
        assert done.wait(10)
        spun = int((Path(f"/proc/{pid}/task/{t.native_id}/schedstat")).read_text().split()[0])
        assert spun > 0 and cpu_ns(pid) - before >= spun  # the live thread's time is counted
    finally:
        stop.set()
        t.join()


# -- Envoy + the endpoint picker (`inferplane envoy`) ---------------------------------------------


def test_the_envoy_setup_gives_the_picker_the_gateways_fleet_and_envoy_the_clients_port() -> None:
    import yaml

    from bench.peers.peers import ENVOY_EPP, epp_fleet
    from bench.peers.real_engines import SETUPS, fleet_yaml
    from inferplane.config.loader import parse_config
    from inferplane.epp.envoy_config import bootstrap

    urls = ["http://127.0.0.1:9101", "http://127.0.0.1:9102", "http://127.0.0.1:9103"]
    gateway = yaml.safe_load(fleet_yaml([(u, f"ipc:///tmp/kv{i}") for i, u in enumerate(urls)],
                                        1024, 16, True, tokenizer=False))
    cfg = epp_fleet(gateway, urls, envoy_port=7100, epp_port=7101, admin_port=7102,
                    gateway_port=7103)
    assert cfg["epp"] == {"host": "127.0.0.1", "port": 7101, "envoy_host": "127.0.0.1",
                          "envoy_port": 7100, "envoy_admin_port": 7102}
    # the same fleet as the gateway's: endpoints, KV events, profile, tenants; the observer on
    mine = json_copy(cfg)
    del mine["epp"]
    assert mine == inferplane_fleet(gateway, urls, 7103, None)
    assert [e["kv_events"] for e in cfg["substrates"][0]["endpoints"]] == [
        f"ipc:///tmp/kv{i}" for i in range(3)]
    parsed = parse_config(yaml.safe_dump(cfg))
    assert parsed.epp.observe_responses is True
    boot = bootstrap(parsed)
    assert boot["static_resources"]["listeners"][0]["address"]["socket_address"][
        "port_value"] == 7100
    epp = next(c for c in boot["static_resources"]["clusters"] if c["name"] == "inferplane_epp")
    assert "7101" in str(epp["load_assignment"])
    setup = next(s for s in setups() if s.name == ENVOY_EPP)
    assert (setup.peer, setup.form, setup.ready, setup.ready_ok) == (
        "inferplane", "completion-text", "/v1/models", (401,))
    assert ENVOY_EPP in SETUPS and ENVOY_EPP == "inferplane envoy"


def json_copy(x: Any) -> Any:
    return orjson.loads(orjson.dumps(x))


def test_a_joined_router_is_alive_while_every_part_is_and_is_sampled_whole(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sleep = [sys.executable, "-c", "import time; time.sleep(60)"]
    a = procs.Proc("picker", sleep, tmp_path / "a.log")
    b = procs.Proc("envoy", sleep, tmp_path / "b.log")
    joined = procs.Joined("both", [a, b])
    assert joined.pids == [a.pid, b.pid] and joined.pid == b.pid and joined.alive()
    reads = {a.pid: iter([{1: 100}, {1: 300}]), b.pid: iter([{2: 10}, {2: 60}])}
    monkeypatch.setattr(procs, "run_queue_wait_ns", lambda pid: next(reads[pid]))
    monkeypatch.setattr(procs, "tree_pids", lambda root: [root])
    sampler = procs.TreeSampler(joined.pids, interval_s=3600)
    sampler.start()
    sampler.stop()
    assert sampler.wait_s == pytest.approx((200 + 50) / 1e9)  # both trees' waits
    a.stop()
    assert not joined.alive() and joined.popen is a.popen  # the part that exited
    joined.stop()
    assert not b.alive() and a not in procs.running() and b not in procs.running()


def test_the_envoy_setup_answers_through_envoy_on_the_endpoint_the_picker_chose(
        tmp_path: Path) -> None:
    """The real setup: the picker and Envoy started by its starter, in front of three stand-in
    engines; every answer carries the picker's decision and was served by the endpoint it
    named, and the router's CPU is read over both processes."""
    import httpx

    from bench.peers.peers import ENVOY_EPP, Context
    from bench.peers.run import start_router, warm_up

    urls, fleet = _three_fake_engines(tmp_path)
    try:
        setup = next(s for s in setups() if s.name == ENVOY_EPP)
        proc, base = start_router(setup, Context(tmp_path, urls, "tiny-llama", fleet, {}))
        assert len(proc.pids) == 2  # the picker and Envoy
        assert {Path(f"/proc/{pid}/exe").resolve().name for pid in proc.pids} >= {"envoy"}
        sampler = procs.TreeSampler(proc.pids, interval_s=3600).start()
        warm_up(base, setup, "tiny-llama", n=2)
        served = {u.split("//")[1]: u for u in urls}
        for i in range(6):
            body = {"model": "tiny-llama", "prompt": f"word{i} " * (4 + 20 * i), "max_tokens": 3,
                    "stream": True, "stream_options": {"include_usage": True}}
            with httpx.stream("POST", base + "/v1/completions", json=body, timeout=30,
                              headers=dict(setup.headers)) as r:
                text = r.read().decode()
                assert r.status_code == 200 and "[DONE]" in text
                picked = r.headers["x-inferplane-endpoint"]
                assert r.headers["x-inferplane-decision-id"]
                # vllm-N is the N-th URL: Envoy sent it where the picker said
                assert served[r.headers["x-gateway-destination-endpoint-served"]] == \
                    urls[int(picked.rsplit("-", 1)[1])]
        cpu, _ = sampler.stop()
        assert cpu > 0
        proc.stop()
        assert not any(Path(f"/proc/{pid}").exists() and _state(pid) != "Z"
                       for pid in proc.pids)
    finally:
        procs.stop_all()


def test_the_null_picker_setup_sends_the_engines_in_turn_through_envoy(tmp_path: Path) -> None:
    """``envoy null-picker round_robin``: the same Envoy and bootstrap as ``inferplane envoy``,
    `bench/null_picker.py` in the picker's place answering with each engine in turn."""
    import httpx

    from bench.peers.peers import ENVOY_NULL, Context
    from bench.peers.run import start_router

    urls, fleet = _three_fake_engines(tmp_path)
    try:
        setup = next(s for s in setups() if s.name == ENVOY_NULL)
        proc, base = start_router(setup, Context(tmp_path, urls, "tiny-llama", fleet, {}))
        assert len(proc.pids) == 2  # the null picker and Envoy
        served = []
        for i in range(6):
            body = {"model": "tiny-llama", "prompt": f"word{i} " * 8, "max_tokens": 3,
                    "stream": True}
            with httpx.stream("POST", base + "/v1/completions", json=body, timeout=30,
                              headers=dict(setup.headers)) as r:
                assert r.status_code == 200 and "[DONE]" in r.read().decode()
                served.append(r.headers["x-gateway-destination-endpoint-served"])
        # every engine, in turn
        assert sorted(served[:3]) == sorted(u.split("//")[1] for u in urls)
        assert served[3:] == served[:3]
    finally:
        procs.stop_all()


def _three_fake_engines(tmp_path: Path) -> tuple[list[str], dict[str, Any]]:
    """Three `fake_engine.py` stand-ins (answering after 10 ms), up: their URLs and the
    real-engine bench's fleet file for them (no KV events, no tokenizer). `procs.stop_all`
    stops them."""
    import yaml

    from bench.peers.real_engines import fleet_yaml

    ports = procs.free_ports(3)
    urls = [f"http://127.0.0.1:{p}" for p in ports]
    fakes = [procs.Proc(f"fake{i}", [sys.executable, "bench/peers/fake_engine.py", "--port",
                                     str(p), "--ttft-s", "0.01"], tmp_path / f"fake{i}.log")
             for i, p in enumerate(ports)]
    try:
        for f, u in zip(fakes, urls, strict=True):
            f.wait_http(u + "/health")
    except BaseException:
        procs.stop_all()
        raise
    fleet = yaml.safe_load(fleet_yaml([(u, "") for u in urls], 1024, 16, False, tokenizer=False))
    return urls, fleet


# -- CPU layout: --engine-cpus and --router-cpus ---------------------------------------------

# a child that starts a thread and a process of its own, then waits: what it starts must
# inherit the CPUs it was started on
_FAMILY = ("import subprocess, sys, threading, time; "
           "threading.Thread(target=time.sleep, args=(60,), daemon=True).start(); "
           "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
           "time.sleep(60)")


def _family_up(pids: Any, want_procs: int = 2, timeout_s: float = 20.0) -> dict[str, Any]:
    """`procs.threads_cpus` of ``pids()`` once it shows ``want_procs`` processes and more
    threads than processes (the child's own thread started)."""
    deadline = time.monotonic() + timeout_s
    while True:
        got = procs.threads_cpus(pids())
        if (got["processes"] >= want_procs and got["threads"] > got["processes"]) \
                or time.monotonic() > deadline:
            return got
        time.sleep(0.1)


def _one_cpu_of_several() -> int:
    if not hasattr(os, "sched_setaffinity"):
        pytest.skip("no sched_setaffinity here")
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        pytest.skip("one CPU here: a pinned child would look like an unpinned one")
    return cpus[-1]


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="no sched_setaffinity here")
def test_cpu_lists_are_parsed_and_checked_against_the_cpus_allowed() -> None:
    assert procs.parse_cpu_list("1", {0, 1}) == [1]
    assert procs.parse_cpu_list("1,0,1", {0, 1}) == [0, 1]
    assert procs.parse_cpu_list("0-2,5", {0, 1, 2, 5}) == [0, 1, 2, 5]
    assert procs.format_cpu_list([5, 0, 1, 2]) == "0-2,5"
    assert procs.format_cpu_list([]) == ""
    for bad, why in (("x", "is not a CPU list"), ("", "is not a CPU list"),
                     ("2-1", "not a CPU or an increasing range"),
                     ("0,3", r"CPU 3 is not one this process may run on \(0-1\)")):
        with pytest.raises(ValueError, match=why):
            procs.parse_cpu_list(bad, {0, 1})
    here = sorted(os.sched_getaffinity(0))
    assert procs.parse_cpu_list(procs.format_cpu_list(here)) == here
    with pytest.raises(ValueError, match="not one this process may run on"):
        procs.parse_cpu_list(str(here[-1] + 1000))
    t0 = time.monotonic()  # a range is bounded before it is expanded: an error, not a hang
    with pytest.raises(ValueError, match="CPU 4000000000 is not one"):
        procs.parse_cpu_list("0-4000000000", {0, 1})
    assert time.monotonic() - t0 < 1


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="no sched_setaffinity here")
def test_real_engines_refuses_cpu_lists_it_cannot_keep(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from bench.peers.real_engines import main

    def error(*args: str) -> str:
        with pytest.raises(SystemExit):
            main(["--only", "inferplane default", *args])
        return capsys.readouterr().err

    cpu = min(os.sched_getaffinity(0))
    far = str(max(os.sched_getaffinity(0)) + 1000)
    assert f"--engine-cpus '{far}': CPU {far} is not one" in error("--engine-cpus", far)
    assert "not one this process may run on" in error("--router-cpus", far)
    assert "is not a CPU list" in error("--router-cpus", "zero")
    got = error("--engine-cpus", str(cpu), "--router-cpus", str(cpu))
    assert f"share CPU {cpu}" in got
    assert "does not apply to --urls" in error("--engine-cpus", str(cpu),
                                               "--urls", "http://a,http://b,http://c")
    assert "--router-rt with --router-cpus" in error("--router-cpus", str(cpu),
                                                      "--router-rt", "1")
    from bench.peers.run import parse_args

    fleet = ["--fleet", "http://a", "--no-overhead"]
    with pytest.raises(SystemExit):
        parse_args(["--router-cpus", far, *fleet])
    assert "--router-cpus" in capsys.readouterr().err
    for alone in ([], ["--fleet", "http://a"], ["--no-overhead"]):  # the emulators: refused
        with pytest.raises(SystemExit):
            parse_args(["--router-cpus", str(cpu), *alone])
        assert "needs --fleet and --no-overhead" in capsys.readouterr().err
    assert parse_args(["--router-cpus", str(cpu), *fleet]).router_cpu_list == [cpu]


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="no sched_setaffinity here")
@pytest.mark.parametrize("only", [[], ["--engines-only"]])
def test_router_cpus_alone_starts_the_engines_on_the_cpus_from_before_the_pinning(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, only: list[str]) -> None:
    from bench.peers import real_engines

    before = sorted(os.sched_getaffinity(0))
    pinned: list[list[int]] = []
    started: list[list[int] | None] = []

    def start(*args: Any, cpus: list[int] | None = None, **kw: Any) -> Any:
        started.append(cpus)
        raise KeyboardInterrupt  # stop before anything runs

    monkeypatch.setattr(os, "sched_setaffinity", lambda pid, cpus: pinned.append(list(cpus)))
    monkeypatch.setattr(real_engines, "start_engines", start)
    monkeypatch.setenv(procs.ROUTER_CPUS_ENV, "")
    old = signal.getsignal(signal.SIGTERM)
    try:
        assert real_engines.main(["--router-cpus", str(before[0]), "--out", str(tmp_path),
                                  *only]) == 130
    finally:
        signal.signal(signal.SIGTERM, old)
    assert pinned == [[before[0]]]  # the orchestrator (and the routers) on the router CPU,
    assert started == [before]  # the engines on every CPU it had before, not on that one
    assert real_engines.engines_cpus_for([], [0], [0, 1]) == [0, 1]
    assert real_engines.engines_cpus_for([1], [0], [0, 1]) == [1]
    assert real_engines.engines_cpus_for([], [], [0, 1]) == []


def test_a_router_its_children_and_threads_run_on_the_router_cpus(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cpu = _one_cpu_of_several()
    monkeypatch.setenv(procs.ROUTER_CPUS_ENV, str(cpu))
    p = procs.Proc("pinned", [sys.executable, "-c", _FAMILY], tmp_path / "pinned.log")
    try:
        got = _family_up(lambda: procs.tree_pids(p.pid))
    finally:
        p.stop()
    assert got["processes"] == 2 and got["threads"] >= 3
    assert got["cpus"] == {str(cpu): got["threads"]}


def test_an_engine_its_children_and_threads_run_on_the_engine_cpus(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from bench.peers import real_engines

    cpu = _one_cpu_of_several()
    monkeypatch.setattr(real_engines, "PROCS", [])
    real_engines.start_engine([sys.executable, "-c", _FAMILY], tmp_path / "engine.log",
                              dict(os.environ), tmp_path, [cpu])
    try:
        got = _family_up(real_engines.engine_pids)
    finally:
        real_engines.stop_engines()
    assert got["processes"] == 2 and got["threads"] >= 3
    assert got["cpus"] == {str(cpu): got["threads"]}
    assert real_engines.check_layout(got, [cpu]) == []
    assert real_engines.check_layout({"cpus": {"0-1": 3, "1": 2}}, [1]) == ["0-1"]
    assert real_engines.check_layout({"cpus": {"0-1": 3}}, []) == []
    # a thread narrowed inside the CPUs asked (vLLM's OMP binding under mp) is where it should be
    assert real_engines.check_layout({"cpus": {"1": 2, "1-2": 3, "2": 1}}, [1, 2]) == []
    assert real_engines.check_layout({"cpus": {"1": 2, "0-2": 3}}, [1, 2]) == ["0-2"]


def test_the_cpu_layout_is_named_and_what_proc_showed_is_in_the_results() -> None:
    from bench.peers.real_engines import layout_lines, layout_text

    assert layout_text([1], [0]) == "engines on CPU 1, routers and client on CPU 0"
    assert layout_text([1, 2, 3], []) == "engines on CPUs 1-3, routers and client on any CPU"
    assert layout_text([], []) is None
    assert layout_text([], [0], engines_here=False) == (
        "engines started elsewhere (--urls, their CPUs not set by this run), routers and "
        "client on CPU 0")
    ok = {"status": "ok", "router_threads_cpus": {"processes": 1, "threads": 5,
                                                  "cpus": {"0": 5}},
          "client_threads_cpus": {"processes": 1, "threads": 2, "cpus": {"0": 2}}}
    doc = {"results": [ok, ok, {"status": "failed"}],
           "cpu_layout": {"text": layout_text([1], [0]), "host_cpus": "0-1",
                          "engines_at_start": {"processes": 6, "threads": 40,
                                               "cpus": {"1": 40}},
                          "engines_at_end": {"processes": 6, "threads": 41,
                                             "cpus": {"1": 41}}}}
    text = layout_lines(doc)[0]
    assert text.startswith("CPU layout: engines on CPU 1, routers and client on CPU 0 "
                           "(host CPUs 0-1).")
    assert "the engines' 6 processes at the start, CPU 1: 40; at the end" in text
    assert "each of the 2 replays and summed, CPU 0: 10; the client's, CPU 0: 4." in text
    assert "NOT as asked" not in text
    assert layout_lines({"results": []}) == []
    # nothing pinned: results.md as before the layout was recorded
    assert layout_lines({"results": [ok], "cpu_layout": {"text": None, "host_cpus": "0-1",
                                                          "engines_at_start": {}}}) == []
    # a reading off the CPUs asked is flagged: the engines' end, the routers', the client's
    stray = {**ok, "router_threads_cpus": {"processes": 1, "threads": 5,
                                           "cpus": {"0": 4, "0-1": 1}}}
    lay = {**doc["cpu_layout"], "engine_cpus": "1", "router_cpus": "0",
           "engines_at_end": {"processes": 6, "threads": 41, "cpus": {"1": 40, "0-1": 1}}}
    text = layout_lines({"results": [stray, ok], "cpu_layout": lay})[0]
    assert "at the end (6 processes), CPU 0-1: 1, CPU 1: 40 — NOT as asked (CPU 1): 0-1;" in text
    assert "summed, CPU 0: 9, CPU 0-1: 1 — NOT as asked (CPU 0): 0-1; the client's, CPU 0: 4." \
        in text
    assert "at the start, CPU 1: 40;" in text
    # engines started elsewhere (--urls): no engine counts, which would read "0 processes"
    urls = {"text": layout_text([], [0], engines_here=False), "host_cpus": "0-1",
            "router_cpus": "0", "engines_here": False,
            "engines_at_start": {"processes": 0, "threads": 0, "cpus": {}},
            "engines_at_end": {"processes": 0, "threads": 0, "cpus": {}}}
    text = layout_lines({"results": [ok], "cpu_layout": urls})[0]
    assert "processes" not in text and "engines started elsewhere (--urls" in text


def test_wait_up_names_an_engine_that_exited_or_never_answered(tmp_path: Path) -> None:
    """`procs.wait_up`, the readiness poll of every engine, router and gateway the peer
    scripts start without `Proc`: a process that exits is named with its status and its log's
    tail; one that never answers is named once the time is up (after one poll at least)."""
    log = tmp_path / "engine.log"
    log.write_text("boom: no model\n")
    dead = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
    dead.wait()
    url = f"http://127.0.0.1:{procs.free_port()}"
    with pytest.raises(RuntimeError, match=r"(?s)vLLM 0 exited with 3:\nboom: no model"):
        procs.wait_up(url, dead, "vLLM 0", log=log)
    with pytest.raises(RuntimeError, match=r"^router not up after \d+s$"):
        procs.wait_up(url, None, "router", timeout_s=0)


def test_start_fake_starts_a_stand_in_engine_that_records_arrivals(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`gateway_gap.start_fake` (the stand-in of burst_transit, scrape_wakeups, path_cost…)
    returns once the engine answers, in a session of its own under `real_engines.PROCS`; with
    ``access_log=False`` it writes no access log, with ``arrivals`` it stamps each request."""
    import httpx

    from bench.peers import real_engines
    from bench.peers.gateway_gap import start_fake

    monkeypatch.setattr(real_engines, "PROCS", [])
    arrivals = tmp_path / "arrivals.txt"
    arrivals.touch()
    try:
        url, kv = start_fake(0.01, tmp_path, 4, arrivals=arrivals, access_log=False)
        (p,) = real_engines.PROCS
        assert os.getpgid(p.pid) == p.pid  # its own session: stop_engines ends its group
        assert kv == f"ipc://{tmp_path}/kv4.sock"
        r = httpx.post(f"{url}/v1/completions", json={
            "model": "m", "prompt": [1, 2, 3], "max_tokens": 2, "stream": True}, timeout=10)
        assert r.status_code == 200
    finally:
        real_engines.stop_engines()
    assert not (tmp_path / "vllm4.log").exists()
    assert len(arrivals.read_text().splitlines()) == 1


def test_wait_up_takes_other_answers_a_shared_start_and_an_error_type(tmp_path: Path) -> None:
    """`procs.wait_up` is also `Proc.wait_http`: it accepts the answers in ``ok``, raises
    ``timeout_error`` when the time is up, and counts that time from ``started_at`` when given
    (engines waited on in turn share one deadline and report the whole wait)."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Busy(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(503)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Busy)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        procs.wait_up(url, None, "router", path="/", ok=(200, 503))
        with pytest.raises(TimeoutError, match=r"^router not up after \d+s$"):
            procs.wait_up(url, None, "router", path="/", timeout_s=0, timeout_error=TimeoutError)
        with pytest.raises(RuntimeError, match=r"^vLLM 1 not up after (\d+)s$") as err:
            procs.wait_up(url, None, "vLLM 1", timeout_s=60, started_at=time.monotonic() - 600)
        assert int(str(err.value).split()[-1].rstrip("s")) >= 600
    finally:
        server.shutdown()
        server.server_close()


def test_a_vllm_router_that_never_answers_is_stopped(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """When path_cost's vllm-router never comes up, `start_router` raises and ends the router
    itself: its callers only stop the routers it returns."""
    from bench.peers import path_cost

    router = tmp_path / "vllm-router"
    router.write_text("#!/bin/sh\necho listening nowhere\nexec sleep 600\n")
    router.chmod(0o755)
    monkeypatch.setattr(path_cost, "VLLM_ROUTER", router)
    seen: list[subprocess.Popen[bytes]] = []

    def never_up(url: str, p: subprocess.Popen[bytes], what: str, **kw: Any) -> None:
        seen.append(p)
        raise RuntimeError(f"{what} not up after 60s")

    monkeypatch.setattr(path_cost, "wait_up", never_up)
    try:
        with pytest.raises(RuntimeError, match="vllm-router not up"):
            path_cost.start_router("vllm-router", ("http://127.0.0.1:9", "ipc://x"), tmp_path, 0)
        (p,) = seen
        assert p.poll() is not None
    finally:
        for p in seen:
            if p.poll() is None:
                p.kill()
                p.wait()
