"""Builders for placement tests: fleets, snapshots, profiles and plugin instances, all in code.

Fleets go through the real loader (`parse_config`, built-in plugins and profiles merged) and
`Fleet.from_config`, so the plugins see exactly what the gateway and the simulator give them.
"""

from __future__ import annotations

import json
import random
from collections.abc import Mapping
from typing import Any

from inferplane.config.loader import parse_config
from inferplane.config.schema import FleetConfig
from inferplane.fleet.model import Fleet
from inferplane.fleet.state import EndpointState, EndpointView, FleetSnapshot, PrefixIndexView
from inferplane.placement.build import build_policies
from inferplane.placement.framework import REGISTRY, CycleState, Plugin, Policy
from inferplane.placement.profile import RequestProfile

MODEL = "llama-3.1-8b"
REGIONS: list[dict[str, Any]] = [
    {"name": "eu-west", "rtt_ms": {"us-east": 80}, "egress_usd_per_gb": 0.02},
    {"name": "us-east", "rtt_ms": {"eu-west": 80}, "egress_usd_per_gb": 0.09},
]

_port = iter(range(20000, 30000))


def sub(
    name: str,
    *,
    n: int = 1,
    kind: str = "gpu",
    hardware: str = "h100",
    region: str = "eu-west",
    jurisdiction: str = "eu",
    capacity: str = "reserved",
    cost: Mapping[str, float] | None = None,
    models: list[dict[str, Any]] | None = None,
    max_concurrency: int = 64,
) -> dict[str, Any]:
    """One substrate with ``n`` endpoints named ``{name}-{i}``."""
    served = models if models is not None else [{"name": MODEL, "max_context": 32768}]
    return {
        "name": name,
        "kind": kind,
        "hardware": hardware,
        "region": region,
        "jurisdiction": jurisdiction,
        "capacity_class": capacity,
        "cost": dict(cost) if cost is not None else {"hourly_usd": 3.0},
        "endpoints": [
            {
                "name": f"{name}-{i}",
                "url": f"http://127.0.0.1:{next(_port)}",
                "models": served,
                "max_concurrency": max_concurrency,
            }
            for i in range(n)
        ],
    }


def config(*subs: dict[str, Any], regions: list[dict[str, Any]] | None = None) -> FleetConfig:
    raw = {"regions": REGIONS if regions is None else regions, "substrates": list(subs)}
    return parse_config(json.dumps(raw), "<test>")


def fleet(*subs: dict[str, Any]) -> Fleet:
    return Fleet.from_config(config(*subs))


def hetero() -> FleetConfig:
    """A small heterogeneous fleet: reserved EU H100s, burst EU A100, sovereign on-prem, US
    reserved H100, US low-latency silicon, a US provider API and a 70B-only endpoint."""
    return config(
        sub("eu-h100", n=2),
        sub("eu-a100", hardware="a100", capacity="burst", cost={"hourly_usd": 3.4}),
        sub("de-sov", jurisdiction="eu-sovereign", cost={"hourly_usd": 3.2}),
        sub("us-h100", region="us-east", jurisdiction="us", cost={"hourly_usd": 2.5}),
        sub(
            "us-groq",
            kind="low-latency",
            hardware="groq-lpu",
            region="us-east",
            jurisdiction="us",
            capacity="burst",
            cost={"input_per_mtok": 0.05, "output_per_mtok": 0.08},
            models=[{"name": MODEL, "max_context": 8192}],
        ),
        sub(
            "us-api",
            kind="provider-api",
            hardware="provider-api",
            region="us-east",
            jurisdiction="us",
            capacity="burst",
            cost={"input_per_mtok": 0.2, "output_per_mtok": 0.2},
            models=[{"name": MODEL, "max_context": 131072, "precision": "fp8"}],
            max_concurrency=256,
        ),
        sub(
            "eu-70b",
            models=[{"name": "llama-3.1-70b", "max_context": 32768}],
            cost={"hourly_usd": 11.2},
        ),
    )


def state(**kw: Any) -> EndpointState:
    """Engine metrics fresh by default (``stale=False``, zero load)."""
    base: dict[str, Any] = {"stale": False, "running": 0.0, "waiting": 0.0, "kv_usage": 0.0}
    base.update(kw)
    return EndpointState(**base)


def snapshot(
    fl: Fleet,
    states: Mapping[str, EndpointState] | None = None,
    *,
    now: float = 0.0,
    prefix_index: PrefixIndexView | None = None,
) -> FleetSnapshot:
    states = states or {}
    views = tuple(EndpointView(e, states.get(e.name, state())) for e in fl.endpoints)
    return FleetSnapshot(fleet=fl, endpoints=views, now=now, prefix_index=prefix_index)


def profile(**kw: Any) -> RequestProfile:
    base: dict[str, Any] = {
        "request_id": "r1",
        "tenant": "t",
        "model": MODEL,
        "prompt_tokens": 1000,
        "max_output_tokens": 200,
        "ttft_slo_s": 1.0,
        "itl_slo_s": 0.1,
    }
    base.update(kw)
    # A precise index holds engine block hashes; where a test gives only prompt hashes, the
    # engine's blocks are taken to be the same (one hash per prompt block).
    if "block_hashes" in kw and "engine_block_hashes" not in kw:
        base["engine_block_hashes"] = kw["block_hashes"]
    return RequestProfile(**base)


def plugin(type_name: str, name: str | None = None, **params: Any) -> Any:
    """A fresh plugin instance of a registered type (``Any``: tests call role methods)."""
    cls = REGISTRY[type_name]
    inst: Plugin = cls(name or type_name, cls.Params.model_validate(params))
    return inst


def cycle(prof: RequestProfile, snap: FleetSnapshot, seed: int = 0) -> CycleState:
    return CycleState(profile=prof, snapshot=snap, rng=random.Random(seed))


def policies(cfg: FleetConfig, seed: int = 0) -> dict[str, Policy]:
    """Fresh policies (fresh plugin state) for every profile of a config."""
    return build_policies(cfg, "<test>", seed=seed)


def views(snap: FleetSnapshot, *names: str) -> list[EndpointView]:
    by = snap.by_name
    return [by[n] for n in names] if names else list(snap.endpoints)
