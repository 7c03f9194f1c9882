"""`inferplane demo`: a bad fleet starts nothing, and a run leaves no emulator behind."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from inferplane import demo
from inferplane.errors import ConfigError


def test_invalid_plugin_parameters_raise_before_any_process_starts(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    text, _ = demo.embedded_fleet("hetero")
    data = yaml.safe_load(text)
    data.setdefault("plugins", []).append(
        {"type": "least-request", "name": "broken-lr", "parameters": {"no_such_knob": 1}}
    )
    started: list[Any] = []

    def record(*args: Any, **kwargs: Any) -> Any:
        started.append(args)
        raise AssertionError("the emulator must not start for an invalid fleet")

    monkeypatch.setattr(demo, "_start_emulator", record)
    with pytest.raises(ConfigError) as info:
        asyncio.run(demo.run_demo(1.0, 1.0, 1, 1.0, yaml.safe_dump(data), "bad.yaml"))
    assert "no_such_knob" in str(info.value)
    assert started == []


def _alive(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return "State:\tZ" not in status


def test_demo_smoke_runs_reports_and_leaves_no_emulator() -> None:
    env = {**os.environ, "COLUMNS": "400"}  # no wrapped lines to parse
    proc = subprocess.run(
        [sys.executable, "-m", "inferplane.cli", "demo", "--duration", "2", "--rate", "2",
         "--time-scale", "20"],
        capture_output=True, text=True, timeout=90, env=env,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "Traceback" not in out
    assert "Requests per substrate" in out
    assert "Per workload class" in out
    assert "sovereignty violations: 0" in out
    pid = re.search(r"emulator pid (\d+)", out)
    logs = re.search(r"logs in (\S+?)\)", out)
    assert pid is not None and logs is not None, out
    assert not _alive(int(pid.group(1)))
    zone = re.search(r"eu-h100-8b emulator pid (\d+)", out)
    assert zone is not None and not _alive(int(zone.group(1)))
    for name in ("fleet.yaml", "fleet-emulator-zone.yaml"):
        fleet = str(Path(logs.group(1)) / name)
        assert Path(fleet).exists()
        left = subprocess.run(["pgrep", "-f", fleet], capture_output=True, text=True)
        assert left.stdout.strip() == "", f"emulator still running: {left.stdout}"
    for phase in ("steady", "surge", "long context", "agent steps", "provider 429s",
                  "regional outage"):
        assert re.search(rf"phase \d: {phase} ", out), phase


@pytest.mark.slow
def test_the_demo_tells_the_story() -> None:
    """`make demo` as shipped (30 s of traffic): every substrate kind serves, spillovers of at
    least three reasons are recorded, no request leaves its tenant's jurisdictions, and the
    report has its tables and one decision record."""
    env = {**os.environ, "COLUMNS": "400"}
    proc = subprocess.run([sys.executable, "-m", "inferplane.cli", "demo"],
                          capture_output=True, text=True, timeout=240, env=env)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    kinds = re.search(r"substrate kinds serving: (.*) \((\d+) of (\d+)\)", out)
    assert kinds is not None and kinds.group(2) == kinds.group(3), out
    assert set(kinds.group(1).split(", ")) == {
        "gpu", "sovereign-onprem", "low-latency", "giant-context", "provider-api"}
    reasons = re.search(r"spillover reasons: (.*)", out)
    assert reasons is not None
    seen = {part.split()[0] for part in reasons.group(1).split(", ")}
    assert len(seen) >= 3 and {"reserved_exhausted", "outage"} <= seen, reasons.group(1)
    assert "sovereignty violations: 0" in out
    assert "Requests and spend per substrate kind" in out and "USD per 1M tokens" in out
    assert "One decision record, in full" in out and '"spillover": {' in out
