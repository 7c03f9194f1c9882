"""Small simulator fleets and traces: `fleet`, EU H100 endpoints with admission on, and `trace`,
evenly spaced requests with no prefix sharing."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from inferplane.config.loader import parse_config
from inferplane.config.schema import FleetConfig
from inferplane.twin.traces.loader import TraceRequest
from tests.builders import endpoint, model, pool_fleet, to_yaml

KEY = "sha256:" + "ab" * 32
KEY2 = "sha256:" + "cd" * 32
VICTIM_AND_FLOODER = ({"name": "victim", "api_keys": [KEY], "region": "eu-west"},
                      {"name": "flooder", "api_keys": [KEY2], "region": "eu-west"})


def fleet(
    n: int = 2,
    *,
    max_concurrency: int = 4,
    max_waiting: int = 6,
    gateway: Mapping[str, Any] | None = None,
    mix: Sequence[Mapping[str, Any]] | None = None,
    tenants: Sequence[Mapping[str, Any]] = ({"name": "demo", "api_keys": [KEY],
                                             "region": "eu-west"},),
) -> FleetConfig:
    """``n`` EU H100 endpoints ``h-0``..; ``gateway``: more gateway fields."""
    return parse_config(to_yaml(pool_fleet(
        gateway={"scrape_interval_s": 0.1, **(gateway or {})},
        regions=[{"name": "eu-west"}],
        admission={"store": "memory", "queue": {"max_waiting": max_waiting}},
        classes=[{"name": "best-effort", "ttft_slo_ms": 2000, "priority": "sheddable"}],
        substrate={"name": "eu-h100", "region": "eu-west", "cost": {"hourly_usd": 3.5}},
        endpoints=[endpoint(f"h-{i}", 9300 + i, max_concurrency=max_concurrency,
                            models=[model("llama-3.1-8b", None, 32768)]) for i in range(n)],
        tenants=tenants,
        **({} if mix is None else {"mix": list(mix)}),
    )), "fleet.yaml")


def trace(n: int, every_s: float, *, prompt: int = 3000, out: int = 200, t0: float = 0.0,
          ) -> list[TraceRequest]:
    return [TraceRequest(t0 + i * every_s, prompt, out) for i in range(n)]


