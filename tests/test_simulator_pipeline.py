"""The simulator runs the gateway's pipeline: admission (priority bands, shedding, fair share),
the batch lane, scheduled endpoint failures and re-placement, on a virtual clock.

Small fleets of H100 endpoints and synthetic traces (no prefix sharing), so every test replays
in well under a second of CPU; results are deterministic (virtual time, seeded).
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from inferplane.cli import app
from inferplane.config.schema import FleetConfig
from inferplane.errors import ConfigError
from inferplane.twin.simulator.faults import load_faults, validate_faults
from inferplane.twin.simulator.mix import TrafficShare, load_mix, resolve_mix
from inferplane.twin.simulator.records import RequestRecord
from inferplane.twin.simulator.report import percentile
from inferplane.twin.simulator.simulator import Simulator, simulate
from inferplane.twin.simulator.vloop import VirtualLoopStuck, VirtualTimeLoop
from inferplane.twin.traces.loader import TraceRequest
from tests.support.sim_fleet import VICTIM_AND_FLOODER, fleet, trace


def run(config: FleetConfig, reqs: list[TraceRequest], *, profile: str = "least-request",
        **kw: Any) -> Simulator:
    return simulate(config, reqs, profile, seed=1, **kw)


def of(sim: Simulator, cls: str) -> list[RequestRecord]:
    return [r for r in sim.records if r.share.workload_class.name == cls]


def p(values: list[float], q: float) -> float:
    out = percentile(sorted(values), q)
    assert out is not None
    return out


MIX3 = [
    {"tenant": "demo", "class": "interactive", "fraction": 0.4},
    {"tenant": "demo", "class": "best-effort", "fraction": 0.3},
    {"tenant": "demo", "class": "batch", "fraction": 0.3},
]


# -- the virtual loop ---------------------------------------------------------------------------
def test_virtual_loop_jumps_to_timers_and_reports_a_stuck_simulation() -> None:
    loop = VirtualTimeLoop()
    seen: list[float] = []

    async def main() -> float:
        await asyncio.sleep(3600.0)
        seen.append(loop.time())
        await asyncio.wait_for(asyncio.sleep(10.0), 20.0)
        return loop.time()

    assert loop.run(main()) == 3610.0 and seen == [3600.0]
    stuck = VirtualTimeLoop()

    async def forever() -> None:
        await stuck.create_future()

    with pytest.raises(VirtualLoopStuck):
        stuck.run(forever())


# -- admission past the knee ----------------------------------------------------------------------
def test_past_the_knee_batch_is_deferred_and_sheddable_traffic_gets_429s() -> None:
    config = fleet(mix=MIX3, max_concurrency=32, max_waiting=32)
    reqs = trace(300, 0.05, prompt=4000, out=150)  # ~1.5x what two H100s serve
    on = run(config, reqs)
    off = run(config, reqs, admission=False)
    assert on.admission.enabled and not off.admission.enabled
    shed = [r for r in on.records if r.shed]
    assert shed and all(r.status == 429 and r.error_code == "load_shed" for r in shed)
    assert {r.share.workload_class.name for r in shed} <= {"best-effort", "batch"}
    batch = of(on, "batch")
    assert any(r.deferred for r in batch)
    assert all(r.completed for r in batch if r.deferred and not r.shed)
    # the baselines neither shed nor defer
    assert not any(r.shed or r.deferred for r in off.records)
    assert all(r.completed for r in off.records)
    # interactive keeps its latency: far lower than without admission, and no interactive 429
    ttft_on = [r.ttft_s for r in of(on, "interactive") if r.ttft_s is not None]
    ttft_off = [r.ttft_s for r in of(off, "interactive") if r.ttft_s is not None]
    assert not any(r.shed for r in of(on, "interactive"))
    assert p(ttft_on, 90) < 0.5 * p(ttft_off, 90)
    assert max(r.queued_s for r in on.records) > 0  # the fleet was saturated: requests queued


def test_report_has_per_class_goodput_percentiles_and_counts(tmp_path: Path) -> None:
    from inferplane.twin.simulator.report import build_report

    sim = run(fleet(mix=MIX3, max_concurrency=32, max_waiting=32),
              trace(300, 0.05, prompt=4000, out=150))
    r = build_report(sim.records, config=sim.config, end_s=sim.totals.end_s,
                     itl_gaps=sim.totals.itl_gaps, profile="least-request", fleet="f",
                     trace="t", rate_scale=1.0, seed=1, wall_s=0.1, admission=True)
    assert r["completed"] + r["rejected"] + r["failed"] + r["unfinished"] == r["requests"]
    assert r["unfinished"] == 0 and r["shed"] > 0 and r["deferred"] > 0
    pc = r["per_class"]
    for name in ("interactive", "best-effort", "batch"):
        c = pc[name]
        assert set(c) >= {"goodput_rps", "shed", "deferred", "failed", "ttft_s"}
        assert set(c["ttft_s"]) == {"p50", "p90", "p99"}
    good = sum(1 for x in of(sim, "interactive") if x.meets_slo())
    assert pc["interactive"]["goodput_rps"] == pytest.approx(good / r["offered_s"])
    assert r["offered_s"] == pytest.approx(sim.records[-1].arrival_s - sim.records[0].arrival_s)
    assert pc["best-effort"]["shed"] == sum(1 for x in of(sim, "best-effort") if x.shed)
    assert r["errors"].get("load_shed") == r["shed"]


def test_same_seed_same_pipeline_run() -> None:
    config = fleet(mix=MIX3)
    a = run(config, trace(120, 0.05))
    b = run(config, trace(120, 0.05))
    assert [(r.endpoint, r.ttft_s, r.status) for r in a.records] == [
        (r.endpoint, r.ttft_s, r.status) for r in b.records
    ]


# -- fairness ------------------------------------------------------------------------------
def _fair(flood: int, *, admission: bool = True, strict: bool = True) -> list[RequestRecord]:
    """Two tenants on two H100s (6 slots each); the victim sends one 2,000-token request every
    0.2 s, the flooder the same (1x) or ten times as many (10x). The victim's records."""
    from inferplane.config.schema import MixEntry

    config = fleet(n=2, max_concurrency=6, max_waiting=64, tenants=VICTIM_AND_FLOODER)
    if strict:
        q = config.admission.queue.model_copy(update={"keep_unused_shares": True})
        config = config.model_copy(
            update={"admission": config.admission.model_copy(update={"queue": q})}
        )
    victim, flooder = resolve_mix(config, [
        MixEntry.model_validate({"tenant": t, "class": "interactive", "fraction": 0.5})
        for t in ("victim", "flooder")
    ])
    reqs: list[TraceRequest] = []
    who: list[TrafficShare] = []
    for i in range(100):
        reqs.append(TraceRequest(i * 0.2, 2000, 100))
        who.append(victim)
        for k in range(flood):
            reqs.append(TraceRequest(i * 0.2 + 0.1 + k * 0.2 / flood, 2000, 100))
            who.append(flooder)
    order = sorted(range(len(reqs)), key=lambda j: reqs[j].arrival_s)
    sim = run(config, [reqs[j] for j in order], admission=admission,
              assign=[who[j] for j in order])
    return [r for r in sim.records if r.share.tenant == "victim"]


def _p99(recs: list[RequestRecord]) -> float:
    return p([r.ttft_s for r in recs if r.ttft_s is not None], 99)


def test_a_tenant_flooding_at_10x_cannot_crowd_out_another_tenant() -> None:
    calm, flooded = _fair(1), _fair(10)
    # the victim loses nothing: every request served, none shed, none waiting long for a slot
    assert all(r.completed for r in calm + flooded)
    assert max(r.queued_s for r in flooded) < 0.5
    unprotected = _fair(10, admission=False)
    assert _p99(unprotected) > 100 * _p99(calm)  # without admission the flood takes the fleet
    # Without the dispatch gate (this test) and the victim at its whole share of slots, the
    # victim's P99 TTFT stays within 3x of calm: 0.071 s calm, 0.155 s flooded (0.61 s with the
    # reserve alone), 21.7 s flooded without admission. The +20 % target is met with the gate
    # and the victim within its share (the test above).
    assert _p99(flooded) < 3 * _p99(calm)
    assert _p99(flooded) < 0.02 * _p99(unprotected)


def _flood(flood_rps: float, *, gate: float | None, strict: bool = False) -> list[RequestRecord]:
    """Two tenants on two H100s (6 slots each, about 10 req/s of this workload): the victim
    sends a 2,000-token request every 0.4 s (half its fair share), the flooder ``flood_rps``
    (50: ten times its share). ``gate``: ``admission.queue.max_prefill_queue_s``."""
    from inferplane.config.schema import MixEntry

    config = fleet(n=2, max_concurrency=6, max_waiting=64, tenants=VICTIM_AND_FLOODER)
    q = config.admission.queue.model_copy(
        update={"max_prefill_queue_s": gate, "keep_unused_shares": strict}
    )
    config = config.model_copy(
        update={"admission": config.admission.model_copy(update={"queue": q})}
    )
    victim, flooder = resolve_mix(config, [
        MixEntry.model_validate({"tenant": t, "class": "interactive", "fraction": 0.5})
        for t in ("victim", "flooder")
    ])
    arrivals = [(i * 0.4, victim) for i in range(25)]
    if flood_rps:
        every = 1.0 / flood_rps
        arrivals += [(k * every + every / 3, flooder) for k in range(int(10 * flood_rps))]
    arrivals.sort(key=lambda a: a[0])
    sim = run(config, [TraceRequest(t, 2000, 100) for t, _ in arrivals], profile="default",
              assign=[s for _, s in arrivals])
    return [r for r in sim.records if r.share.tenant == "victim"]


@pytest.mark.parametrize("strict", [False, True], ids=["reserve", "strict"])
def test_a_flood_at_10x_its_share_moves_the_other_tenants_p99_by_at_most_20_percent(
    strict: bool,
) -> None:
    """Issue 13's fairness target, deterministic: with the dispatch gate the flood waits in the
    gateway's fair queue, not in the engines' FIFO ahead of the victim's prompts."""
    alone = _p99(_flood(0, gate=0.0, strict=strict))
    flooded = _flood(50, gate=0.0, strict=strict)
    assert all(r.completed and r.queued_s == 0.0 for r in flooded)
    assert _p99(flooded) <= 1.2 * alone
    # without the gate (the queue before it) the same flood moves it far more: measured +94 %
    # with the reserve alone, +34 % with strict shares (the victim's prefill queued behind or
    # batched with the flooder's inside the engine)
    before = _p99(_flood(50, gate=None, strict=strict))
    assert before > 1.2 * _p99(_flood(0, gate=None, strict=strict))


def test_strict_shares_keep_the_victims_slots_free() -> None:
    loose, strict = _fair(10, strict=False), _fair(10, strict=True)
    assert max(r.queued_s for r in strict) < max(r.queued_s for r in loose)
    assert _p99(strict) < _p99(loose)


# -- faults and re-placement -----------------------------------------------------------------
def test_an_endpoint_down_is_replaced_around_and_comes_back() -> None:
    config = fleet(n=3, max_concurrency=16)
    # its lost streams eject it (consecutive failures); the ejection ends before the trace does
    outlier = config.health.outlier.model_copy(update={"base_ejection_s": 3.0})
    config = config.model_copy(
        update={"health": config.health.model_copy(update={"outlier": outlier})}
    )
    faults = validate_faults(
        [{"at": 2.0, "endpoint": "h-1", "event": "down"},
         {"at": 8.0, "endpoint": "h-1", "event": "up"}],
        ["h-0", "h-1", "h-2"],
    )
    sim = run(config, trace(150, 0.1, prompt=1000, out=50), profile="round-robin",
              faults=faults)
    recs = sim.records
    lost = [r for r in recs if r.failed]
    assert lost and all(r.status == 502 and r.endpoint == "h-1" for r in lost)
    retried = [r for r in recs if r.attempts == 2 and r.completed]
    assert retried and all(r.endpoint != "h-1" for r in retried)
    during = [r for r in recs if 3.2 <= r.arrival_s < 8.0 and r.completed]
    assert during and all(r.endpoint != "h-1" for r in during)  # marked unhealthy by a probe
    after = [r for r in recs if r.arrival_s >= 9.5 and r.endpoint == "h-1" and r.completed]
    assert after  # back in service
    assert sum(r.completed for r in recs) + len(lost) == len(recs)


def _marked_down_at(monkeypatch: pytest.MonkeyPatch, window: float, late: list[float],
                    scrape_s: float) -> list[float]:
    """h-1 of two goes down at 2.05 s, right after answering requests every 0.1 s (round
    robin) from 0 to 1.9 s, none in flight; then requests arrive at the times ``late`` and at
    6 s (the simulation runs until then). The engines are scraped every ``scrape_s`` from the
    first arrival (10: not again before 10 s). The virtual times at which h-1 is marked
    down."""
    from inferplane.fleet.live import LiveFleet

    downs: list[float] = []
    set_health = LiveFleet.set_health

    def spy(self: LiveFleet, name: str, healthy: bool) -> None:
        if name == "h-1" and not healthy:
            downs.append(self.clock())
        set_health(self, name, healthy)

    monkeypatch.setattr(LiveFleet, "set_health", spy)
    config = fleet(n=2, max_concurrency=16,
                   gateway={"health_skip_window_s": window, "scrape_interval_s": scrape_s})
    faults = validate_faults([{"at": 2.05, "endpoint": "h-1", "event": "down"}], ["h-0", "h-1"])
    reqs = trace(20, 0.1, prompt=100, out=2) + [TraceRequest(t, 100, 2) for t in [*late, 6.0]]
    sim = run(config, reqs, profile="round-robin", faults=faults)
    assert all(r.completed for r in sim.records)
    last_ok = max(r.arrival_s + (r.e2e_s or 0.0) for r in sim.records[:20]
                  if r.endpoint == "h-1")
    # at 2.0 at the latest: a later answer would be in the window of the turn at 3 s (1-s
    # window) or 5 s (3-s window) and skip it too
    assert 1.9 < last_ok <= 2.0
    refused = [r for r in sim.records if r.attempts == 2]
    assert len(refused) == (1 if late else 0)
    return downs


@pytest.mark.parametrize(("window", "late", "scrape_s", "down_at"), [
    # the next probe turn (3 s) after the fault, with a window of one turn (as before)
    (1.0, [], 10.0, 3.0),
    # a 3-s window: the answers before 2.05 s skip the turns at 3 and 4 s (no request after,
    # no scrape)
    (3.0, [], 10.0, 5.0),
    # a request refused there (2.5 or 2.6 s, one is round robin's pick; re-placed) forces the
    # probe
    (3.0, [2.5, 2.6], 10.0, 3.0),
    # so does a failed scrape (the next one after the fault, at 2.1 s)
    (3.0, [], 0.1, 3.0),
])
def test_the_probe_of_an_endpoint_gone_down_is_skipped_as_the_gateway_skips_it(
    monkeypatch: pytest.MonkeyPatch, window: float, late: list[float], scrape_s: float,
    down_at: float,
) -> None:
    """The simulator marks an endpoint gone down at the probe turn the gateway's scraper
    would probe it (``gateway.health_skip_while_serving``, ``health_skip_window_s``)."""
    downs = _marked_down_at(monkeypatch, window, late, scrape_s)
    assert downs[:1] == [pytest.approx(down_at)]


def test_a_hung_endpoint_costs_the_first_byte_timeout_then_the_request_moves() -> None:
    config = fleet(n=2, max_concurrency=16, gateway={"upstream_timeout_s": 3})
    faults = validate_faults([{"at": 1.0, "endpoint": "h-0", "event": "hung", "for_s": 5}],
                             ["h-0", "h-1"])
    sim = run(config, trace(40, 0.25, prompt=1000, out=20), profile="round-robin", faults=faults)
    moved = [r for r in sim.records if r.attempts == 2 and r.completed]
    assert moved and all(r.endpoint == "h-1" for r in moved)
    assert all(r.ttft_s is not None and r.ttft_s >= 3.0 for r in moved)
    assert all(r.completed or r.failed for r in sim.records)


def test_provider_429s_are_replaced_and_fail_when_nowhere_is_left() -> None:
    config = fleet(n=2, max_concurrency=16)
    faults = validate_faults([{"at": 0, "endpoint": "h-0", "event": 429}], ["h-0", "h-1"])
    sim = run(config, trace(20, 0.3, prompt=500, out=20), profile="round-robin", faults=faults)
    assert all(r.completed and r.endpoint == "h-1" for r in sim.records)
    assert any(r.attempts == 2 for r in sim.records)
    both = validate_faults([{"at": 0, "endpoint": e, "event": "429"} for e in ("h-0", "h-1")],
                           ["h-0", "h-1"])
    sim = run(config, trace(5, 0.3, prompt=500, out=20), profile="round-robin", faults=both)
    first = sim.records[0]
    # the last attempt was a 429: the client is told to come back (audit28 finding 6)
    assert first.failed and first.status == 429 and first.attempts == 2
    assert first.error_code == "upstream_rate_limited"
    # a 429 also ejects its endpoint for the Retry-After: later requests fail the same way or
    # find every endpoint out after its 429 (the same 429, not a 503)
    assert all(r.status == 429 and r.error_code == "upstream_rate_limited"
               and (r.failed or r.rejected_by == ("health",)) for r in sim.records)
    assert not any(r.completed or r.shed for r in sim.records)


def test_fault_files_are_checked_before_anything_runs(tmp_path: Path) -> None:
    good = tmp_path / "f.yaml"
    good.write_text("faults:\n  - {at: 5, endpoint: h-0, event: down, for_s: 3}\n")
    evs = load_faults(good, ["h-0"])
    assert [(e.at, e.event) for e in evs] == [(5.0, "down"), (8.0, "up")]
    js = tmp_path / "f.json"
    js.write_text('[{"at": 1, "endpoint": "h-0", "event": "429", "retry_after_s": 2}]')
    assert load_faults(js, ["h-0"])[0].retry_after_s == 2.0
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "- {at: -1, endpoint: h-0, event: down}\n"
        "- {at: 1, endpoint: nope, event: down}\n"
        "- {at: 1, endpoint: h-0, event: melt}\n"
        "- {at: 1, endpoint: h-0, event: up, for_s: 2}\n"
    )
    with pytest.raises(ConfigError) as exc:
        load_faults(bad, ["h-0"])
    msg = str(exc.value)
    assert str(bad) in msg
    for where in ("faults[0].at", "faults[1].endpoint", "faults[2].event", "faults[3].for_s"):
        assert where in msg
    (tmp_path / "x.yaml").write_text("faults: {at: 1}\n")
    with pytest.raises(ConfigError, match="expected a list"):
        load_faults(tmp_path / "x.yaml", ["h-0"])


def test_a_key_repeated_in_a_fault_or_mix_file_is_refused_naming_file_and_line(
    tmp_path: Path,
) -> None:
    """As in the fleet file: YAML would keep the second value silently (here a 3-s outage
    would become a 30-s one, a class's share another's)."""
    faults = tmp_path / "faults.yaml"
    faults.write_text("faults:\n  - {at: 5, endpoint: h-0, event: down, for_s: 3, for_s: 30}\n")
    with pytest.raises(ConfigError) as exc:
        load_faults(faults, ["h-0"])
    assert str(exc.value) == f"{faults}: line 2, column 51: invalid YAML: duplicate key 'for_s'"
    mix = tmp_path / "mix.yaml"
    mix.write_text("mix:\n  - class: interactive\n    fraction: 0.5\n    fraction: 0.9\n")
    with pytest.raises(ConfigError) as exc:
        load_mix(mix)
    assert str(exc.value) == f"{mix}: line 4, column 5: invalid YAML: duplicate key 'fraction'"


def test_a_key_repeated_in_a_json_fault_file_is_refused(tmp_path: Path) -> None:
    """JSON keeps the last value of a repeated key too (``json.loads``): refused as in YAML, in
    an entry or around the list; a syntax error names its line and column."""
    faults = tmp_path / "faults.json"
    faults.write_text('[{"at": 5, "endpoint": "h-0", "event": "down", "for_s": 3, "for_s": 30}]')
    with pytest.raises(ConfigError) as exc:
        load_faults(faults, ["h-0"])
    assert str(exc.value) == f'{faults}: invalid JSON: duplicate key "for_s"'
    faults.write_text('{"faults": [], "faults": [{"at": 1, "endpoint": "h-0", "event": "up"}]}')
    with pytest.raises(ConfigError, match='duplicate key "faults"'):
        load_faults(faults, ["h-0"])
    faults.write_text('[{"at": 1, "endpoint": "h-0", "event": "up"},\n oops]')
    with pytest.raises(ConfigError) as exc:
        load_faults(faults, ["h-0"])
    assert str(exc.value) == f"{faults}: line 2, column 2: invalid JSON: Expecting value"
    faults.write_text('[{"at": 1, "endpoint": "h-0", "event": "down"},'
                      ' {"at": 2, "endpoint": "h-0", "event": "up"}]')
    assert len(load_faults(faults, ["h-0"])) == 2  # the same keys in two objects: no repeat


def test_every_problem_with_a_json_fault_file_is_a_config_error(tmp_path: Path) -> None:
    """Not only syntax: an integer past the interpreter's digit limit (a plain ValueError from
    ``json``) and nesting past the recursion limit (RecursionError) name the file too."""
    faults = tmp_path / "faults.json"
    faults.write_text('[{"at": ' + "1" * 5000 + ', "endpoint": "h-0", "event": "up"}]')
    with pytest.raises(ConfigError) as exc:
        load_faults(faults, ["h-0"])
    assert str(exc.value).startswith(f"{faults}: invalid JSON: Exceeds the limit"), exc.value
    for deep in ("[" * 100_000, '{"faults": ' * 100_000):
        faults.write_text(deep)
        with pytest.raises(ConfigError) as exc:
            load_faults(faults, ["h-0"])
        assert str(exc.value) == f"{faults}: invalid JSON: nested too deeply"


def test_cli_runs_faults_and_admission_switch(tmp_path: Path) -> None:
    fleet_file = tmp_path / "fleet.yaml"
    fleet_file.write_text(
        "gateway: {scrape_interval_s: 0.1}\nregions: [{name: eu-west}]\n"
        "admission: {store: memory}\n"
        "substrates:\n  - name: eu\n    kind: gpu\n    hardware: h100\n    region: eu-west\n"
        "    jurisdiction: eu\n    cost: {hourly_usd: 3.5}\n    endpoints:\n"
        "      - {name: h-0, url: 'http://127.0.0.1:9400', models: [{name: llama-3.1-8b,"
        " max_context: 32768}]}\n"
        "      - {name: h-1, url: 'http://127.0.0.1:9401', models: [{name: llama-3.1-8b,"
        " max_context: 32768}]}\n"
    )
    tr = tmp_path / "t.jsonl"
    tr.write_text("".join(
        f'{{"timestamp": {i * 200}, "input_length": 800, "output_length": 30, "hash_ids": []}}\n'
        for i in range(30)
    ))
    faults = tmp_path / "faults.yaml"
    faults.write_text("- {at: 1, endpoint: h-0, event: down}\n")
    out = tmp_path / "r.json"
    res = CliRunner().invoke(app, [
        "simulate", "--fleet", str(fleet_file), "--trace", str(tr), "--profile", "round-robin",
        "--json", str(out), "--faults", str(faults), "--no-admission",
    ])
    assert res.exit_code == 0, res.output
    import json

    r = json.loads(out.read_text())
    assert r["faults"] == 1 and r["admission"] is False
    assert r["completed"] + r["failed"] == 30 and "per class" in res.output
    faults.write_text("- {at: 1, endpoint: h-9, event: down}\n")
    res = CliRunner().invoke(app, [
        "simulate", "--fleet", str(fleet_file), "--trace", str(tr), "--profile", "round-robin",
        "--json", str(out), "--faults", str(faults),
    ])
    assert res.exit_code != 0 and "faults[0].endpoint" in res.output
    assert "Traceback" not in res.output
    dup = tmp_path / "faults.json"
    dup.write_text('[{"at": 1, "endpoint": "h-0", "event": "down", "for_s": 3, "for_s": 30}]')
    res = CliRunner().invoke(app, [
        "simulate", "--fleet", str(fleet_file), "--trace", str(tr), "--profile", "round-robin",
        "--json", str(out), "--faults", str(dup),
    ])
    assert res.exit_code == 2
    assert res.output.splitlines() == [
        "error: invalid configuration", f'{dup}: invalid JSON: duplicate key "for_s"'
    ]
