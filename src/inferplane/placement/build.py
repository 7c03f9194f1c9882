"""Build placement policies from config, checking everything at start-up.

Unknown plugin types, bad parameters, unknown references, a scorer without a weight, a weight on
something that is not a scorer, two pickers in one profile: each is a `ConfigError` naming the
path of the offending entry. Nothing about configuration fails at request time.
"""

from __future__ import annotations

from pydantic import ValidationError

from inferplane.config.loader import format_loc
from inferplane.config.schema import FleetConfig
from inferplane.errors import ConfigError
from inferplane.placement import plugins as _plugins  # noqa: F401  (registers built-in types)
from inferplane.placement.framework import (
    REGISTRY,
    Filter,
    MaxScorePicker,
    NoParams,
    Picker,
    Plugin,
    Policy,
    Scorer,
)
from inferplane.placement.fused import FusedScoring
from inferplane.placement.fused_filters import FusedFilters


def build_plugins(config: FleetConfig, file: str) -> dict[str, Plugin]:
    """Instantiate every configured plugin by instance name."""
    out: dict[str, Plugin] = {}
    problems: list[tuple[str, str]] = []
    for i, spec in enumerate(config.plugins):
        cls = REGISTRY.get(spec.type)
        if cls is None:
            known = sorted(REGISTRY)
            problems.append(
                (f"plugins[{i}].type", f"unknown plugin type {spec.type!r}; known: {known}")
            )
            continue
        try:
            params = cls.Params.model_validate(spec.parameters)
        except ValidationError as exc:
            for e in exc.errors():
                loc = format_loc(("parameters", *e["loc"]))
                problems.append((f"plugins[{i}].{loc}", e["msg"]))
            continue
        out[spec.instance_name] = cls(spec.instance_name, params)
    if problems:
        raise ConfigError(file, problems)
    return out


def build_policies(
    config: FleetConfig, file: str = "<config>", *, seed: int | None = None, fused: bool = True
) -> dict[str, Policy]:
    """Build every profile of the config into a runnable `Policy`. ``fused``: score a profile
    whose scorer set allows it in one pass (`inferplane.placement.fused`) and filter one whose
    filter list allows it in one pass (`inferplane.placement.fused_filters`); False keeps every
    profile on the reference path (tests and benchmarks compare the two)."""
    instances = build_plugins(config, file)
    policies: dict[str, Policy] = {}
    problems: list[tuple[str, str]] = []
    base_seed = config.gateway.seed if seed is None else seed
    for i, prof in enumerate(config.profiles):
        filters: list[Filter] = []
        scorers: list[tuple[Scorer, float]] = []
        picker: Picker | None = None
        for j, ref in enumerate(prof.plugins):
            path = f"profiles[{i}].plugins[{j}]"
            plugin = instances.get(ref.ref)
            if plugin is None:
                problems.append((f"{path}.ref", f"unknown plugin {ref.ref!r}"))
                continue
            roles = 0
            if isinstance(plugin, Filter):
                filters.append(plugin)
                roles += 1
            if isinstance(plugin, Scorer):
                roles += 1
                if ref.weight is None:
                    problems.append((f"{path}.weight", f"scorer {ref.ref!r} needs a weight"))
                else:
                    scorers.append((plugin, ref.weight))
            elif ref.weight is not None:
                problems.append((f"{path}.weight", f"{ref.ref!r} is not a scorer; remove weight"))
            if isinstance(plugin, Picker):
                roles += 1
                if picker is not None:
                    problems.append(
                        (f"{path}.ref", f"second picker {ref.ref!r} (already {picker.name!r})")
                    )
                picker = plugin
            if roles == 0:
                problems.append((f"{path}.ref", f"{ref.ref!r} is not a filter, scorer or picker"))
        if picker is None:
            picker = MaxScorePicker("max-score", NoParams())
        policy = policies[prof.name] = Policy(
            name=prof.name,
            filters=filters,
            scorers=scorers,
            picker=picker,
            seed=base_seed + i,
            max_candidates=prof.max_candidates,
        )
    if problems:
        raise ConfigError(file, problems)
    if fused:
        # how many profiles use each plugin instance: a fused profile shares one prefix index
        # between its plugins only where no other profile feeds or reads either of them
        uses: dict[int, int] = {}
        for prof in config.profiles:
            for name in {r.ref for r in prof.plugins}:
                plugin = instances[name]
                uses[id(plugin)] = uses.get(id(plugin), 0) + 1
        for policy in policies.values():
            policy.fused = FusedScoring.compile(
                policy, exclusive=lambda p: uses.get(id(p), 0) == 1
            )
            policy.fused_filters = FusedFilters.compile(policy)
    return policies


def check_policies(config: FleetConfig, file: str) -> None:
    """Start-up check of plugins and profiles (raises `ConfigError`)."""
    build_policies(config, file)
