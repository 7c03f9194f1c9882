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
    fleet = str(Path(logs.group(1)) / "fleet.yaml")
    left = subprocess.run(["pgrep", "-f", fleet], capture_output=True, text=True)
    assert left.stdout.strip() == "", f"emulator still running: {left.stdout}"
