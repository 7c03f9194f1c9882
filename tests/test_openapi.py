"""The gateway's own OpenAPI description, and schemathesis against a running gateway: every route
is described, and fuzzed requests find no server error and no answer that breaks the description
(issue 12, "Also build"). The default run is short (a few examples per operation); the marked
``slow`` run goes deeper."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from inferplane.api.app import build_app, route_table
from inferplane.api.openapi import OPERATIONS, MissingOperation, build_spec
from inferplane.api.pipeline import Gateway
from inferplane.config.loader import parse_config
from tests.builders import model, pool_fleet, tenant, to_yaml
from tests.support.procs import ROOT, Proc, env, free_port

KEY = "sk-openapi"
CHECKS = "not_a_server_error,response_schema_conformance,status_code_conformance," \
         "content_type_conformance"


def fleet(gw_port: int, up_port: int) -> str:
    return to_yaml(pool_fleet(
        up_port, substrate={"cost": {"hourly_usd": 3.0}}, models=[model(max_context=4096)],
        endpoint_fields={"name": "ok"},
        gateway={"port": gw_port, "scrape_interval_s": 0.05, "max_body_bytes": 100000},
        tenants=[tenant("ta", KEY)]))


def test_every_route_is_described() -> None:
    app = build_app(Gateway(parse_config(fleet(1, 2))))
    routes = route_table(app)
    spec = build_spec(routes)
    described = {(m.upper(), p) for p, ops in spec["paths"].items() for m in ops}
    assert described == {r for r in routes if r[0] != "HEAD"}
    assert described <= set(OPERATIONS)
    for ops in spec["paths"].values():
        for op in ops.values():
            assert "default" in op["responses"]  # the OpenAI error body
    with pytest.raises(MissingOperation):
        build_spec([*routes, ("GET", "/v1/undescribed")])
    # the fleet's health needs an admin key: the spec says which
    assert "gateway.metrics.api_keys" in spec["paths"]["/v1/fleet/health"]["get"]["description"]


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    tmp = tmp_path_factory.mktemp("openapi")
    gw_port, up_port = free_port(), free_port()
    path = tmp / "fleet.yaml"
    path.write_text(fleet(gw_port, up_port))
    procs: list[Proc] = []
    try:
        up = Proc(["-m", "tests.support.fake_upstream", "--port", str(up_port), "--mode", "ok",
                   "--name", "ok"], tmp / "up.log")
        procs.append(up)
        up.wait_http(f"http://127.0.0.1:{up_port}/health")
        gw = Proc(["-m", "inferplane.cli", "serve", "--config", str(path)], tmp / "gw.log")
        procs.append(gw)
        gw.wait_http(f"http://127.0.0.1:{gw_port}/ready")
        yield f"http://127.0.0.1:{gw_port}", tmp
    finally:
        for p in procs:
            p.stop()


def test_served_description_is_the_cli_one(gateway: tuple[str, Path]) -> None:
    base, tmp = gateway
    served = httpx.get(f"{base}/openapi.json").json()
    out = subprocess.run(
        [sys.executable, "-m", "inferplane.cli", "openapi", "--config", str(tmp / "fleet.yaml")],
        capture_output=True, text=True, env=env(), cwd=ROOT, check=True,
    ).stdout
    assert json.loads(out) == served
    assert served["openapi"] == "3.1.0" and "/v1/chat/completions" in served["paths"]


def schemathesis(base: str, tmp: Path, examples: int, seed: int) -> None:
    st = Path(sys.executable).with_name("st")
    r = subprocess.run(
        [str(st), "run", f"{base}/openapi.json", "-H", f"Authorization: Bearer {KEY}",
         "-c", CHECKS, "-n", str(examples), "--seed", str(seed), "--request-timeout", "10",
         "--report", "junit", "--report-dir", str(tmp / "st")],
        capture_output=True, text=True, cwd=tmp, timeout=600,
    )
    summary = r.stdout[r.stdout.find("SUMMARY"):]
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-2000:]
    assert "passed" in summary, summary
    assert "Traceback" not in (tmp / "gw.log").read_text(), (tmp / "gw.log").read_text()


def test_schemathesis_finds_no_server_error_and_no_spec_violation(
    gateway: tuple[str, Path],
) -> None:
    schemathesis(*gateway, examples=5, seed=1)


@pytest.mark.slow
def test_schemathesis_long_run(gateway: tuple[str, Path]) -> None:
    schemathesis(*gateway, examples=200, seed=12)
