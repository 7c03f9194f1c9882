"""Placement economics: the formulas on records built by hand, then `inferplane economics` on a
real SQLite ledger written by the ledger's own code, the gauges, and the what-if."""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from typer.testing import CliRunner

from inferplane.cli import app
from inferplane.config.loader import parse_config
from inferplane.economics.analysis import analyse
from inferplane.economics.render import EconomicsCollector, from_ledger, lines, refresher_for
from inferplane.economics.whatif import compare
from inferplane.errors import ConfigError
from inferplane.fleet.live import LiveFleet
from inferplane.fleet.model import Fleet
from inferplane.ledger.record import Outcome
from inferplane.ledger.sqlite import SqliteLedger
from inferplane.ledger.tools import Source
from inferplane.placement.build import build_policies
from inferplane.placement.framework import place
from inferplane.placement.profile import RequestProfile

DAY = 86400.0
T0 = 1_767_225_600.0  # 2026-01-01 00:00 UTC

FLEET = """
gateway: {{ledger_path: {ledger}}}
economics: {{band_low: 0.4, band_high: 0.7, target_utilisation: 0.5, out_of_band_days: 2,
            divergence_days: 3}}
substrates:
  - name: gpu
    kind: gpu
    hardware: h100
    region: eu-west
    jurisdiction: eu
    cost: {{hourly_usd: 2.0}}
    endpoints:
      - {{name: gpu-0, url: "http://127.0.0.1:9001", max_concurrency: 4,
         models: [{{name: llama-3.1-8b, max_context: 32768}}]}}
      - {{name: gpu-1, url: "http://127.0.0.1:9002", max_concurrency: 4,
         models: [{{name: llama-3.1-8b, max_context: 32768}}]}}
  - name: api
    kind: provider-api
    hardware: provider-api
    region: eu-west
    jurisdiction: eu
    cost: {{input_per_mtok: 1.0, output_per_mtok: 4.0}}
    endpoints:
      - {{name: api-0, url: "http://127.0.0.1:9003",
         models: [{{name: llama-3.1-8b, max_context: 32768}}]}}
"""


def _config(ledger: str = "ledger.db") -> Any:
    return parse_config(FLEET.format(ledger=ledger), "fleet.yaml")


def _record(substrate: str, *, tokens: int = 1000, cost: float = 0.0, e2e: float = 1.0,
            ttft: float = 0.1, status: int = 200, cls: str = "interactive",
            spill: str | None = None) -> dict[str, Any]:
    return {
        "request": {"model": "llama-3.1-8b", "workload_class": cls, "prompt_tokens": tokens},
        "picked": {"substrate": substrate},
        "spillover": {"kind": spill, "reason": f"why: {spill}"} if spill else None,
        "outcome": {"status": status, "prompt_tokens": tokens - 100, "completion_tokens": 100,
                    "cost_usd": cost, "e2e_s": e2e, "ttft_s": ttft},
    }


def test_utilisation_unit_cost_and_out_of_band() -> None:
    cfg = _config()
    # two days; the GPU pool (8 slots) is busy 8 * 3600 request-seconds a day: 1/24 of it
    recs = [(T0 + d * DAY + i, _record("gpu", e2e=3600.0, cost=0.25)) for d in (0, 1)
            for i in range(8)]
    recs += [(T0 + 10, _record("gpu", status=502)), (T0 + 11, _record("gpu", status=0)),
             (T0 - 5, _record("gpu", e2e=1e6)), (T0 + 2 * DAY, _record("gpu", e2e=1e6))]
    r = analyse(recs, cfg, since=T0, until=T0 + 2 * DAY)
    gpu = next(p for p in r.pools if p.name == "gpu")
    assert r.requests == 16 and gpu.requests == 16  # failed and out-of-window records ignored
    assert gpu.utilisation == pytest.approx(1 / 24)
    assert gpu.daily_utilisation == {"2026-01-01": pytest.approx(1 / 24),
                                     "2026-01-02": pytest.approx(1 / 24)}
    assert gpu.band == "below" and gpu.days_out_of_band == 2
    # owned: 2 endpoints x 2 USD/h x 48 h, whether busy or not; attributed: what records carry
    assert gpu.owned_usd == pytest.approx(192.0)
    assert r.by_kind["gpu"]["usd_per_mtok"] == pytest.approx(4.0 / 16_000 * 1e6)
    assert r.by_kind["gpu"]["owned_usd_per_mtok"] == pytest.approx(192.0 / 16_000 * 1e6)
    assert [t.kind for t in r.triggers] == ["out_of_band"]
    assert "2 consecutive days" in r.triggers[0].detail


def test_break_even_sizes_owned_endpoints_for_provider_traffic() -> None:
    cfg = _config()
    hour = 3600.0
    # the GPU pool served 1000 tokens per 1 s busy: 1000 tokens per busy request-second
    recs = [(T0 + i, _record("gpu", tokens=1000, e2e=1.0)) for i in range(10)]
    # the provider: 150 requests x 1000 tokens in the hour, 0.01 USD each -> 1.5 USD/h
    recs += [(T0 + i, _record("api", tokens=1000, cost=0.01, spill="reserved_exhausted"))
             for i in range(150)]
    r = analyse(recs, cfg, since=T0, until=T0 + hour)
    (b,) = r.break_even
    assert b.provider_usd_per_h == pytest.approx(1.5)
    assert b.provider_tokens_per_h == pytest.approx(150_000)
    # one endpoint carries 1000 tok/s x 4 slots x 3600 x 0.5 = 7.2 M tokens/h: one is enough
    assert b.owned_pool == "gpu" and b.endpoints_needed == 1
    assert b.owned_usd_per_h == pytest.approx(2.0) and b.ratio == pytest.approx(0.75)
    assert not [t for t in r.triggers if t.kind == "provider_past_break_even"]
    assert r.spillovers == {"reserved_exhausted": 150}
    # more provider spend: past break-even
    recs += [(T0 + 300 + i, _record("api", tokens=1000, cost=0.01)) for i in range(250)]
    r2 = analyse(recs, cfg, since=T0, until=T0 + hour)
    assert r2.break_even[0].ratio == pytest.approx(2.0)
    assert any(t.kind == "provider_past_break_even" and t.subject == "llama-3.1-8b"
               for t in r2.triggers)


def test_divergence_trend_rising() -> None:
    cfg = _config()
    recs = []
    for d, tail in enumerate((0.2, 0.4, 0.8)):  # the P99 grows, the P50 stays
        recs += [(T0 + d * DAY + i, _record("gpu", ttft=0.1)) for i in range(99)]
        recs += [(T0 + d * DAY + 100 + i, _record("gpu", ttft=tail)) for i in range(3)]
    r = analyse(recs, cfg, since=T0, until=T0 + 3 * DAY)
    gpu = next(p for p in r.pools if p.name == "gpu")
    assert len(gpu.divergence) == 3 and gpu.divergence_slope is not None
    assert gpu.divergence_slope > 0
    assert any(t.kind == "divergence_rising" and t.subject == "gpu" for t in r.triggers)


def test_empty_window_is_an_error() -> None:
    with pytest.raises(ValueError, match="window is empty"):
        analyse([], _config(), since=T0, until=T0)


def test_band_must_be_ordered() -> None:
    bad = FLEET.format(ledger="l.db").replace("band_low: 0.4", "band_low: 0.8")
    with pytest.raises(ConfigError, match="economics"):
        parse_config(bad, "fleet.yaml")


async def _write_ledger(path: Path) -> None:
    """Real decisions placed by the real policy, recorded by the real SQLite ledger."""
    cfg = _config(str(path))
    live = LiveFleet(Fleet.from_config(cfg), stale_after_s=2.0)
    policy = build_policies(cfg, "fleet.yaml")["default"]
    ledger = SqliteLedger(path)
    await ledger.start()
    for i in range(40):
        excluded = frozenset({"gpu-0", "gpu-1"}) if i % 4 == 0 else frozenset()
        prof = RequestProfile(request_id=f"r{i}", tenant="acme", model="llama-3.1-8b",
                              prompt_tokens=900, max_output_tokens=100, excluded=excluded)
        d = place(prof, live.snapshot(), policy, decision_id=f"r{i}", timer=time.perf_counter)
        assert d.picked is not None
        sub = d.picked.endpoint.substrate.name
        d = replace(d, decision_id=f"r{i}")
        ledger.record(d, Outcome(status=200, endpoint=d.picked.name, ttft_s=0.05, e2e_s=2.0,
                                 prompt_tokens=900, completion_tokens=100,
                                 cost_usd=0.0013 if sub == "api" else 0.0005),
                      T0 + i * 60)
    await ledger.close()


async def test_economics_command_reads_the_ledger(tmp_path: Path) -> None:
    ledger = tmp_path / "ledger.db"
    await _write_ledger(ledger)
    fleet = tmp_path / "fleet.yaml"
    fleet.write_text(FLEET.format(ledger=ledger))
    runner = CliRunner()
    args = ["economics", "--config", str(fleet), "--since", "2026-01-01T00:00:00Z",
            "--until", "2026-01-01T01:00:00Z"]
    out = runner.invoke(app, [*args, "--json", str(tmp_path / "e.json")])
    assert out.exit_code == 0, out.output
    assert "repatriation break-even" in out.output and "llama-3.1-8b: provider" in out.output
    doc = json.loads((tmp_path / "e.json").read_text())
    assert doc["schema"] == "inferplane.economics/1" and doc["requests"] == 40
    pools = {p["name"]: p for p in doc["pools"]}
    assert pools["api"]["requests"] == 10 and pools["gpu"]["requests"] == 30
    assert pools["gpu"]["utilisation"] == pytest.approx(30 * 2.0 / (3600 * 8))

    prom = runner.invoke(app, [*args, "--prometheus"])
    assert prom.exit_code == 0, prom.output
    assert 'inferplane_economics_pool_utilisation{kind="gpu",pool="gpu"}' in prom.output
    assert "inferplane_economics_break_even_ratio" in prom.output

    bad = runner.invoke(app, ["economics", "--config", str(fleet), "--since", "yesterday"])
    assert bad.exit_code == 2 and "--since" in bad.output


async def test_gateway_gauges_refresh_from_the_ledger(tmp_path: Path) -> None:
    ledger = tmp_path / "ledger.db"
    await _write_ledger(ledger)
    cfg = parse_config(FLEET.format(ledger=ledger).replace(
        "divergence_days: 3}", "divergence_days: 3, refresh_s: 60, window_days: 100000}"),
        "fleet.yaml")
    registry = CollectorRegistry()
    refresher = refresher_for(cfg, "fleet.yaml", registry)
    assert refresher is not None
    await refresher.refresh()
    text = generate_latest(registry).decode()
    assert 'inferplane_economics_pool_utilisation{kind="provider-api",pool="api"}' in text
    # no ledger to read back, or gauges off: no refresher
    assert refresher_for(_config().model_copy(update={"gateway": cfg.gateway.model_copy(
        update={"ledger_path": None})}), "f", CollectorRegistry()) is None
    assert refresher_for(_config(str(ledger)), "f", CollectorRegistry()) is None


def test_report_lines_and_collector_without_traffic() -> None:
    r = analyse([], _config(), since=T0, until=T0 + DAY)
    text = "\n".join(lines(r))
    assert "no provider traffic in the window" in text and "reassessment triggers:" in text
    c = EconomicsCollector()
    assert list(c.collect()) == []  # nothing before the first report
    c.report = r
    assert {m.name for m in c.collect()} >= {"inferplane_economics_pool_utilisation"}
    assert from_ledger is not None and Source is not None


SIM = {
    "requests": 1000, "completed": 990, "rejected": 10, "cost_usd": 12.5,
    "prompt_tokens": 900_000, "output_tokens": 100_000, "slo_attainment": 0.9,
    "ttft_s": {"p90": 0.8}, "spillovers": 40, "sovereignty_violations": 0,
    "per_substrate": {"gpu": 900, "api": 90},
}


def test_what_if_compares_two_simulations(tmp_path: Path) -> None:
    after = {**SIM, "cost_usd": 10.0, "slo_attainment": 0.95, "spillovers": 10,
             "per_substrate": {"gpu": 980, "api": 10}}
    text = "\n".join(compare(SIM, after))
    assert "cost USD" in text and "-2.5 (-20%)" in text
    assert "USD per 1M tokens" in text and "12.5" in text and "10" in text
    assert "spillovers" in text and "-30 (-75%)" in text
    assert "api" in text and "-80" in text
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps(SIM))
    b.write_text(json.dumps(after))
    out = CliRunner().invoke(app, ["economics", "--report", str(a), "--against", str(b)])
    assert out.exit_code == 0 and "SLO attainment" in out.output
    b.write_text("[1, 2]")
    bad = CliRunner().invoke(app, ["economics", "--report", str(a), "--against", str(b)])
    assert bad.exit_code == 2 and "not an `inferplane simulate` report" in bad.output
    half = CliRunner().invoke(app, ["economics", "--report", str(a)])
    assert half.exit_code == 2 and "--against" in half.output


# -- a ledger younger than the window (audit29 #4) -------------------------------------------
def test_a_young_ledger_is_read_over_its_span_not_as_idle_days() -> None:
    cfg = _config()  # 2 gpu endpoints at 2 USD/h; out_of_band_days 2
    until = T0 + 30 * DAY
    recs = [(until - 600 + i, _record("gpu", e2e=1.0)) for i in range(10)]  # 10 minutes old
    r = analyse(recs, cfg, since=T0, until=until, starts_in_window=True)
    gpu = next(p for p in r.pools if p.name == "gpu")
    assert r.ledger_span and r.since == until - 600 and r.hours == pytest.approx(600 / 3600)
    assert gpu.owned_usd == pytest.approx(2 * 2.0 * 600 / 3600)  # the hours the ledger covers
    assert list(gpu.daily_utilisation) == ["2026-01-30"] and gpu.days_out_of_band == 1
    assert r.triggers == []
    assert r.to_json()["requested_since"] == T0
    assert "the ledger's span" in lines(r)[0] and "30.0 days asked for" in lines(r)[0]
    full = analyse(recs, cfg, since=T0, until=until)  # the ledger older than the window
    assert not full.ledger_span and full.hours == pytest.approx(30 * 24)
    empty = analyse([], cfg, since=T0, until=until, starts_in_window=True)
    assert empty.hours == 0 and empty.triggers == [] and "no records" in lines(empty)[0]


def test_out_of_band_needs_whole_days_of_data() -> None:
    """A day the ledger covers only in part (its first) is not a day of data for the rule."""
    cfg = _config()  # out_of_band_days 2
    recs = [(T0 + DAY / 2 + i * 3600, _record("gpu")) for i in range(36)]
    r = analyse(recs, cfg, since=T0 - 5 * DAY, until=T0 + 2 * DAY, starts_in_window=True)
    gpu = next(p for p in r.pools if p.name == "gpu")
    assert gpu.days_out_of_band == 1 and r.triggers == []  # half of day 1, then day 2
    recs += [(T0 + 2 * DAY + i * 3600, _record("gpu")) for i in range(12)]
    r = analyse(recs, cfg, since=T0 - 5 * DAY, until=T0 + 2.5 * DAY, starts_in_window=True)
    gpu = next(p for p in r.pools if p.name == "gpu")
    assert gpu.days_out_of_band == 2 and [t.kind for t in r.triggers] == ["out_of_band"]


def test_divergence_and_break_even_need_their_data() -> None:
    cfg = _config()  # divergence_days 3
    recs = []
    for d, tail in enumerate((0.2, 0.8)):  # two days of a rising tail: not three
        recs += [(T0 + d * DAY + i, _record("gpu", ttft=0.1)) for i in range(99)]
        recs += [(T0 + d * DAY + 100 + i, _record("gpu", ttft=tail)) for i in range(3)]
    r = analyse(recs, cfg, since=T0, until=T0 + 2 * DAY)
    gpu = next(p for p in r.pools if p.name == "gpu")
    assert gpu.divergence_slope is not None and gpu.divergence_slope > 0
    assert not [t for t in r.triggers if t.kind == "divergence_rising"]
    # three days of a rising tail, but not the window's last three: day 3 has too few TTFTs
    # for a P99 (review29-fix29a #4: before, any three days in the window were enough)
    recs = []
    for d, tail in enumerate((0.2, 0.4, 0.8)):
        recs += [(T0 + d * DAY + i, _record("gpu", ttft=0.1)) for i in range(99)]
        recs += [(T0 + d * DAY + 100 + i, _record("gpu", ttft=tail)) for i in range(3)]
    recs += [(T0 + 3 * DAY + i, _record("gpu", ttft=5.0)) for i in range(5)]
    r = analyse(recs, cfg, since=T0, until=T0 + 4 * DAY)
    gpu = next(p for p in r.pools if p.name == "gpu")
    assert len(gpu.divergence) == 3 and list(gpu.divergence)[-1] != list(
        gpu.daily_utilisation)[-1]
    assert not [t for t in r.triggers if t.kind == "divergence_rising"]
    # provider spend past break-even over half an hour: its per-hour figures need an hour
    recs = [(T0 + i, _record("gpu", tokens=1000, e2e=1.0)) for i in range(10)]
    recs += [(T0 + i, _record("api", tokens=1000, cost=0.02)) for i in range(200)]
    r = analyse(recs, cfg, since=T0, until=T0 + 1800)
    assert r.break_even[0].ratio is not None and r.break_even[0].ratio > 1
    assert not [t for t in r.triggers if t.kind == "provider_past_break_even"]


async def test_economics_of_a_young_ledger_file(tmp_path: Path) -> None:
    ledger = tmp_path / "ledger.db"
    await _write_ledger(ledger)  # 40 records from T0, a minute apart
    r = from_ledger(_config(str(ledger)), Source(sqlite_path=str(ledger)),
                    until=T0 + 3600)
    assert r.ledger_span and r.since == T0 and r.hours == pytest.approx(1.0)
    assert r.requested_since == T0 + 3600 - 30 * DAY
    r = from_ledger(_config(str(ledger)), Source(sqlite_path=str(ledger)),
                    since=T0 + 600, until=T0 + 3600)  # records before the window: all of it
    assert not r.ledger_span and r.since == T0 + 600
