"""Energy per request: the endpoint's live draw where its metrics page reports one, else the
pool's envelope or the hardware's rating, shared among the requests in flight — from the
emulator's power gauge through the scraper to the decision record and the economics."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from inferplane.config.loader import parse_config
from inferplane.economics.analysis import analyse
from inferplane.fleet.energy import endpoint_power_w, request_energy_j
from inferplane.fleet.engine_metrics import parse_sglang, parse_vllm
from inferplane.fleet.model import Fleet
from tests.builders import (
    endpoint,
    model,
    pool_fleet,
    tenant,
    to_yaml,
)
from tests.support.procs import Proc, free_port

LLAMA = [model("llama-3.1-8b", profile=None)]


def fleet_file(port: int = 9001, port2: int = 9002, power: dict[str, Any] | None = None,
               **sections: Any) -> str:
    """Two engines ``a`` (two GPUs) and ``b`` in GPU pool ``pool`` (``power``: more pool
    fields), a provider endpoint ``p`` in pool ``api``; ``sections``: further blocks."""
    cfg = pool_fleet(
        substrate={"name": "pool", "kind": "gpu", "cost": {"hourly_usd": 3.0}, **(power or {})},
        endpoints=[endpoint("a", port, tp=2, models=LLAMA), endpoint("b", port2, models=LLAMA)],
        **sections)
    cfg["substrates"].append({
        "name": "api", "kind": "provider-api", "hardware": "provider-api", "region": "r1",
        "jurisdiction": "eu", "cost": {"input_per_mtok": 1.0, "output_per_mtok": 2.0},
        "endpoints": [endpoint("p", 9, models=LLAMA)]})
    return to_yaml(cfg)


def _fleet(power: dict[str, Any] | None = None) -> Fleet:
    return Fleet.from_config(parse_config(fleet_file(power=power), "f"))


def test_power_live_else_envelope_else_rating() -> None:
    a, b, p = _fleet().endpoints
    assert endpoint_power_w(a, 812.5) == (812.5, "live")
    assert endpoint_power_w(a, None) == (2 * 700.0, "tdp")  # two H100s at their rating
    assert endpoint_power_w(b, 0.0) == (700.0, "tdp")
    assert endpoint_power_w(p, None) is None and endpoint_power_w(p, 300.0) == (300.0, "live")
    a2, b2, _ = _fleet({"power_watts": 1000}).endpoints
    assert endpoint_power_w(a2, None) == endpoint_power_w(b2, None) == (500.0, "envelope")
    assert request_energy_j(700.0, 2.0, 4) == pytest.approx(350.0)
    assert request_energy_j(700.0, 2.0, 0) == pytest.approx(1400.0)


def test_the_dcgm_power_gauge_is_read_and_summed() -> None:
    page = ("vllm:num_requests_running{engine=\"0\"} 2\n"
            "DCGM_FI_DEV_POWER_USAGE{gpu=\"0\",modelName=\"H100\"} 301.5\n"
            "DCGM_FI_DEV_POWER_USAGE{gpu=\"1\",modelName=\"H100\"} 298.5\n")
    assert parse_vllm(page).power_watts == pytest.approx(600.0)
    assert parse_sglang(page.replace("vllm:num_requests_running", "sglang:num_running_reqs")
                        ).power_watts == pytest.approx(600.0)
    assert parse_vllm("vllm:num_requests_running 1\n").power_watts is None


def test_economics_reports_joules_per_token() -> None:
    cfg = parse_config(fleet_file(), "f")
    rec = {"request": {"model": "llama-3.1-8b", "workload_class": "interactive"},
           "picked": {"substrate": "pool"},
           "outcome": {"status": 200, "prompt_tokens": 900, "completion_tokens": 100,
                       "e2e_s": 1.0, "energy_j": 500.0}}
    no_energy = {**rec, "picked": {"substrate": "api"},
                 "outcome": {**rec["outcome"], "energy_j": None}}  # type: ignore[dict-item]
    r = analyse([(10.0, rec), (11.0, rec), (12.0, no_energy)], cfg, since=0.0, until=3600.0)
    assert r.by_kind["gpu"]["joules_per_token"] == pytest.approx(0.5)
    assert r.by_kind["provider-api"]["joules_per_token"] is None


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    tmp = tmp_path_factory.mktemp("energy")
    port, port2, gw_port = free_port(), free_port(), free_port()
    fleet = tmp / "fleet.yaml"
    fleet.write_text(fleet_file(port, port2, gateway={
        "port": gw_port, "scrape_interval_s": 0.05, "token_estimate": "words"},
        tenants=[tenant("t", "sk-energy")]))
    emu = Proc(["-m", "inferplane.cli", "emulate", "--config", str(fleet), "--only", "a",
                "--only", "b"], tmp / "emu.log")
    gw = None
    try:
        emu.wait_http(f"http://127.0.0.1:{port}/health")
        gw = Proc(["-m", "inferplane.cli", "serve", "--config", str(fleet)], tmp / "gw.log")
        gw.wait_http(f"http://127.0.0.1:{gw_port}/ready")
        yield f"http://127.0.0.1:{gw_port}", tmp
    finally:
        if gw is not None:
            gw.stop()
        emu.stop()


def test_the_record_carries_the_requests_joules(stack: tuple[str, Path]) -> None:
    base, _ = stack
    auth = {"Authorization": "Bearer sk-energy"}
    body = {"model": "llama-3.1-8b", "max_tokens": 16,
            "messages": [{"role": "user", "content": "how much energy does this take"}]}
    time.sleep(0.3)  # a few scrapes of the emulator's power gauge
    r = httpx.post(f"{base}/v1/chat/completions", json=body, headers=auth, timeout=30)
    assert r.status_code == 200, r.text
    decision = r.headers["x-inferplane-decision-id"]
    deadline = time.monotonic() + 10
    while True:
        d = httpx.get(f"{base}/v1/decisions/{decision}", headers=auth, timeout=10)
        if d.status_code == 200 and d.json().get("outcome"):
            break
        assert time.monotonic() < deadline, d.text
        time.sleep(0.1)
    out = d.json()["outcome"]
    assert out["power_source"] == "live"
    # at least the idle draw of its devices for its whole duration, at most their rating
    devices = 2 if d.json()["picked"]["endpoint"] == "a" else 1
    assert 0.25 * 700 * devices * out["e2e_s"] <= out["energy_j"] <= 700 * devices * out["e2e_s"]
