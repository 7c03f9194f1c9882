"""Placement plugin timings reach their histogram by stage and plugin."""

from __future__ import annotations

from inferplane.telemetry.metrics import GatewayMetrics


def test_placement_timings_by_stage_and_plugin() -> None:
    m = GatewayMetrics()
    m.observe_placement({"filter:health": 2e-6, "pick:round-robin": 3e-5})
    m.observe_placement({"filter:health": 4e-6})
    r = m.registry
    labels = {"stage": "filter", "plugin": "health"}
    assert r.get_sample_value("inferplane_placement_plugin_seconds_count", labels) == 2
    assert r.get_sample_value("inferplane_placement_plugin_seconds_sum", labels) == 6e-6
    assert r.get_sample_value(
        "inferplane_placement_plugin_seconds_bucket", {**labels, "le": "5e-06"}
    ) == 2
    assert r.get_sample_value(
        "inferplane_placement_plugin_seconds_count", {"stage": "pick", "plugin": "round-robin"}
    ) == 1
