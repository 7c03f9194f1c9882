"""`inferplane serve` at start-up, about state held only in memory (docs/shared-state.md):
one warning naming what a restart loses and the keys that keep it; and `--workers N` refused
while the batch lane's store is in memory (each worker would keep its own files and batches,
and only worker 0 runs them). Also `check`'s note and `serve`'s warning about an engine URL
ending in ``/v1``. In process (typer's CliRunner), with the gateway itself (`_serve_one`) and
the workers' supervisor replaced: only the start-up checks run."""

from __future__ import annotations

import logging
import signal
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from inferplane import cli
from tests.builders import endpoint, pool_fleet, to_yaml

WARNING = "held in memory and lost when the gateway stops"


@pytest.fixture
def started(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The gateways `serve` would have started ("one", or "workers N")."""
    from inferplane.api import workers

    ran: list[str] = []
    monkeypatch.setattr(signal, "signal", lambda *_a: None)  # serve ignores SIGHUP first
    monkeypatch.setattr(cli, "_serve_one", lambda *_a, **_k: ran.append("one"))

    def supervise(n: int, *_a: Any) -> int:
        ran.append(f"workers {n}")
        return 0

    monkeypatch.setattr(workers, "supervise", supervise)
    return ran


def _serve(tmp_path: Path, *args: str, **sections: Any) -> Any:
    f = tmp_path / "fleet.yaml"
    port = None if "endpoints" in sections else 9  # the default endpoint's
    f.write_text(to_yaml(pool_fleet(port, gateway={"port": 8123, **sections.pop("gateway", {})},
                                    **sections)))
    return CliRunner().invoke(cli.app, ["serve", "--config", str(f), *args])


def _all_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


def _warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.levelno == logging.WARNING and WARNING in r.getMessage()]


def test_serve_warns_once_naming_what_is_in_memory(
    tmp_path: Path, started: list[str], caplog: pytest.LogCaptureFixture
) -> None:
    r = _serve(tmp_path)  # the defaults: store local, batch on, no ledger file
    assert r.exit_code == 0, r.output
    assert started == ["one"]
    [line] = _warnings(caplog)
    assert "budgets, leases and usage (set admission.path or gateway.ledger_path)" in line
    assert "batch files and batches (set batch.path, gateway.ledger_path or " \
           "batch.postgres_dsn)" in line
    assert "decision records (set gateway.ledger_path or ledger.postgres_dsn)" in line


def test_serve_names_only_what_is_in_memory(
    tmp_path: Path, started: list[str], caplog: pytest.LogCaptureFixture
) -> None:
    r = _serve(tmp_path, admission={"path": str(tmp_path / "a.sqlite")},
               batch={"enabled": False})
    assert r.exit_code == 0, r.output
    [line] = _warnings(caplog)
    assert "budgets" not in line and "batch" not in line
    assert "decision records" in line


def test_serve_with_a_ledger_file_does_not_warn(
    tmp_path: Path, started: list[str], caplog: pytest.LogCaptureFixture
) -> None:
    """gateway.ledger_path alone puts the admission store and the batch store beside it."""
    r = _serve(tmp_path, gateway={"ledger_path": str(tmp_path / "l.sqlite3")})
    assert r.exit_code == 0, r.output
    assert started == ["one"]
    assert _warnings(caplog) == []


def test_serve_with_the_memory_store_chosen_does_not_warn_about_budgets(
    tmp_path: Path, started: list[str], caplog: pytest.LogCaptureFixture
) -> None:
    """`admission.store: memory` is in memory by choice; no file key would change that."""
    r = _serve(tmp_path, gateway={"ledger_path": str(tmp_path / "l.sqlite3")},
               admission={"store": "memory"})
    assert r.exit_code == 0, r.output
    assert _warnings(caplog) == []


REDIS = {"store": "redis", "redis_url": "redis://127.0.0.1:9/0"}  # never reached here


def test_workers_refuse_a_batch_lane_in_memory(
    tmp_path: Path, started: list[str], caplog: pytest.LogCaptureFixture
) -> None:
    r = _serve(tmp_path, "--workers", "2", admission=REDIS)
    assert r.exit_code == 2, r.output
    assert started == []
    assert "--workers 2 with the batch lane in memory" in r.output
    for key in ("batch.path", "gateway.ledger_path", "batch.postgres_dsn", "batch.enabled: false"):
        assert key in r.output, key
    assert "Traceback" not in r.output


@pytest.mark.parametrize("sections", [
    {"batch": {"enabled": False}},
    {"batch": {"path": "b.sqlite"}},
    {"batch": {"postgres_dsn_env": "NOT_READ_AT_THIS_POINT"}},
    {"gateway": {"ledger_path": "l.sqlite3"}},
])
def test_workers_start_with_a_shared_batch_store_or_none(
    tmp_path: Path, started: list[str], sections: dict[str, Any]
) -> None:
    r = _serve(tmp_path, "--workers", "2", admission=REDIS, **sections)
    assert r.exit_code == 0, r.output
    assert started == ["workers 2"]


def test_workers_warn_that_a_ledger_in_memory_is_per_worker(
    tmp_path: Path, started: list[str], caplog: pytest.LogCaptureFixture
) -> None:
    r = _serve(tmp_path, "--workers", "2", admission=REDIS, batch={"enabled": False})
    assert r.exit_code == 0, r.output
    [line] = _warnings(caplog)
    assert "decision records, each of the 2 workers its own: the decision API and the console " \
           "see only the worker that served the request" in line
    assert "the Redis outage journal, settles waiting for Redis to come back (set " \
           "admission.journal_path or gateway.ledger_path)" in line
    assert "budgets" not in line and "batch" not in line


def test_redis_with_a_journal_file_does_not_warn_about_the_journal(
    tmp_path: Path, started: list[str], caplog: pytest.LogCaptureFixture
) -> None:
    r = _serve(tmp_path, admission={**REDIS, "journal_path": str(tmp_path / "j.sqlite")},
               batch={"enabled": False})
    assert r.exit_code == 0, r.output
    [line] = _warnings(caplog)
    assert "journal" not in line and "decision records" in line


STORES = [  # the configurations whose stores the warning and the refusal name
    {},
    {"batch": {"path": "b.sqlite"}},
    {"batch": {"postgres_dsn": "postgresql://127.0.0.1:9/x"}},
    {"batch": {"postgres_dsn_env": "SERVE_MEMORY_DSN"}},
    {"ledger": {"postgres_dsn": "postgresql://127.0.0.1:9/x"}},
    {"ledger": {"postgres_dsn_env": "SERVE_MEMORY_DSN"}},
    {"gateway": {"ledger_path": "l.sqlite3"}},
    {"gateway": {"ledger_path": "l.sqlite3"}, "batch": {"path": "b.sqlite"}},
]


@pytest.mark.parametrize("sections", STORES)
async def test_the_start_up_checks_agree_with_the_stores_serve_builds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, sections: dict[str, Any]
) -> None:
    """`cli._in_memory`'s and the refusal's conditions (`batch.routes.in_memory`,
    `ledger.build.in_memory`) against the stores `make_store` and `build_ledger` build from the
    same configuration (built, not started: nothing connects)."""
    from inferplane.batch.routes import in_memory as batches_in_memory
    from inferplane.batch.routes import make_store
    from inferplane.batch.sqlite_store import SqliteBatchStore
    from inferplane.config.loader import parse_config
    from inferplane.ledger.build import build_ledger
    from inferplane.ledger.build import in_memory as ledger_in_memory
    from inferplane.ledger.memory import MemoryLedger

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SERVE_MEMORY_DSN", "postgresql://127.0.0.1:9/x")
    cfg = parse_config(to_yaml(pool_fleet(9, **sections)))
    store = make_store(cfg)
    assert batches_in_memory(cfg) == (isinstance(store, SqliteBatchStore) and not store.shared)
    await store.close()
    ledger = build_ledger(cfg, "<test>")
    assert ledger_in_memory(cfg) == isinstance(ledger, MemoryLedger)
    await ledger.close()
    assert cli._batches_in_memory(cfg) == batches_in_memory(cfg)  # the lane is on
    held = " ".join(cli._in_memory(cfg, 1))
    assert ("batch files" in held) == batches_in_memory(cfg)
    assert ("decision records" in held) == ledger_in_memory(cfg)


V1 = "is probed at http://127.0.0.1:9/v1/health and scraped at http://127.0.0.1:9/v1/metrics, " \
     "which an engine does not serve (down, no load signals): give its url without the " \
     "trailing /v1"


def test_an_engine_url_ending_in_v1_is_named_by_check_and_at_start_up(
    tmp_path: Path, started: list[str], caplog: pytest.LogCaptureFixture
) -> None:
    """The OpenAI base_url habit on an engine endpoint: the API works, the probe and the
    scrape do not (test_emulator_providers' ``/v1`` case); `check` notes it, `serve` warns."""
    r = _serve(tmp_path, endpoints=[endpoint("e", url="http://127.0.0.1:9/v1")],
               gateway={"ledger_path": str(tmp_path / "l.sqlite3")})
    assert r.exit_code == 0, r.output
    assert [m for m in _all_warnings(caplog) if "trailing /v1" in m] == [
        f"endpoint 'e' {V1} (the API paths get their /v1 anyway; docs/providers.md)"]
    out = CliRunner().invoke(cli.app, ["check", "--config", str(tmp_path / "fleet.yaml")]).output
    assert f"note: endpoint 'e' {V1}" in out


@pytest.mark.parametrize("fields", [
    {"url": "http://127.0.0.1:9"},  # no /v1
    {"url": "http://127.0.0.1:9/proxy"},
    {"url": "http://127.0.0.1:9/v1", "health_check": "models", "scrape_metrics": False},
])
def test_an_engine_url_without_v1_or_not_probed_there_is_not_named(
    tmp_path: Path, started: list[str], caplog: pytest.LogCaptureFixture, fields: dict[str, Any]
) -> None:
    r = _serve(tmp_path, endpoints=[endpoint("e", **fields)])
    assert r.exit_code == 0, r.output
    assert not [m for m in _all_warnings(caplog) if "trailing /v1" in m]
    out = CliRunner().invoke(cli.app, ["check", "--config", str(tmp_path / "fleet.yaml")]).output
    assert "trailing /v1" not in out


PROVIDER = {"name": "prov", "kind": "provider-api", "hardware": "provider-api",
            "capacity_class": "burst", "cost": {"input_per_mtok": 1.0, "output_per_mtok": 2.0}}


def test_a_provider_url_ending_in_v1_is_not_named(
    tmp_path: Path, started: list[str], caplog: pytest.LogCaptureFixture
) -> None:
    """A hosted API's base URL ends in /v1 by convention; it is neither probed nor scraped."""
    r = _serve(tmp_path, substrate=PROVIDER, endpoints=[endpoint(
        "e", url="https://api.example.com/v1", engine="openai-compatible")])
    assert r.exit_code == 0, r.output
    assert not [m for m in _all_warnings(caplog) if "trailing /v1" in m]
