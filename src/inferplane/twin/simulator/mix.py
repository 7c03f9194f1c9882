"""The simulator's traffic mix: ``mix:`` entries resolved to tenants, classes, regions and models.

Each resolved entry is a :class:`TrafficShare`; the simulator draws one per trace request with
the entries' ``fraction`` weights (seeded), so the same mix always sends the same requests to the
same tenants and classes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from pydantic import ValidationError

from inferplane.config.loader import format_loc
from inferplane.config.schema import FleetConfig, MixEntry, TenantSpec, WorkloadClass
from inferplane.errors import ConfigError
from inferplane.types import ApiKind
from inferplane.yamlio import read_yaml

__all__ = ["SimulationError", "TrafficShare", "load_mix", "resolve_mix"]


class SimulationError(ValueError):
    """A simulation that cannot start (unknown profile, empty mix…); a user error."""


@dataclass(frozen=True, slots=True)
class TrafficShare:
    """One resolved ``mix:`` entry: who sends this share of the trace, and for which model."""

    tenant: str
    workload_class: WorkloadClass
    region: str | None
    fraction: float
    model: str
    allowed_jurisdictions: frozenset[str] | None
    api: ApiKind = "chat"  # "embeddings" for a model served as ``kind: embed``


def load_mix(path: str | Path) -> list[MixEntry]:
    """Read a YAML file with a ``mix:`` list (the fleet file's form); `ConfigError` if bad."""
    p = Path(path)
    # ConfigError naming the file and line if unreadable, not UTF-8 or not YAML (a repeated key
    # included, as in the fleet file)
    raw = read_yaml(p)
    if not isinstance(raw, dict) or not isinstance(raw.get("mix"), list):
        raise ConfigError(str(p), [("mix", "expected a mapping with a `mix:` list")])
    entries: list[MixEntry] = []
    problems: list[tuple[str, str]] = []
    for i, item in enumerate(raw["mix"]):
        try:
            entries.append(MixEntry.model_validate(item))
        except ValidationError as exc:
            problems += [(f"mix[{i}].{format_loc(e['loc'])}", e["msg"]) for e in exc.errors()]
    if problems:
        raise ConfigError(str(p), problems)
    return entries


def _default_model(config: FleetConfig) -> str:
    for sub in config.substrates:
        for ep in sub.endpoints:
            for m in ep.models:
                if m.kind == "generate":
                    return m.name
    raise SimulationError("the fleet serves no generative model to replay a trace against")


def resolve_mix(
    config: FleetConfig, entries: Sequence[MixEntry] | None = None, file: str = "<mix>"
) -> list[TrafficShare]:
    """Resolve ``entries`` (else the fleet's ``mix:``, else one share: the first tenant, or an
    unrestricted ``default`` tenant, with its default class) against the config."""
    tenants: dict[str, TenantSpec] = {t.name: t for t in config.tenants}
    classes = {c.name: c for c in config.classes}
    regions = {r.name for r in config.regions}
    served = {m.name: m.kind for s in config.substrates for e in s.endpoints for m in e.models}
    if entries is None:
        entries, file = config.mix, "<fleet mix>"
    if not entries:
        t = config.tenants[0] if config.tenants else None
        cls_name = t.default_class if t else "interactive"
        if cls_name not in classes:
            raise SimulationError(f"no traffic mix given and no class {cls_name!r} configured")
        entries = [
            MixEntry(tenant=t.name if t else "default", workload_class=cls_name, fraction=1.0)
        ]
    problems: list[tuple[str, str]] = []
    out: list[TrafficShare] = []
    for i, e in enumerate(entries):
        t = tenants.get(e.tenant)
        if t is None and (config.tenants or e.tenant != "default"):
            problems.append((f"mix[{i}].tenant", f"unknown tenant {e.tenant!r}"))
        if e.workload_class not in classes:
            problems.append((f"mix[{i}].class", f"unknown class {e.workload_class!r}"))
        if e.region is not None and regions and e.region not in regions:
            problems.append((f"mix[{i}].region", f"unknown region {e.region!r}"))
        if e.model is not None and e.model not in served:
            problems.append((f"mix[{i}].model", f"no endpoint serves model {e.model!r}"))
        if problems:
            continue
        allowed = t.allowed_jurisdictions if t is not None else None
        model = e.model or _default_model(config)
        out.append(
            TrafficShare(
                tenant=e.tenant,
                workload_class=classes[e.workload_class],
                region=e.region if e.region is not None else (t.region if t else None),
                fraction=e.fraction,
                model=model,
                allowed_jurisdictions=frozenset(allowed) if allowed is not None else None,
                api="embeddings" if served[model] == "embed" else "chat",
            )
        )
    if problems:
        raise ConfigError(file, problems)
    return out
