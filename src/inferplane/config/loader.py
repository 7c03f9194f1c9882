"""Load and check a fleet file. Every problem names the file, the path inside it and what is wrong.

Checks run in three passes, all at start-up: YAML syntax (with line and column), the schema
(pydantic, unknown keys forbidden), then cross-references (unique names, classes and profiles that
exist, known hardware and model profiles). Built-in classes, plugins and profiles from
``inferplane/data/defaults.yaml`` are merged under the file's own: an entry of the same name in the
file replaces the built-in one.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from inferplane.config.schema import FleetConfig
from inferplane.errors import ConfigError
from inferplane.yamlio import load_yaml as load_yaml  # the public name (bench/otel.py)
from inferplane.yamlio import parse_yaml
from inferplane.yamlio import read_text as read_text  # the public name (core, cli, twin)

_MERGED_SECTIONS = ("classes", "plugins", "profiles")


def format_loc(loc: Sequence[int | str]) -> str:
    """``("substrates", 0, "endpoints", 1, "url")`` → ``substrates[0].endpoints[1].url``."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


@cache
def builtin_defaults() -> dict[str, Any]:
    """The built-in classes, plugins and profiles shipped with the package."""
    text = resources.files("inferplane").joinpath("data/defaults.yaml").read_text("utf-8")
    data = load_yaml(text)  # a key repeated in the shipped file is refused too
    assert isinstance(data, dict)
    return data


def _entry_name(entry: Any) -> str | None:
    """The name an entry is merged by (``name``, else ``type``); None when it has no string name
    (the schema then reports what is wrong with it)."""
    if not isinstance(entry, dict):
        return None
    name = entry.get("name") or entry.get("type")
    return name if isinstance(name, str) else None


def _merge_defaults(raw: dict[str, Any]) -> dict[str, Any]:
    merged = dict(raw)
    defaults = builtin_defaults()
    for section in _MERGED_SECTIONS:
        own = raw.get(section)
        if own is not None and not isinstance(own, list):
            continue  # the schema reports the wrong type with its path
        own_list: list[Any] = list(own or [])
        names = {_entry_name(e) for e in own_list}
        extra = [e for e in defaults.get(section, []) if _entry_name(e) not in names]
        merged[section] = own_list + extra
    return merged


def _relative_to(base_dir: Path, path: object) -> object:
    if isinstance(path, str) and path and not Path(path).expanduser().is_absolute():
        return str(base_dir / path)
    return path


def _resolve_paths(raw: dict[str, Any], base_dir: Path) -> None:
    """Make relative file paths (a model's ``tokenizer``, an endpoint's ``api_key_file``,
    ``hardware_profiles``) relative to ``base_dir`` (the fleet file's folder), in place; anything
    of the wrong shape is left for the schema to report."""
    profiles = raw.get("hardware_profiles")
    if isinstance(profiles, list):
        raw["hardware_profiles"] = [_relative_to(base_dir, p) for p in profiles]
    subs = raw.get("substrates")
    for s in subs if isinstance(subs, list) else []:
        eps = s.get("endpoints") if isinstance(s, dict) else None
        for e in eps if isinstance(eps, list) else []:
            if isinstance(e, dict) and "api_key_file" in e:
                e["api_key_file"] = _relative_to(base_dir, e["api_key_file"])
            models = e.get("models") if isinstance(e, dict) else None
            for m in models if isinstance(models, list) else []:
                if isinstance(m, dict) and "tokenizer" in m:
                    m["tokenizer"] = _relative_to(base_dir, m["tokenizer"])


def parse_config(
    text: str,
    file: str = "<config>",
    *,
    with_defaults: bool = True,
    base_dir: str | Path | None = None,
) -> FleetConfig:
    """Parse YAML text into a checked `FleetConfig`, or raise `ConfigError`. Relative file paths
    in it (a model's ``tokenizer``) are taken relative to ``base_dir`` (default: the current
    directory)."""
    raw = parse_yaml(text, file)  # a repeated key is refused, naming its line
    if not isinstance(raw, dict):
        raise ConfigError(file, [("", "the top level must be a mapping")])
    if with_defaults:
        raw = _merge_defaults(raw)
    if base_dir is not None:
        _resolve_paths(raw, Path(base_dir))
    try:
        config = FleetConfig.model_validate(raw)
    except ValidationError as exc:
        problems = [(format_loc(e["loc"]), e["msg"]) for e in exc.errors()]
        raise ConfigError(file, problems) from None
    problems = list(check_references(config))
    if problems:
        raise ConfigError(file, problems)
    return config


def load_config(path: str | Path) -> FleetConfig:
    """Read and check a fleet file."""
    p = Path(path)
    return parse_config(read_text(p), str(p), base_dir=p.parent)


def _duplicates(section: str, names: Iterable[tuple[str, str]]) -> Iterable[tuple[str, str]]:
    seen: dict[str, str] = {}
    for path, name in names:
        if name in seen:
            yield path, f"duplicate {section}: {name!r} (first at {seen[name]})"
        else:
            seen[name] = path


def check_references(c: FleetConfig) -> Iterable[tuple[str, str]]:
    """Cross-field checks the schema cannot express. Yields (path, problem)."""
    from inferplane.physics import HARDWARE, MODELS  # physics sits beside config, below fleet
    from inferplane.physics.calibration import load_hardware_profile
    from inferplane.tokenization import load_tokenizer

    yield from _duplicates("region", ((f"regions[{i}]", r.name) for i, r in enumerate(c.regions)))
    yield from _duplicates(
        "substrate", ((f"substrates[{i}]", s.name) for i, s in enumerate(c.substrates))
    )
    yield from _duplicates(
        "endpoint",
        (
            (f"substrates[{i}].endpoints[{j}]", e.name)
            for i, s in enumerate(c.substrates)
            for j, e in enumerate(s.endpoints)
        ),
    )
    yield from _duplicates(
        "endpoint url",
        (
            (f"substrates[{i}].endpoints[{j}].url", e.url)
            for i, s in enumerate(c.substrates)
            for j, e in enumerate(s.endpoints)
        ),
    )
    yield from _duplicates("tenant", ((f"tenants[{i}]", t.name) for i, t in enumerate(c.tenants)))
    yield from _duplicates("class", ((f"classes[{i}]", k.name) for i, k in enumerate(c.classes)))
    yield from _duplicates(
        "plugin", ((f"plugins[{i}]", p.instance_name) for i, p in enumerate(c.plugins))
    )
    yield from _duplicates(
        "profile", ((f"profiles[{i}]", p.name) for i, p in enumerate(c.profiles))
    )
    keys = [
        (f"tenants[{i}].api_keys[{j}]", k)
        for i, t in enumerate(c.tenants)
        for j, k in enumerate(t.api_keys)
    ]
    for path, _ in _duplicates("api key", keys):
        yield path, "the same API key hash belongs to two tenants"

    regions = {r.name for r in c.regions}
    classes = {k.name for k in c.classes}
    profiles = {p.name for p in c.profiles}
    plugins = {p.instance_name for p in c.plugins}
    tenants = {t.name for t in c.tenants}
    models = {m.name for s in c.substrates for e in s.endpoints for m in e.models}
    tokenizers: dict[str, tuple[str, str]] = {}  # model -> (tokenizer, where first named)
    kinds: dict[str, tuple[str, str]] = {}  # model -> (kind, where first given)

    yield from _duplicates(
        "model alias", ((f"model_aliases[{i}]", a.name) for i, a in enumerate(c.model_aliases))
    )
    for i, alias in enumerate(c.model_aliases):
        if alias.name in models:
            yield f"model_aliases[{i}].name", f"{alias.name!r} is a served model's name"
        for j, tier in enumerate(alias.tiers):
            if tier.model not in models:
                yield f"model_aliases[{i}].tiers[{j}].model", f"no endpoint serves {tier.model!r}"
        for j, tier_rule in enumerate(alias.rules):
            for k, cls_name in enumerate(tier_rule.classes or []):
                if cls_name not in classes:
                    yield (f"model_aliases[{i}].rules[{j}].classes[{k}]",
                           f"unknown class {cls_name!r}")
            for k, t_name in enumerate(tier_rule.tenants or []):
                if t_name not in tenants:
                    yield (f"model_aliases[{i}].rules[{j}].tenants[{k}]",
                           f"unknown tenant {t_name!r}")

    for i, r in enumerate(c.regions):
        for other in r.rtt_ms:
            if other not in regions:
                yield f"regions[{i}].rtt_ms.{other}", f"unknown region {other!r}"
    calibrated: dict[str, str] = {}  # profile name -> where it was loaded
    for i, path in enumerate(c.hardware_profiles):
        try:
            hw = load_hardware_profile(path)
        except ValueError as exc:
            yield f"hardware_profiles[{i}]", str(exc)
            continue
        if hw.name in calibrated:
            yield f"hardware_profiles[{i}]", (
                f"profile {hw.name!r} is already loaded from {calibrated[hw.name]}"
            )
        calibrated.setdefault(hw.name, path)
    known_hardware = sorted({*HARDWARE, *calibrated})
    for i, s in enumerate(c.substrates):
        if regions and s.region not in regions:
            yield (
                f"substrates[{i}].region",
                f"unknown region {s.region!r}; known: {sorted(regions)}",
            )
        if s.hardware.lower() not in HARDWARE and s.hardware not in calibrated:
            yield (
                f"substrates[{i}].hardware",
                f"unknown hardware profile {s.hardware!r}; known: {known_hardware}",
            )
        for j, e in enumerate(s.endpoints):
            if e.dialect == "anthropic" and e.kv_events is not None:
                yield (
                        f"substrates[{i}].endpoints[{j}].kv_events",
                        "an anthropic-dialect endpoint publishes no KV events",
                    )
            for k, m in enumerate(e.models):
                if e.dialect == "anthropic" and m.kind != "generate":
                    yield (
                        f"substrates[{i}].endpoints[{j}].models[{k}].kind",
                        f"model {m.name!r} is an {m.kind} model, but the anthropic dialect "
                        "(Messages API) serves chat only",
                    )
                where = f"substrates[{i}].endpoints[{j}].models[{k}].kind"
                first_kind = kinds.setdefault(m.name, (m.kind, where))
                if first_kind[0] != m.kind:
                    yield where, (
                        f"model {m.name!r} is {m.kind!r} here but {first_kind[0]!r} at "
                        f"{first_kind[1]}; one model name has one kind (the gateway answers "
                        "its API from it)"
                    )
                if m.tokenizer is not None:
                    where = f"substrates[{i}].endpoints[{j}].models[{k}].tokenizer"
                    try:
                        load_tokenizer(m.tokenizer)
                    except ValueError as exc:
                        yield where, str(exc)
                    first = tokenizers.setdefault(m.name, (m.tokenizer, where))
                    if first[0] != m.tokenizer:
                        yield where, (
                            f"model {m.name!r} already has tokenizer {first[0]!r} (at {first[1]}); "
                            "one model name has one tokenizer"
                        )
                if m.physics_profile.lower() not in MODELS:
                    field = "profile" if m.profile else "name"
                    yield (
                        f"substrates[{i}].endpoints[{j}].models[{k}].{field}",
                        f"unknown model profile {m.physics_profile!r}; known: {sorted(MODELS)} "
                        "(set `profile:` to one of them)",
                    )
    if c.gateway.default_profile not in profiles:
        yield "gateway.default_profile", f"unknown profile {c.gateway.default_profile!r}"
    for i, t in enumerate(c.tenants):
        if t.default_class not in classes:
            yield f"tenants[{i}].default_class", f"unknown class {t.default_class!r}"
        if t.region is not None and regions and t.region not in regions:
            yield f"tenants[{i}].region", f"unknown region {t.region!r}"
    yield from _duplicates(
        "data source", ((f"data_sources[{i}]", d.name) for i, d in enumerate(c.data_sources))
    )
    for i, ds in enumerate(c.data_sources):
        if regions and ds.region not in regions:
            yield (f"data_sources[{i}].region",
                   f"unknown region {ds.region!r}; known: {sorted(regions)}")
    sources = {d.name for d in c.data_sources}
    for i, wc in enumerate(c.classes):
        if wc.data_source is not None and wc.data_source not in sources:
            yield (f"classes[{i}].data_source",
                   f"unknown data source {wc.data_source!r}; known: {sorted(sources)}")
        if wc.profile is not None and wc.profile not in profiles:
            yield (
                f"classes[{i}].profile",
                f"unknown profile {wc.profile!r}; known: {sorted(profiles)}",
            )
    if c.batch.enabled and c.batch.workload_class not in classes:
        yield (
            "batch.workload_class",
            f"unknown class {c.batch.workload_class!r}; known: {sorted(classes)}",
        )
    for i, rule in enumerate(c.class_rules):
        if rule.workload_class not in classes:
            yield f"class_rules[{i}].class", f"unknown class {rule.workload_class!r}"
    for i, p in enumerate(c.profiles):
        for j, ref in enumerate(p.plugins):
            if ref.ref not in plugins:
                yield (
                    f"profiles[{i}].plugins[{j}].ref",
                    f"unknown plugin {ref.ref!r}; defined: {sorted(plugins)}",
                )
    for i, mx in enumerate(c.mix):
        if mx.tenant not in tenants:
            yield f"mix[{i}].tenant", f"unknown tenant {mx.tenant!r}"
        if mx.workload_class not in classes:
            yield f"mix[{i}].class", f"unknown class {mx.workload_class!r}"
        if mx.region is not None and regions and mx.region not in regions:
            yield f"mix[{i}].region", f"unknown region {mx.region!r}"
        if mx.model is not None and mx.model not in models:
            yield f"mix[{i}].model", f"no endpoint serves model {mx.model!r}"
