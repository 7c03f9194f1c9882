"""Build placement policies from config, checking everything at start-up.

Unknown plugin types, bad parameters, unknown references, a scorer without a weight, a weight on
something that is not a scorer, two pickers in one profile: each is a `ConfigError` naming the
path of the offending entry. Nothing about configuration fails at request time.

Every built policy runs the `REQUIRED_FILTERS` — the hard constraints (the model is served, the
request fits its context window, the tenant's and request's jurisdictions, the class's precisions
and capacity rules) — whatever its profile lists: a profile is a choice of preferences, and no
choice may place a request where it must never run (`required_filters`).
"""

from __future__ import annotations

from collections.abc import Mapping

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
from inferplane.placement.plugins.basic import ContextWindow, Health, ModelServed
from inferplane.placement.plugins.constraints import (
    CapacityClassFilter,
    Jurisdiction,
    PrecisionFilter,
)

#: The filters every policy runs whatever its profile lists, by plugin type, in the order they
#: are added when a profile does not list them: correctness, not preference. A request must
#: reach an endpoint serving its model (variant, API) whose context holds it, inside the
#: tenant's jurisdictions as the request narrowed them (README: a request "never widens"
#: them), at a precision the request tolerates and on a capacity class and substrate kind its
#: class allows (a sovereign class's ``allowed_kinds`` is a residency rule too). Health,
#: saturation, rate limits, reserved capacity and failure domains stay the profile's choice:
#: they are about when an endpoint is a good pick, not where a request may run (a listed
#: ``health`` is moved with these, though: see `required_filters`).
REQUIRED_FILTERS: tuple[tuple[str, type[Plugin]], ...] = (
    ("model-served", ModelServed),
    ("context-window", ContextWindow),
    ("jurisdiction", Jurisdiction),
    ("precision", PrecisionFilter),
    ("capacity-class", CapacityClassFilter),
)
_REQUIRED_TYPES = tuple(cls for _, cls in REQUIRED_FILTERS)
#: what `required_filters` moves ahead of a set-level filter: the required ones and health
_HOISTED_TYPES = (*_REQUIRED_TYPES, Health)


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


def required_filters(
    filters: list[Filter], instances: Mapping[str, Plugin] | None = None
) -> list[Filter]:
    """A profile's filters with the `REQUIRED_FILTERS` made sure of:

    - a listed one runs where it is listed, unless a filter that judges the set as a whole
      (not `Plugin.per_endpoint`: reserved capacity, failure domain, prefix affinity, a custom
      one) comes before it: then it moves to just before the first such filter, so that no
      such filter chooses among endpoints the request may not use (failure-domain keeping
      only another jurisdiction's endpoints, which the jurisdiction filter then removes). A
      listed ``health`` filter moves the same way (not required, but a set-level filter before
      it would choose among failing endpoints: reserved-capacity dropping the reserved
      endpoint because an unhealthy one "remains"). One listed twice runs once, where first;
    - one the profile does not list is inserted right after the required filter that
      precedes it in `REQUIRED_FILTERS` order (at the front when none does), so always before
      any set-level filter: the config's instance named by its type (``instances``; the
      built-in one), else a new one named so — the decision's ``rejected_by`` and
      ``removed_by`` name it as the shipped profiles do — or ``<type>-required`` where the
      config gives that name to a plugin of another type.

    What moves. The required filters and health commute with each other and with the other
    per-endpoint filters, so moves among those change only which filter a removal is recorded
    against (``rejected_by``, ``removed_by``; a saturated endpoint another required filter
    would remove is or is not in ``cycle.data["saturated"]``). Moving one ahead of a set-level
    filter changes that filter's input, and so who survives, deliberately: it then chooses
    only among endpoints the request may use (a failure-domain or reserved-capacity filter
    listed first could otherwise leave no eligible endpoint, a 503). An added filter narrows
    the survivors to where the request may run. A profile that lists them all, before any
    set-level filter — every shipped profile — comes back unchanged (the default profile keeps
    its fused filter pass)."""
    head: list[Filter] = []
    rest: list[Filter] = []
    for f in filters:
        if rest or not getattr(f, "per_endpoint", False):
            rest.append(f)
        else:
            head.append(f)
    hoisted = [f for f in rest if isinstance(f, _HOISTED_TYPES)]
    out = [*head, *hoisted, *(f for f in rest if not isinstance(f, _HOISTED_TYPES))]
    seen: set[int] = set()
    kept: list[Filter] = []
    for f in out:  # a required filter or health listed twice runs once, where first
        if isinstance(f, _HOISTED_TYPES):
            if id(f) in seen:
                continue
            seen.add(id(f))
        kept.append(f)
    out = kept
    for i, (tname, cls) in enumerate(REQUIRED_FILTERS):
        if any(isinstance(f, cls) for f in out):
            continue
        own = (instances or {}).get(tname)
        made = own if isinstance(own, cls) else cls(
            tname if own is None else f"{tname}-required", NoParams())
        assert isinstance(made, Filter)
        at = 0
        for _, before in reversed(REQUIRED_FILTERS[:i]):
            places = [j for j, f in enumerate(out) if isinstance(f, before)]
            if places:
                at = places[-1] + 1
                break
        out.insert(at, made)
    return filters if out == filters else out


def moved_filters(config: FleetConfig, file: str = "<config>") -> dict[str, tuple[list[str], str]]:
    """Per profile where `required_filters` moves listed filters ahead of a set-level one: the
    moved filters' names and the first set-level filter they now run before (``inferplane
    check`` notes them)."""
    instances = build_plugins(config, file)
    out: dict[str, tuple[list[str], str]] = {}
    for prof in config.profiles:
        listed: list[Filter] = []
        for r in prof.plugins:
            p = instances.get(r.ref)
            if isinstance(p, Filter):
                listed.append(p)
        first = next((j for j, f in enumerate(listed)
                      if not getattr(f, "per_endpoint", False)), None)
        if first is None:
            continue
        ran = {id(f): j for j, f in enumerate(required_filters(listed, instances))}
        moved = [f.name for f in listed[first + 1:]
                 if ran.get(id(f), -1) < ran[id(listed[first])]
                 and not any(g is f for g in listed[:first])]
        if moved:
            out[prof.name] = (list(dict.fromkeys(moved)), listed[first].name)
    return out


def unlisted_required(config: FleetConfig) -> dict[str, list[str]]:
    """Per profile that lacks some, the `REQUIRED_FILTERS` types (in that order) it lists no
    instance of: what `required_filters` adds to it (``inferplane check`` notes them)."""
    types = {spec.instance_name: spec.type for spec in config.plugins}
    out: dict[str, list[str]] = {}
    for prof in config.profiles:
        listed = {types.get(r.ref) for r in prof.plugins}
        missing = [tname for tname, _ in REQUIRED_FILTERS if tname not in listed]
        if missing:
            out[prof.name] = missing
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
        filters = required_filters(filters, instances)
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
