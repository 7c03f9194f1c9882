"""The gateway's request-path metrics export exactly what prometheus_client's own would."""

from __future__ import annotations

import math
import re
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from inferplane.telemetry.metrics import FastCounter, FastHistogram, GatewayMetrics


def _exposition(counter: Any, histogram: Any) -> str:
    r = CollectorRegistry()
    c = counter("x_requests", "requests", ["a", "b"], registry=r)
    counter("x_unused", "never incremented", ["a"], registry=r)
    h = histogram("x_seconds", "seconds", ["s"], buckets=(0.1, 1.0, 5), registry=r)
    c.labels("p", "q").inc()
    c.labels("p", "q").inc(2.5)
    c.labels("z", "q").inc()
    for v in (0.1, 0.05, 1.0, 3, 7, 1e9, math.nan):
        h.labels("k").observe(v)
    h.labels("j").observe(0)
    text = generate_latest(r).decode()
    return re.sub(r"_created(\{.*?\})? \S+", r"_created\1 T", text)  # creation times differ


def test_fast_metrics_export_as_prometheus_client_does() -> None:
    assert _exposition(FastCounter, FastHistogram) == _exposition(Counter, Histogram)


def test_fast_counter_refuses_negative_and_wrong_labels() -> None:
    c = FastCounter("x", "x", ["a"], registry=CollectorRegistry())
    with pytest.raises(ValueError, match="non-negative"):
        c.labels("v").inc(-1)
    with pytest.raises(ValueError, match="expected labels"):
        c.labels("v", "w")


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
