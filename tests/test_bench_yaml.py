"""bench/ reads the YAML files a user writes as the gateway reads its own (`inferplane.yamlio`):
a key given twice is an error naming the file and line, not the last value kept silently."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from inferplane.errors import ConfigError


def test_the_peers_bench_refuses_a_fleet_config_with_a_repeated_key(tmp_path: Path) -> None:
    """``bench/peers/run.py --fleet-config``: refused before anything is made or started."""
    import bench.peers.run as run

    fleet = tmp_path / "fleet.yaml"
    fleet.write_text("gateway: {port: 8080}\nregions: []\ngateway: {port: 9090}\n")
    out = tmp_path / "out"
    with pytest.raises(ConfigError) as exc:
        run.run(argparse.Namespace(fleet_config=fleet, out=out, only=[]))
    assert str(exc.value) == f"{fleet}: line 3, column 1: invalid YAML: duplicate key 'gateway'"
    assert not out.exists()
