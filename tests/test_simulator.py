"""The offline simulator: the JSON contract, placement through the real profiles, determinism,
rate scaling, sovereignty, trace-derived prefixes and CLI errors.

Fleets are built here (small, Llama-3.1-8B on H100); traces are small synthetic Mooncake-like
conversations written to ``tmp_path`` (each turn re-sends the previous turns' blocks), plus one
slice of the real Mooncake trace when ``shared/traces`` is present.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from inferplane.cli import app
from inferplane.config.loader import parse_config
from inferplane.fleet.state import EndpointView
from inferplane.placement import build
from inferplane.placement.framework import REGISTRY, CycleState, FilterResult, Plugin, register
from inferplane.twin.simulator.fleet import (
    CHARS_PER_TOKEN,
    Pending,
    TracePromptTokens,
    engine_block_hashes,
    padded_ids,
    placement_block_hashes,
)
from inferplane.twin.simulator.report import sovereignty_violations, weighted_percentile
from inferplane.twin.simulator.simulator import SimulationError, run_simulation, simulate
from inferplane.twin.traces.loader import TraceRequest
from tests.builders import endpoint, model, pool_fleet, to_yaml

REAL_TRACE = Path(__file__).resolve().parents[2] / "shared/traces/mooncake_conversation.jsonl"
KEY = "sha256:" + "ab" * 32
KEY2 = "sha256:" + "cd" * 32

CONTRACT = {
    "requests", "completed", "rejected", "ttft_s", "itl_s", "e2e_s", "slo_attainment",
    "prefix_hit_rate", "output_tokens_per_s", "cost_usd", "per_substrate", "spillovers",
    "sovereignty_violations", "profile", "fleet", "trace", "rate_scale", "seed", "wall_s",
    "per_class", "rejected_by",
}  # fmt: skip


def _endpoints(prefix: str, n: int, port: int, *, max_context: int = 131072) -> str:
    return "".join(
        f"      - {{name: {prefix}-{i}, url: 'http://127.0.0.1:{port + i}', "
        f"models: [{{name: llama-3.1-8b, max_context: {max_context}}}]}}\n"
        for i in range(n)
    )


def fleet_yaml(n: int = 4, *, extra: str = "", us: int = 0, provider: bool = False) -> str:
    """``n`` EU H100 endpoints (and ``us`` US ones, a provider API) and two tenants."""
    text = (
        "gateway: {scrape_interval_s: 0.1}\n"
        "regions: [{name: eu-west}, {name: us-east}]\n"
        "substrates:\n"
        "  - name: eu-h100\n    kind: gpu\n    hardware: h100\n    region: eu-west\n"
        "    jurisdiction: eu\n    cost: {hourly_usd: 3.5}\n    endpoints:\n"
        + _endpoints("eu", n, 9000)
    )
    if us:
        text += (
            "  - name: us-h100\n    kind: gpu\n    hardware: h100\n    region: us-east\n"
            "    jurisdiction: us\n    cost: {hourly_usd: 3.5}\n    endpoints:\n"
            + _endpoints("us", us, 9100)
        )
    if provider:
        text += (
            "  - name: api\n    kind: provider-api\n    hardware: provider-api\n"
            "    region: eu-west\n    jurisdiction: eu\n"
            "    cost: {input_per_mtok: 0.2, output_per_mtok: 0.6}\n    endpoints:\n"
            + _endpoints("api", 1, 9200)
        )
    text += (
        "tenants:\n"
        f"  - {{name: eu-only, api_keys: ['{KEY}'], allowed_jurisdictions: [eu],"
        " region: eu-west}\n"
        f"  - {{name: anyone, api_keys: ['{KEY2}'], default_class: batch}}\n"
    )
    return text + extra


def write(tmp: Path, name: str, text: str) -> Path:
    p = tmp / name
    p.write_text(text, "utf-8")
    return p


def conversation_trace(
    sessions: int = 30, turns: int = 4, gap_s: float = 0.25, seed: int = 1
) -> list[dict[str, Any]]:
    """Mooncake-like rows: each turn of a session re-sends its previous blocks plus new ones."""
    rng = random.Random(seed)
    rows: list[dict[str, Any]] = []
    next_id = 1
    for s in range(sessions):
        ids = [0]  # a shared system prompt block
        t = s * gap_s * 3
        for _ in range(turns):
            new = rng.randint(1, 3)
            ids = ids + list(range(next_id, next_id + new))
            next_id += new
            length = 512 * (len(ids) - 1) + rng.randint(1, 512)
            rows.append(
                {
                    "timestamp": int(t * 1000),
                    "input_length": length,
                    "output_length": rng.randint(20, 120),
                    "hash_ids": list(ids),
                }
            )
            t += rng.uniform(2.0, 6.0)
    rows.sort(key=lambda r: r["timestamp"])
    return rows


def trace_file(tmp: Path, rows: Sequence[dict[str, Any]] | None = None) -> Path:
    rows = conversation_trace() if rows is None else rows
    return write(tmp, "trace.jsonl", "".join(json.dumps(r) + "\n" for r in rows))


def run(tmp: Path, profile: str, fleet: str | None = None, **kw: Any) -> dict[str, Any]:
    fleet_path = write(tmp, "fleet.yaml", fleet if fleet is not None else fleet_yaml())
    trace = kw.pop("trace", None) or trace_file(tmp)
    return run_simulation(fleet_path, trace, profile, **kw)


# -- the contract -----------------------------------------------------------------------------
def test_cli_writes_the_json_contract(tmp_path: Path) -> None:
    fleet = write(tmp_path, "fleet.yaml", fleet_yaml())
    out = tmp_path / "out.json"
    res = CliRunner().invoke(
        app,
        ["simulate", "--fleet", str(fleet), "--trace", str(trace_file(tmp_path)),
         "--profile", "least-request", "--seed", "3", "--json", str(out)],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    assert "TTFT" in res.output
    r = json.loads(out.read_text())
    assert r.keys() >= CONTRACT
    assert r["requests"] == 120 and r["completed"] + r["rejected"] == 120
    assert r["profile"] == "least-request" and r["seed"] == 3 and r["rate_scale"] == 1.0
    assert set(r["ttft_s"]) >= {"p50", "p90", "p99"} and set(r["itl_s"]) >= {"p50", "p99"}
    assert 0 < r["ttft_s"]["p50"] <= r["ttft_s"]["p90"] <= r["ttft_s"]["p99"]
    assert 0 < r["itl_s"]["p50"] <= r["itl_s"]["p99"] < r["ttft_s"]["p99"]
    assert r["e2e_s"]["p50"] > r["ttft_s"]["p50"]
    assert 0 <= r["slo_attainment"] <= 1 and 0 < r["prefix_hit_rate"] < 1
    assert r["output_tokens_per_s"] > 0 and r["cost_usd"] > 0 and r["wall_s"] > 0
    assert sum(r["per_substrate"].values()) == r["completed"] == 120
    assert r["spillovers"] == 0 and r["sovereignty_violations"] == 0
    cls = r["per_class"]["interactive"]  # the first tenant's default class
    assert cls["requests"] == 120 and set(cls) >= {"requests", "ttft_s", "slo_attainment"}
    assert not list(tmp_path.glob(".out.json.*"))  # no temporary file left behind


def test_rejections_name_the_filter(tmp_path: Path) -> None:
    fleet = fleet_yaml(2).replace("max_context: 131072", "max_context: 2048")
    r = run(tmp_path, "round-robin", fleet)
    assert r["rejected"] > 0 and r["completed"] + r["rejected"] == r["requests"]
    # the gateway's answer to a prompt larger than every context: 400, not a placement 503
    assert r["rejected_by"] == {"context_length_exceeded": r["rejected"]}
    assert r["errors"] == {"context_length_exceeded": r["rejected"]}
    assert r["slo_attainment"] <= r["completed"] / r["requests"]


# -- placement through the real profiles ------------------------------------------------------
def test_round_robin_spreads_evenly(tmp_path: Path) -> None:
    r = run(tmp_path, "round-robin")
    counts = list(r["per_endpoint"].values())
    assert len(counts) == 4 and sum(counts) == 120 and max(counts) - min(counts) <= 1


def _cache_aware_profile(config_text: str) -> str:
    names = {p.name for p in parse_config(config_text).profiles}
    for name in ("sglang-cache-aware", "gie-default", "llmd-token-aware"):
        if name in names:
            return name
    return "least-request"


def test_cache_aware_profile_hits_the_prefix_cache_more(tmp_path: Path) -> None:
    rr = run(tmp_path, "round-robin")
    aware = run(tmp_path, _cache_aware_profile(fleet_yaml()))
    assert aware["prefix_hit_rate"] >= rr["prefix_hit_rate"] > 0


@pytest.mark.skipif(not REAL_TRACE.exists(), reason="shared Mooncake trace not present")
def test_cache_aware_on_a_real_mooncake_slice(tmp_path: Path) -> None:
    rr = run(tmp_path, "round-robin", trace=REAL_TRACE, limit=250)
    aware = run(tmp_path, _cache_aware_profile(fleet_yaml()), trace=REAL_TRACE, limit=250)
    assert rr["requests"] == aware["requests"] == 250
    assert aware["prefix_hit_rate"] >= rr["prefix_hit_rate"] > 0


def test_same_seed_same_report(tmp_path: Path) -> None:
    a = run(tmp_path, "random", seed=7)
    b = run(tmp_path, "random", seed=7)
    a.pop("wall_s"), b.pop("wall_s")
    assert json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)
    c = run(tmp_path, "random", seed=8)
    assert c["per_endpoint"] != a["per_endpoint"]


def test_rate_scale_compresses_time(tmp_path: Path) -> None:
    slow = run(tmp_path, "least-request")
    fast = run(tmp_path, "least-request", rate_scale=4.0)
    assert fast["rate_scale"] == 4.0 and fast["requests"] == slow["requests"]
    assert fast["sim_duration_s"] < 0.5 * slow["sim_duration_s"]
    assert fast["output_tokens_per_s"] > 2 * slow["output_tokens_per_s"]
    assert fast["ttft_s"]["p99"] >= slow["ttft_s"]["p99"]  # more load, never less waiting


def test_duration_and_limit_slice_the_trace(tmp_path: Path) -> None:
    assert run(tmp_path, "round-robin", limit=10)["requests"] == 10
    rows = conversation_trace()
    within = sum(1 for row in rows if row["timestamp"] < 5000)
    assert run(tmp_path, "round-robin", duration_s=5.0)["requests"] == within


# -- sovereignty --------------------------------------------------------------------------------
_NO_JURISDICTION = """
profiles:
  - name: careless
    plugins: [{ref: model-served}, {ref: context-window}, {ref: round-robin}]
mix:
  - {tenant: eu-only, class: interactive, fraction: 1}
"""
_WITH_JURISDICTION = """
profiles:
  - name: careful
    plugins: [{ref: model-served}, {ref: context-window}, {ref: jurisdiction}, {ref: round-robin}]
mix:
  - {tenant: eu-only, class: interactive, fraction: 1}
"""


def test_restricted_tenant_is_never_served_outside_its_jurisdiction(tmp_path: Path) -> None:
    r = run(tmp_path, "careful", fleet_yaml(2, us=2, extra=_WITH_JURISDICTION))
    assert r["completed"] == r["requests"] == 120
    assert r["sovereignty_violations"] == 0 and set(r["per_substrate"]) == {"eu-h100"}


def test_a_profile_without_the_jurisdiction_filter_cannot_leave_it(tmp_path: Path) -> None:
    """The jurisdiction filter is required (`placement.build.REQUIRED_FILTERS`): a profile that
    does not list it runs it anyway. (Before docs25 M1's fix, round-robin over 2 EU + 2 US
    endpoints served 60 of the 120 requests in the US.)"""
    r = run(tmp_path, "careless", fleet_yaml(2, us=2, extra=_NO_JURISDICTION))
    assert r["completed"] == r["requests"] == 120
    assert r["sovereignty_violations"] == 0 and set(r["per_substrate"]) == {"eu-h100"}


def test_the_simulator_counts_violations_it_served(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The ``sovereignty_violations`` counter is live end to end (simulate → served pairs →
    report): with no required filters, round-robin over 2 EU + 2 US endpoints serves 60 of the
    120 EU-only requests in the US, and the report counts all 60."""
    monkeypatch.setattr(build, "REQUIRED_FILTERS", ())
    r = run(tmp_path, "careless", fleet_yaml(2, us=2, extra=_NO_JURISDICTION))
    assert r["per_substrate"]["us-h100"] == 60
    assert r["sovereignty_violations"] == 60


def test_sovereignty_check_catches_a_violation() -> None:
    config = parse_config(fleet_yaml(1, us=1))
    served = [("eu-only", "eu-0"), ("eu-only", "us-0"), ("anyone", "us-0"), ("ghost", "us-0")]
    assert sovereignty_violations(config, served) == 1


# -- signals placement sees -----------------------------------------------------------------------
SEEN: list[EndpointView] = []
SEEN_AT: list[float] = []  # each seen view's snapshot time
if "test-sim-recorder" not in REGISTRY:

    @register("test-sim-recorder")
    class Recorder(Plugin):
        """Filter that keeps everything and records the views placement was shown."""

        def filter(self, cycle: CycleState, candidates: list[EndpointView]) -> FilterResult:
            SEEN.extend(candidates)
            SEEN_AT.extend(cycle.snapshot.now for _ in candidates)
            return FilterResult(list(candidates))


def test_placement_sees_fresh_scraped_and_exact_gateway_signals(tmp_path: Path) -> None:
    extra = """
plugins: [{type: test-sim-recorder}]
profiles:
  - name: recorded
    plugins: [{ref: model-served}, {ref: test-sim-recorder}, {ref: least-request, weight: 1}]
"""
    SEEN.clear()
    SEEN_AT.clear()
    r = run(tmp_path, "recorded", fleet_yaml(2, extra=extra), rate_scale=3.0)
    assert r["completed"] == 120 and len(SEEN) == 240
    ages = [v.state.metrics_age_at(t) for v, t in zip(SEEN, SEEN_AT, strict=True)]
    assert all(a is not None and 0 <= a < 0.1 + 1e-9 for a in ages)  # scraped every 0.1 s
    assert not any(v.state.stale for v in SEEN)
    assert any(a > 0 for a in ages if a is not None)  # not read live: a scrape can be old
    assert max(v.state.inflight for v in SEEN) > 1  # reservations are visible
    assert max(v.state.running or 0 for v in SEEN) > 0
    assert all(v.state.num_gpu_blocks and v.state.block_size == 16 for v in SEEN)
    assert any(v.state.ttft_p50_s is not None for v in SEEN)
    assert any((v.state.prefix_hits_total or 0) > 0 for v in SEEN)


def test_provider_api_ttft_includes_network_rtt() -> None:
    config = parse_config(fleet_yaml(1, provider=True))
    trace = [TraceRequest(i * 0.5, 300, 5) for i in range(10)]
    sim = simulate(config, trace, "round-robin")
    by_ep: dict[str | None, list[float]] = {}
    for rec in sim.records:
        assert rec.completed and rec.ttft_s is not None
        by_ep.setdefault(rec.endpoint, []).append(rec.ttft_s)
    assert len(by_ep["api-0"]) == len(by_ep["eu-0"]) == 5
    assert min(by_ep["api-0"]) > 0.2 > max(by_ep["eu-0"])  # the provider's 0.2 s RTT
    assert all(r.cost_usd > 0 for r in sim.records)


def test_mix_file_assigns_tenants_and_classes_by_fraction(tmp_path: Path) -> None:
    mix = write(
        tmp_path,
        "mix.yaml",
        "mix:\n"
        "  - {tenant: eu-only, class: interactive, fraction: 3}\n"
        "  - {tenant: anyone, class: batch, region: us-east, fraction: 1}\n",
    )
    r = run(tmp_path, "least-request", mix=mix)
    pc = r["per_class"]
    assert pc["interactive"]["requests"] + pc["batch"]["requests"] == 120
    assert 70 <= pc["interactive"]["requests"] <= 110
    assert pc["batch"]["slo_attainment"] == pc["batch"]["completed"] / pc["batch"]["requests"]


def test_azure_trace_has_no_prefix_sharing(tmp_path: Path) -> None:
    rows = ["TIMESTAMP,ContextTokens,GeneratedTokens"] + [
        f"2023-11-16 18:15:{10 + i // 4:02d}.{i % 4 * 25:02d}00000,{1500 + 37 * i},{30 + i}"
        for i in range(40)
    ]
    trace = write(tmp_path, "azure.csv", "\n".join(rows) + "\n")
    r = run(tmp_path, "round-robin", trace=trace)
    assert r["completed"] == 40 and r["prefix_hit_rate"] == 0.0


def test_simulate_api_rejects_unknown_profile() -> None:
    config = parse_config(fleet_yaml(1))
    with pytest.raises(SimulationError, match=r"unknown placement profile 'nope'.*round-robin"):
        simulate(config, [TraceRequest(0.0, 100, 10)], "nope")


# -- trace-derived tokens and hashes ------------------------------------------------------------
def test_engine_hashes_share_exactly_the_shared_blocks() -> None:
    a = engine_block_hashes([5, 6, 7], 1500, 16)
    b = engine_block_hashes([5, 6, 9], 1500, 16)
    c = engine_block_hashes([6, 6, 7], 1500, 16)
    assert len(a) == 1500 // 16
    shared = next(i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y)
    assert shared == 64  # two whole 512-token blocks of 16-token KV blocks
    assert a[0] != c[0] and len(set(a)) == len(a)
    assert engine_block_hashes([5, 6, 7], 1024, 16) == a[:64]


def test_prompt_tokens_follow_block_ids() -> None:
    toks = TracePromptTokens([3, 9], 600)
    assert len(toks) == 600 and toks[0] == 3 * 512 and toks[511] == 3 * 512 + 511
    assert toks[512] == 9 * 512 and toks[-1] == 9 * 512 + 87
    assert toks[510:514] == [3 * 512 + 510, 3 * 512 + 511, 9 * 512, 9 * 512 + 1]
    assert list(toks)[:3] == [1536, 1537, 1538]
    with pytest.raises(IndexError):
        toks[600]


def test_placement_hashes_have_the_text_hash_structure() -> None:
    a = placement_block_hashes(1, [1, 2, 3], 1400)
    b = placement_block_hashes(1, [1, 2, 4], 1400)
    # ~5.23 characters a word, 256-character blocks: ~48.9 tokens each
    assert len(a) == int((1400 * 5.234375 - 1) // 256)
    shared = next(i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y)
    assert shared == int(1024 / (256 / 5.234375))  # blocks lying wholly in the first 1024 tokens
    assert placement_block_hashes(2, [1, 2, 3], 1400)[0] != a[0]  # seeded by model
    assert len(placement_block_hashes(1, list(range(300)), 150_000)) == 512


def test_padding_ids_are_fresh() -> None:
    ids, nxt = padded_ids([4], 1500, 1 << 40)
    assert ids == [4, 1 << 40, (1 << 40) + 1] and nxt == (1 << 40) + 2


def test_weighted_percentile() -> None:
    assert weighted_percentile({0.01: 98, 0.5: 2}, 50) == 0.01
    assert weighted_percentile({0.01: 98, 0.5: 2}, 99) == 0.5
    assert weighted_percentile({}, 50) is None


# -- CLI errors ---------------------------------------------------------------------------------
def _cli(tmp: Path, *args: str) -> Any:
    return CliRunner().invoke(app, ["simulate", *args])


def test_cli_unknown_profile_lists_profiles(tmp_path: Path) -> None:
    fleet = write(tmp_path, "fleet.yaml", fleet_yaml(1))
    out = tmp_path / "out.json"
    res = _cli(tmp_path, "--fleet", str(fleet), "--trace", str(trace_file(tmp_path)),
               "--profile", "nope", "--json", str(out))  # fmt: skip
    assert res.exit_code == 2
    assert "unknown placement profile 'nope'" in res.output and "round-robin" in res.output
    assert not out.exists()


def test_cli_malformed_trace_names_file_and_line(tmp_path: Path) -> None:
    fleet = write(tmp_path, "fleet.yaml", fleet_yaml(1))
    good = json.dumps(conversation_trace()[0])
    bad = write(tmp_path, "bad.jsonl", f'{good}\n{good}\n{{"timestamp": 5, oops}}\n')
    out = tmp_path / "out.json"
    res = _cli(tmp_path, "--fleet", str(fleet), "--trace", str(bad), "--profile", "round-robin",
               "--json", str(out))  # fmt: skip
    assert res.exit_code == 2
    assert f"{bad}:3" in res.output and not out.exists()


def test_cli_bad_fleet_and_bad_mix(tmp_path: Path) -> None:
    fleet = write(tmp_path, "fleet.yaml", fleet_yaml(1).replace("hardware: h100", "hardware: x"))
    trace = trace_file(tmp_path)
    out = tmp_path / "out.json"
    res = _cli(tmp_path, "--fleet", str(fleet), "--trace", str(trace), "--profile", "round-robin",
               "--json", str(out))  # fmt: skip
    assert res.exit_code == 2 and "unknown hardware profile" in res.output
    good = write(tmp_path, "good.yaml", fleet_yaml(1))
    mix = write(
        tmp_path, "mix.yaml", "mix:\n  - {tenant: nobody, class: interactive, fraction: 1}\n"
    )
    res = _cli(tmp_path, "--fleet", str(good), "--trace", str(trace), "--profile", "round-robin",
               "--mix", str(mix), "--json", str(out))  # fmt: skip
    assert res.exit_code == 2 and "mix[0].tenant" in res.output and "nobody" in res.output
    assert not out.exists()
    # a mix file that is not UTF-8: its file and the line of the bad byte, no traceback
    latin = tmp_path / "latin1.yaml"
    latin.write_bytes("mix:\n  - {tenant: caf\xe9, class: interactive, fraction: 1}\n"
                      .encode("latin-1"))
    res = _cli(tmp_path, "--fleet", str(good), "--trace", str(trace), "--profile", "round-robin",
               "--mix", str(latin), "--json", str(out))  # fmt: skip
    assert res.exit_code == 2 and f"{latin}: line 2: not UTF-8 text" in res.output
    assert "Traceback" not in res.output and not out.exists()


def test_embedding_share_runs_one_step_and_bills_no_output() -> None:
    embed = (
        "  - name: l4\n    kind: gpu\n    hardware: l4\n    region: eu-west\n"
        "    jurisdiction: eu\n    cost: {input_per_mtok: 0.02, output_per_mtok: 0}\n"
        "    endpoints:\n      - {name: l4-0, url: 'http://127.0.0.1:9300',"
        " models: [{name: bge-large, max_context: 512, kind: embed}]}\n"
    )
    text = fleet_yaml(1).replace("tenants:\n", embed + "tenants:\n")
    text += "mix:\n  - {tenant: anyone, class: embeddings, model: bge-large, fraction: 1}\n"
    trace = [TraceRequest(i * 0.1, 200 + 100 * i, 50) for i in range(6)]
    sim = simulate(parse_config(text), trace, "least-request")
    done = [r for r in sim.records if r.completed]
    assert [r.endpoint for r in done] == ["l4-0"] * 4  # 600+ tokens do not fit 512
    assert all(r.completion_tokens == 0 and r.itl_s is None for r in done)
    rejected = [(r.status, r.rejected_by) for r in sim.records if not r.completed]
    assert rejected == [(400, ("context_length_exceeded",))] * 2


def test_request_larger_than_the_engine_kv_is_turned_away() -> None:
    text = fleet_yaml(1).replace(
        "max_context: 131072}]}", "max_context: 131072}], emulation: {num_gpu_blocks: 100}}"
    )
    trace = [TraceRequest(0.0, 1000, 10), TraceRequest(0.1, 3000, 10)]
    sim = simulate(parse_config(text), trace, "round-robin")
    assert sim.records[0].completed
    assert sim.records[1].rejected_by == ("engine: does not fit",)
    assert sim.live.live["eu-0"].inflight == 0  # its reservation was released


def test_declared_provider_rate_limit_is_capacity_on_the_virtual_clock() -> None:
    limited = fleet_yaml(1, provider=True).replace(
        "url: 'http://127.0.0.1:9200', ",
        "url: 'http://127.0.0.1:9200/v1', limits: {requests_per_min: 5}, "
        "emulation: {network_rtt_ms: 50}, ",
    )
    extra = (
        "profiles:\n  - {name: rr-limited, plugins: "
        "[{ref: model-served}, {ref: rate-limit}, {ref: round-robin}]}\n"
    )
    config = parse_config(limited + extra)
    trace = [TraceRequest(i * 0.5, 300, 5) for i in range(20)]  # 20 requests in 10 s
    sim = simulate(config, trace, "rr-limited")
    served = [r.endpoint for r in sim.records]
    assert served.count("api-0") == 5 and served.count("eu-0") == 15
    api = [r for r in sim.records if r.endpoint == "api-0"]
    # virtual time: the 50 ms RTT of the emulation setting, not the profile's 200 ms
    assert all(r.completed and r.ttft_s is not None and 0.05 <= r.ttft_s < 0.2 for r in api)


def test_derived_kv_blocks_are_capped_as_in_the_emulator() -> None:
    """A tiny model on the ``cpu`` profile derives millions of KV blocks from host memory; the
    engine model allocates them up front (a simulation once took ~23 GB and was killed). The
    simulator caps them at the emulator's bound; a set ``num_gpu_blocks`` is kept."""
    from inferplane.fleet.model import Fleet
    from inferplane.twin.engine.model import MAX_DERIVED_BLOCKS
    from inferplane.twin.simulator.fleet import engine_config_for

    tiny = [model("t", "tiny-llama", 2048)]
    text = to_yaml(pool_fleet(
        substrate={"name": "host", "hardware": "cpu", "region": "r", "cost": {"hourly_usd": 1}},
        endpoints=[endpoint("c0", 9300, models=tiny),
                   endpoint("c1", 9301, models=tiny, emulation={"num_gpu_blocks": 1024})]))
    fleet = Fleet.from_config(parse_config(text))
    derived = {}
    for ep in fleet.endpoints:
        roofline = ep.roofline("t")
        assert roofline is not None
        derived[ep.name] = (roofline.kv_blocks(16, 0.9), engine_config_for(ep, roofline))
    assert derived["c0"][0] > MAX_DERIVED_BLOCKS  # what the cap is for
    assert derived["c0"][1].num_gpu_blocks == MAX_DERIVED_BLOCKS
    assert derived["c1"][1].num_gpu_blocks == 1024


@pytest.mark.parametrize("block_size", [1, 16, 48, 512, 1000])
def test_trace_hashes_and_tokens_match_their_per_element_formulas(block_size: int) -> None:
    """The run-at-a-time forms give exactly the per-element values (results stay identical)."""
    rng = random.Random(block_size)
    for _ in range(20):
        ids = [rng.randrange(1 << 41) for _ in range(rng.randint(1, 12))]
        length = rng.randint(1, len(ids) * 512)
        n = length // block_size
        chain, prev = [], 0x5EED
        for i in ids:
            prev = hash((prev, i))
            chain.append(prev)
        want = [hash((chain[((m + 1) * block_size - 1) // 512], m)) & ((1 << 64) - 1)
                for m in range(n)]
        assert engine_block_hashes(ids, length, block_size) == want
        toks = TracePromptTokens(ids, length)
        a, b = sorted(rng.randrange(length + 1) for _ in range(2))
        assert toks[a:b] == [ids[i // 512] * 512 + i % 512 for i in range(a, b)]
        assert toks[a:b:3] == [ids[i // 512] * 512 + i % 512 for i in range(a, b, 3)]


@pytest.mark.parametrize("block_chars", [64, 256, 1024, 9000])
def test_placement_hashes_match_their_per_element_formula(block_chars: int) -> None:
    rng = random.Random(block_chars)
    per = block_chars / CHARS_PER_TOKEN
    for _ in range(30):
        ids = [rng.randrange(1 << 41) for _ in range(rng.randint(1, 40))]
        tokens = rng.randint(1, len(ids) * 512)
        got = placement_block_hashes(7, ids, tokens, block_chars, max_blocks=64)
        n = min(int((tokens * CHARS_PER_TOKEN - 1) // block_chars), 64)
        chain, prev = [], 7
        for i in ids:
            prev = hash((prev, i))
            chain.append(prev)
        ends = [math.ceil((k + 1) * per) - 1 for k in range(64)]
        want = tuple(hash((chain[min(ends[k], tokens - 1) // 512], k)) & ((1 << 64) - 1)
                     for k in range(max(n, 0)))
        assert got == want


@pytest.mark.parametrize("seed", range(20))
def test_pending_dispatches_behave_as_a_plain_heap(seed: int) -> None:
    """`Pending` (lazy removal) against the list heap with ``remove`` + ``heapify`` it
    replaced: the same earliest time, emptiness and removal answers after every operation,
    with repeated values and removals of values that are not (or no longer) there."""
    import heapq

    rng = random.Random(seed)
    got, want = Pending(), list[float]()
    for _ in range(400):
        op = rng.random()
        t = float(rng.randint(0, 30))  # few values: many equal ones
        if op < 0.45:
            got.push(t)
            heapq.heappush(want, t)
        elif op < 0.75:
            present = t in want
            if present:
                want.remove(t)
                heapq.heapify(want)
            assert got.remove(t) == present
        elif op < 0.97:
            assert bool(got) == bool(want)
            if want:
                assert got.pop() == heapq.heappop(want)
        else:
            got.clear()
            want.clear()
        assert bool(got) == bool(want)
        assert got.first() == (want[0] if want else math.inf)
