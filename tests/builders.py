"""Shared builders for unit tests: a small fleet in YAML, configs, snapshots and profiles.

Fleets are YAML text (the constants below, or a dict from `pool_fleet` written out by
`to_yaml`) read through the real loader (`parse_config`) and `Fleet.from_config`, so tests
exercise the same path as the gateway.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import sys
from collections.abc import Mapping, Sequence
from functools import cache
from pathlib import Path
from types import MappingProxyType, ModuleType
from typing import Any

import yaml

from inferplane.config.loader import parse_config
from inferplane.config.schema import FleetConfig
from inferplane.fleet.model import Fleet
from inferplane.fleet.state import EndpointState, EndpointView, FleetSnapshot
from inferplane.placement.profile import RequestProfile


def load_file(name: str, path: Path) -> ModuleType:
    """A script or test file (not a package module) loaded as module ``name``; registered in
    `sys.modules` first, since dataclasses resolve annotations through it."""
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def key_hash(key: str) -> str:
    """The stored form of an API key (same as `inferplane hash-key`)."""
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()


# The smallest file the loader accepts: one substrate with one endpoint.
MINIMAL_YAML = """\
substrates:
  - name: s
    kind: gpu
    hardware: h100
    region: eu-west
    jurisdiction: eu
    cost: {hourly_usd: 3.0}
    endpoints:
      - name: e
        url: http://127.0.0.1:9001
        models: [{name: llama-3.1-8b, max_context: 8192}]
"""

# A small two-region fleet: three 8B endpoints (two in the EU, one in the US) and one 32B
# endpoint with a larger context window, plus two tenants.
SMALL_FLEET_YAML = f"""\
gateway:
  seed: 7
regions:
  - {{name: eu-west, rtt_ms: {{us-east: 80}}}}
  - {{name: us-east}}
substrates:
  - name: eu-h100
    kind: gpu
    hardware: h100
    region: eu-west
    jurisdiction: eu
    cost: {{hourly_usd: 3.0}}
    endpoints:
      - name: eu-0
        url: http://127.0.0.1:9001
        models: [{{name: llama-3.1-8b, max_context: 8192}}]
      - name: eu-1
        url: http://127.0.0.1:9002
        models: [{{name: llama-3.1-8b, max_context: 8192, variant: instruct}}]
  - name: us-h200
    kind: gpu
    hardware: h200
    region: us-east
    jurisdiction: us
    capacity_class: burst
    cost: {{input_per_mtok: 0.1, output_per_mtok: 0.3}}
    endpoints:
      - name: us-0
        url: http://127.0.0.1:9003
        models:
          - {{name: llama-3.1-8b, max_context: 32768}}
          - {{name: qwen3-32b, max_context: 32768}}
tenants:
  - name: acme
    api_keys: ["{key_hash("sk-acme")}"]
    allowed_jurisdictions: [eu, us]
    region: eu-west
  - name: globex
    api_keys: ["{key_hash("sk-globex")}"]
    default_class: batch
"""


def model(name: str = "m", profile: str | None = "llama-3.1-8b", max_context: int = 8192,
          **fields: Any) -> dict[str, Any]:
    """One entry of an endpoint's ``models`` list (``profile=None`` leaves the profile out)."""
    out: dict[str, Any] = {"name": name}
    if profile is not None:
        out["profile"] = profile
    return {**out, "max_context": max_context, **fields}


def endpoint(name: str = "e", port: int | None = None, *, url: str | None = None,
             models: Sequence[Mapping[str, Any]] | None = None, **fields: Any) -> dict[str, Any]:
    """One endpoint: at ``url``, else at ``http://127.0.0.1:{port}``; serving ``models``
    (default: `model()`), with any other endpoint field in ``fields``."""
    if url is None:
        assert port is not None, "an endpoint needs a port or a url"
        url = f"http://127.0.0.1:{port}"
    return {"name": name, "url": url, **fields,
            "models": [dict(m) for m in models] if models is not None else [model()]}


def tenant(name: str, key: str, **fields: Any) -> dict[str, Any]:
    """A tenant with one API key (stored hashed), with any other tenant field in ``fields``."""
    assert "api_keys" not in fields, "tenant() takes one key; build the dict for several"
    return {"name": name, "api_keys": [key_hash(key)], **fields}


# The one substrate of `pool_fleet`, before ``substrate`` overrides. Read-only (nested ``cost``
# too); `pool_fleet` copies it into fresh dicts, so a built fleet shares nothing with it.
POOL_SUBSTRATE: Mapping[str, Any] = MappingProxyType({
    "name": "pool", "kind": "gpu", "hardware": "h100", "region": "r1", "jurisdiction": "eu",
    "cost": MappingProxyType({"input_per_mtok": 1.0, "output_per_mtok": 2.0}),
})


def pool_fleet(
    port: int | None = None,
    *,
    gateway: Mapping[str, Any] | None = None,
    substrate: Mapping[str, Any] | None = None,
    endpoint_fields: Mapping[str, Any] | None = None,
    models: Sequence[Mapping[str, Any]] | None = None,
    endpoints: Sequence[Mapping[str, Any]] | None = None,
    key: str | None = None,
    tenants: Sequence[Mapping[str, Any]] | None = None,
    **sections: Any,
) -> dict[str, Any]:
    """The fleet file (as the dict YAML would load) that most gateway tests run: one substrate
    (`POOL_SUBSTRATE` with the fields of ``substrate`` over it) holding, by default, one
    endpoint ``e`` at ``http://127.0.0.1:{port}`` that serves `model()` (or ``models``); the
    fields of ``endpoint_fields`` are `endpoint` arguments for it (``name``, ``url`` instead of
    ``port``, ``max_concurrency``...; ``models`` there and in ``models`` is a TypeError).
    A test whose assertions name the pool, its kind, the endpoint or the tenant should pass
    those names here rather than rely on the defaults.

    - ``endpoints``: the substrate's endpoints instead of that one (see `endpoint`);
    - ``gateway``: the ``gateway`` block (none when not given);
    - ``key``: one tenant ``t`` with that API key; ``tenants``: the tenants instead (see
      `tenant`); neither: no tenants;
    - ``sections``: any other top-level block as is (``telemetry``, ``admission``, ``epp``,
      ``classes``, ``batch``...); not ``substrates`` (an AssertionError: one substrate here).

    `to_yaml` writes it as YAML text, for `parse_config` or a file."""
    assert "substrates" not in sections, "one substrate: use substrate= and endpoints="
    if endpoints is None:
        # through endpoint(): a ``url`` there is used, and ``models`` given twice is a TypeError
        given = {"models": models} if models is not None else {}
        endpoints = [endpoint(**{"name": "e", **(endpoint_fields or {})}, port=port, **given)]
    else:
        assert port is None and models is None and endpoint_fields is None, (
            "port, models and endpoint_fields describe the one endpoint; endpoints replaces it")
    assert key is None or tenants is None, "key gives one tenant; tenants gives them all"
    out: dict[str, Any] = {}
    if gateway is not None:
        out["gateway"] = dict(gateway)
    out.update(sections)
    out["substrates"] = [{**_plain(POOL_SUBSTRATE), **(substrate or {}),
                          "endpoints": [dict(e) for e in endpoints]}]
    if key is not None:
        tenants = [tenant("t", key)]
    if tenants is not None:
        out["tenants"] = [dict(t) for t in tenants]
    return copy.deepcopy(out)  # nothing shared with the defaults or the caller's values


def _plain(value: Any) -> Any:
    """``value`` with every mapping (read-only ones included) copied into a fresh dict."""
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    return copy.deepcopy(value)


class _PlainDumper(yaml.SafeDumper):
    def ignore_aliases(self, data: Any) -> bool:
        return True  # a value used twice is written twice, not as an anchor and an alias


def to_yaml(cfg: Mapping[str, Any]) -> str:
    """A fleet file's text from its dict (`pool_fleet`): keys in the order given."""
    return yaml.dump(dict(cfg), Dumper=_PlainDumper, sort_keys=False)


def config(text: str = SMALL_FLEET_YAML, file: str = "fleet.yaml") -> FleetConfig:
    """A checked config from YAML text (built-in classes, plugins and profiles merged)."""
    return parse_config(text, file)


@cache
def fleet(text: str = SMALL_FLEET_YAML) -> Fleet:
    """The static fleet of a YAML file (cached: a `Fleet` is immutable and shared)."""
    return Fleet.from_config(config(text))


def state(**fields: Any) -> EndpointState:
    """An endpoint state with fresh metrics unless told otherwise."""
    fields.setdefault("stale", False)
    return EndpointState(**fields)


def snapshot(
    the_fleet: Fleet | None = None,
    states: Mapping[str, EndpointState] | None = None,
    *,
    now: float = 100.0,
    version: int = 1,
) -> FleetSnapshot:
    """A snapshot of ``the_fleet`` (default: the small fleet); endpoints not named in
    ``states`` get a healthy, idle, fresh state."""
    f = the_fleet if the_fleet is not None else fleet()
    states = states or {}
    views = tuple(EndpointView(e, states.get(e.name, state())) for e in f.endpoints)
    return FleetSnapshot(fleet=f, endpoints=views, now=now, version=version)


def profile(**fields: Any) -> RequestProfile:
    """A request profile for llama-3.1-8b from tenant acme unless told otherwise."""
    fields.setdefault("request_id", "req-1")
    fields.setdefault("tenant", "acme")
    fields.setdefault("model", "llama-3.1-8b")
    fields.setdefault("prompt_tokens", 100)
    fields.setdefault("max_output_tokens", 100)
    return RequestProfile(**fields)
