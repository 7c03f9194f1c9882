"""The fleet file loader, the policy builder and `inferplane check`: every problem is a
`ConfigError` naming the file, the path inside it and what is wrong, never a stack trace."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml
from pydantic import BaseModel, ConfigDict, Field
from typer.testing import CliRunner

from inferplane.cli import app
from inferplane.config.loader import (
    builtin_defaults,
    format_loc,
    load_config,
    load_yaml,
    parse_config,
)
from inferplane.config.schema import FleetConfig
from inferplane.errors import ConfigError
from inferplane.placement.build import REQUIRED_FILTERS, build_policies
from inferplane.placement.framework import (
    REGISTRY,
    CycleState,
    FilterResult,
    MaxScorePicker,
    Plugin,
    Scored,
)
from inferplane.placement.plugins.basic import LeastRequest, ModelServed
from tests.builders import MINIMAL_YAML, key_hash, load_file

FILE = "fleet.yaml"

Data = dict[str, Any]


def base() -> Data:
    """A valid file that uses every section, as plain data to break one piece at a time."""
    return {
        "gateway": {"port": 8080, "default_profile": "default"},
        "regions": [
            {"name": "eu-west", "rtt_ms": {"us-east": 80}},
            {"name": "us-east"},
        ],
        "substrates": [
            {
                "name": "eu-h100",
                "kind": "gpu",
                "hardware": "h100",
                "region": "eu-west",
                "jurisdiction": "eu",
                "capacity_class": "reserved",
                "cost": {"hourly_usd": 3.0},
                "endpoints": [
                    {
                        "name": "eu-0",
                        "url": "http://127.0.0.1:9001",
                        "engine": "vllm",
                        "models": [{"name": "llama-3.1-8b", "max_context": 8192}],
                    },
                    {
                        "name": "eu-1",
                        "url": "http://127.0.0.1:9002",
                        "models": [
                            {"name": "llama-3.1-8b", "max_context": 8192, "precision": "fp8"}
                        ],
                    },
                ],
            },
            {
                "name": "us-api",
                "kind": "provider-api",
                "hardware": "provider-api",
                "region": "us-east",
                "jurisdiction": "us",
                "capacity_class": "burst",
                "cost": {"input_per_mtok": 0.1, "output_per_mtok": 0.3},
                "endpoints": [
                    {
                        "name": "us-0",
                        "url": "https://api.example.com",
                        "engine": "openai-compatible",
                        "models": [
                            {"name": "big", "profile": "llama-3.1-70b", "max_context": 131072}
                        ],
                    }
                ],
            },
        ],
        "tenants": [
            {"name": "acme", "api_keys": [key_hash("a")], "region": "eu-west"},
            {"name": "globex", "api_keys": [key_hash("g")], "default_class": "gold"},
        ],
        "classes": [{"name": "gold", "ttft_slo_ms": 300, "profile": "fast"}],
        "class_rules": [{"class": "batch", "min_prompt_tokens": 8000}],
        "plugins": [{"type": "least-request", "name": "lr"}],
        "profiles": [{"name": "fast", "plugins": [{"ref": "health"}, {"ref": "lr", "weight": 2}]}],
        "mix": [
            {"tenant": "acme", "class": "gold", "region": "eu-west", "fraction": 0.5},
            {"tenant": "globex", "class": "batch", "fraction": 0.5, "model": "big"},
        ],
    }


@pytest.mark.parametrize("window", [60, 60.0, None])
def test_the_skip_window_takes_its_bound_and_null(window: float | None) -> None:
    """``gateway.health_skip_window_s`` accepts 60 s exactly (the bound is inclusive) and an
    explicit null (the default: 3 x health_interval_s)."""
    data = base()
    data.setdefault("gateway", {})["health_skip_window_s"] = window
    assert parse_config(dump(data)).gateway.health_skip_window_s == window


def dump(data: Data) -> str:
    return yaml.safe_dump(data, sort_keys=False)


def at(data: Any, path: str) -> Any:
    """The container at a dotted path (``substrates.0.endpoints``)."""
    for part in path.split(".") if path else []:
        data = data[int(part)] if isinstance(data, list) else data[part]
    return data


def put(path: str, value: Any) -> Callable[[Data], None]:
    parent, _, key = path.rpartition(".")

    def apply(d: Data) -> None:
        container = at(d, parent)
        if isinstance(container, list):
            container[int(key)] = value
        else:
            container[key] = value

    return apply


def drop(path: str) -> Callable[[Data], None]:
    parent, _, key = path.rpartition(".")

    def apply(d: Data) -> None:
        container = at(d, parent)
        del container[int(key) if isinstance(container, list) else key]

    return apply


def append(path: str, value: Any) -> Callable[[Data], None]:
    def apply(d: Data) -> None:
        at(d, path).append(copy.deepcopy(value))

    return apply


def copy_of(src: str, dst_list: str, **changes: Any) -> Callable[[Data], None]:
    """Append a copy of the entry at ``src`` to the list at ``dst_list``, with changes."""

    def apply(d: Data) -> None:
        entry = copy.deepcopy(at(d, src))
        entry.update(changes)
        at(d, dst_list).append(entry)

    return apply


def error_of(text: str, file: str = FILE) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        parse_config(text, file)
    return info.value


def assert_names(err: ConfigError, path: str, problem: str, file: str = FILE) -> None:
    """The error names the file, the path and the problem on one line, without a chained
    exception (the CLI prints the message only; nothing to show as a stack trace)."""
    lines = str(err).splitlines()
    expected = f"{file}: {path}: " if path else f"{file}: "
    matching = [ln for ln in lines if ln.startswith(expected) and problem in ln]
    assert matching, f"no line starting {expected!r} containing {problem!r} in:\n{err}"
    assert (path, matching[0][len(expected) :]) in err.problems or not path
    assert err.file == file
    assert err.__cause__ is None
    assert err.__context__ is None or err.__suppress_context__


def test_base_file_is_valid() -> None:
    config = parse_config(dump(base()), FILE)
    assert [s.name for s in config.substrates] == ["eu-h100", "us-api"]
    assert config.substrates[1].endpoints[0].models[0].physics_profile == "llama-3.1-70b"


# (id, mutation, path, problem)
CASES: list[tuple[str, Callable[[Data], None], str, str]] = [
    # unknown keys, anywhere
    ("typo-top", put("substrats", []), "substrats", "Extra inputs are not permitted"),
    ("typo-gateway", put("gateway.prot", 1), "gateway.prot", "Extra inputs"),
    (
        "typo-endpoint",
        put("substrates.0.endpoints.1.urll", "http://x:1"),
        "substrates[0].endpoints[1].urll",
        "Extra inputs",
    ),
    (
        "typo-model",
        put("substrates.0.endpoints.0.models.0.max_ctx", 1),
        "substrates[0].endpoints[0].models[0].max_ctx",
        "Extra inputs",
    ),
    ("typo-cost", put("substrates.1.cost.hourly", 1), "substrates[1].cost.hourly", "Extra"),
    ("typo-tenant", put("tenants.0.keys", []), "tenants[0].keys", "Extra inputs"),
    ("typo-class", put("classes.0.ttft_ms", 1), "classes[0].ttft_ms", "Extra inputs"),
    ("typo-rule", put("class_rules.0.min_tokens", 1), "class_rules[0].min_tokens", "Extra"),
    ("typo-plugin", put("plugins.0.params", {}), "plugins[0].params", "Extra inputs"),
    ("typo-ref", put("profiles.0.plugins.1.weigth", 1), "profiles[0].plugins[1].weigth", "Extra"),
    ("typo-mix", put("mix.0.share", 1), "mix[0].share", "Extra inputs"),
    ("typo-region", put("regions.0.rtt", {}), "regions[0].rtt", "Extra inputs"),
    # wrong types and values
    ("port-type", put("gateway.port", "http"), "gateway.port", "valid integer"),
    ("port-range", put("gateway.port", 70000), "gateway.port", "less than or equal to 65535"),
    (
        "skip-window-bound",
        put("gateway.health_skip_window_s", 300),
        "gateway.health_skip_window_s",
        "300 s is over 60 s: a healthy endpoint with occasional traffic would go unprobed",
    ),
    (
        "skip-window-default-capped",
        put("gateway.health_skip_window_s", 300),
        "gateway.health_skip_window_s",
        "(null: 3 x health_interval_s, at most max(60, health_interval_s))",
    ),
    ("section-type", put("substrates", {"a": 1}), "substrates", "valid list"),
    ("merged-section-type", put("classes", "gold"), "classes", "valid list"),
    ("entry-type", put("substrates.0.endpoints.0", "eu-0"), "substrates[0].endpoints[0]", "dict"),
    ("list-name", put("classes.0.name", [1, 2]), "classes[0].name", "valid string"),
    ("dict-type", put("plugins.0.type", {"a": 1}), "plugins[0].type", "valid string"),
    (
        "max-concurrency",
        put("substrates.0.endpoints.0.max_concurrency", 0),
        "substrates[0].endpoints[0].max_concurrency",
        "greater than 0",
    ),
    (
        "bad-url",
        put("substrates.0.endpoints.1.url", "ftp://x"),
        "substrates[0].endpoints[1].url",
        "should match pattern",
    ),
    ("bad-name", put("substrates.0.name", "has space"), "substrates[0].name", "match pattern"),
    ("no-endpoints", put("substrates.0.endpoints", []), "substrates[0].endpoints", "at least 1"),
    ("fraction", put("mix.0.fraction", 0), "mix[0].fraction", "greater than 0"),
    (
        "weight",
        put("profiles.0.plugins.1.weight", -1),
        "profiles[0].plugins[1].weight",
        "greater than or equal to 0",
    ),
    ("token-estimate", put("gateway.token_estimate", "bytes"), "gateway.token_estimate", "'chars'"),
    # missing required fields
    ("missing-substrates", drop("substrates"), "substrates", "Field required"),
    ("missing-url", drop("substrates.0.endpoints.1.url"), "substrates[0].endpoints[1].url", "Fie"),
    (
        "missing-max-context",
        drop("substrates.0.endpoints.0.models.0.max_context"),
        "substrates[0].endpoints[0].models[0].max_context",
        "Field required",
    ),
    ("missing-kind", drop("substrates.1.kind"), "substrates[1].kind", "Field required"),
    ("missing-cost", drop("substrates.0.cost"), "substrates[0].cost", "Field required"),
    ("missing-keys", drop("tenants.1.api_keys"), "tenants[1].api_keys", "Field required"),
    ("missing-rule-class", drop("class_rules.0.class"), "class_rules[0].class", "Field required"),
    ("missing-ref", drop("profiles.0.plugins.0.ref"), "profiles[0].plugins[0].ref", "required"),
    ("missing-plugin-type", drop("plugins.0.type"), "plugins[0].type", "Field required"),
    # enums
    ("kind", put("substrates.0.kind", "tpu"), "substrates[0].kind", "Input should be 'gpu'"),
    (
        "engine",
        put("substrates.0.endpoints.0.engine", "tgi"),
        "substrates[0].endpoints[0].engine",
        "Input should be 'vllm'",
    ),
    (
        "capacity-class",
        put("substrates.1.capacity_class", "spot"),
        "substrates[1].capacity_class",
        "Input should be 'reserved' or 'burst'",
    ),
    (
        "precision",
        put("substrates.0.endpoints.1.models.0.precision", "fp4"),
        "substrates[0].endpoints[1].models[0].precision",
        "Input should be 'fp32'",
    ),
    ("priority", put("classes.0.priority", "urgent"), "classes[0].priority", "'critical'"),
    ("rule-api", put("class_rules.0.api", "images"), "class_rules[0].api", "'chat'"),
    # cost model: exactly one form
    (
        "cost-both",
        put("substrates.0.cost", {"hourly_usd": 1, "input_per_mtok": 1}),
        "substrates[0].cost",
        "not both",
    ),
    ("cost-neither", put("substrates.1.cost", {}), "substrates[1].cost", "or hourly_usd"),
    (
        "cost-cached-only",
        put("substrates.1.cost", {"cached_input_per_mtok": 0.05}),
        "substrates[1].cost",
        "or hourly_usd",
    ),
    # API keys are stored as hashes
    ("plain-key", put("tenants.0.api_keys", ["sk-plain"]), "tenants[0].api_keys", "hash-key"),
    (
        "upper-hex-key",
        put("tenants.0.api_keys", [key_hash("a"), key_hash("b").upper()]),
        "tenants[0].api_keys",
        "api_keys[1] must be 'sha256:' + 64 lowercase hex",
    ),
    ("no-keys", put("tenants.0.api_keys", []), "tenants[0].api_keys", "at least 1"),
    # duplicate names
    ("dup-region", append("regions", {"name": "eu-west"}), "regions[2]", "duplicate region"),
    (
        "dup-substrate",
        copy_of("substrates.0", "substrates"),
        "substrates[2]",
        "duplicate substrate: 'eu-h100' (first at substrates[0])",
    ),
    (
        "dup-endpoint",
        copy_of("substrates.0.endpoints.0", "substrates.1.endpoints", url="http://h:1"),
        "substrates[1].endpoints[1]",
        "duplicate endpoint: 'eu-0' (first at substrates[0].endpoints[0])",
    ),
    (
        "dup-endpoint-url",
        put("substrates.0.endpoints.1.url", "http://127.0.0.1:9001/"),
        "substrates[0].endpoints[1].url",
        "duplicate endpoint url: 'http://127.0.0.1:9001'",
    ),
    (
        "dup-tenant",
        append("tenants", {"name": "acme", "api_keys": [key_hash("x")]}),
        "tenants[2]",
        "duplicate tenant: 'acme'",
    ),
    ("dup-class", append("classes", {"name": "gold"}), "classes[1]", "duplicate class: 'gold'"),
    (
        "dup-plugin",
        append("plugins", {"type": "random", "name": "lr"}),
        "plugins[1]",
        "duplicate plugin: 'lr'",
    ),
    (
        "dup-plugin-by-type",
        put("plugins", [{"type": "random"}, {"type": "random"}]),
        "plugins[1]",
        "duplicate plugin: 'random'",
    ),
    (
        "dup-profile",
        copy_of("profiles.0", "profiles"),
        "profiles[1]",
        "duplicate profile: 'fast'",
    ),
    (
        "dup-api-key",
        put("tenants.1.api_keys", [key_hash("g"), key_hash("a")]),
        "tenants[1].api_keys[1]",
        "the same API key hash belongs to two tenants",
    ),
    # references
    ("substrate-region", put("substrates.1.region", "ap-south"), "substrates[1].region", "unkno"),
    ("tenant-region", put("tenants.0.region", "mars"), "tenants[0].region", "unknown region"),
    ("rtt-region", put("regions.0.rtt_ms", {"moon": 1}), "regions[0].rtt_ms.moon", "unknown reg"),
    (
        "hardware",
        put("substrates.0.hardware", "b200"),
        "substrates[0].hardware",
        "unknown hardware profile 'b200'",
    ),
    (
        "model-profile",
        put("substrates.0.endpoints.0.models.0.name", "mystery-7b"),
        "substrates[0].endpoints[0].models[0].name",
        "unknown model profile 'mystery-7b'",
    ),
    (
        "model-profile-override",
        put("substrates.1.endpoints.0.models.0.profile", "gpt-9"),
        "substrates[1].endpoints[0].models[0].profile",
        "unknown model profile 'gpt-9'",
    ),
    (
        "default-profile",
        put("gateway.default_profile", "fastest"),
        "gateway.default_profile",
        "unknown profile 'fastest'",
    ),
    ("tenant-class", put("tenants.0.default_class", "vip"), "tenants[0].default_class", "unknown"),
    ("class-profile", put("classes.0.profile", "nope"), "classes[0].profile", "unknown profile"),
    ("rule-class", put("class_rules.0.class", "bulk"), "class_rules[0].class", "unknown class"),
    (
        "profile-ref",
        put("profiles.0.plugins.1.ref", "least"),
        "profiles[0].plugins[1].ref",
        "unknown plugin 'least'",
    ),
    ("mix-tenant", put("mix.0.tenant", "initech"), "mix[0].tenant", "unknown tenant 'initech'"),
    ("mix-class", put("mix.1.class", "silver"), "mix[1].class", "unknown class 'silver'"),
    ("mix-region", put("mix.0.region", "mars"), "mix[0].region", "unknown region 'mars'"),
    ("mix-model", put("mix.1.model", "gpt-9"), "mix[1].model", "no endpoint serves model 'gpt-9'"),
    (
        "batch-class",
        put("batch", {"workload_class": "bulk"}),
        "batch.workload_class",
        "unknown class 'bulk'",
    ),
    # addresses
    (
        "redis-url",
        put("admission", {"store": "redis", "redis_url": "127.0.0.1:6379"}),
        "admission.redis_url",
        "should match pattern",
    ),
    (
        "kv-events-address",
        put("substrates.0.endpoints.0.kv_events", "127.0.0.1:5557"),
        "substrates[0].endpoints[0].kv_events",
        "should match pattern",
    ),
]


@pytest.mark.parametrize(
    ("mutate", "path", "problem"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_every_problem_names_file_path_and_problem(
    mutate: Callable[[Data], None], path: str, problem: str
) -> None:
    data = base()
    mutate(data)
    assert_names(error_of(dump(data)), path, problem)


def test_all_reference_problems_are_reported_together() -> None:
    data = base()
    put("mix.0.tenant", "initech")(data)
    put("classes.0.profile", "nope")(data)
    put("substrates.0.hardware", "b200")(data)
    err = error_of(dump(data))
    paths = [p for p, _ in err.problems]
    assert paths == ["substrates[0].hardware", "classes[0].profile", "mix[0].tenant"]


@pytest.mark.parametrize(
    ("text", "where", "problem"),
    [
        ("substrates: [\n  {name: a,\n", "line 3, column 1", "invalid YAML"),
        ("gateway:\n  port: 1\n   host: x\n", "line 3, column 8", "invalid YAML: mapping values"),
        ("a: 1\n\tb: 2\n", "line 2, column 1", "invalid YAML"),
        ("a: 1\n---\nb: 2\n", "line 2, column 1", "invalid YAML"),
        ("a: *nope\n", "line 1, column 4", "invalid YAML"),
        ("gateway: {}\nregions: []\ngateway: {}\n", "line 3, column 1", "duplicate key 'gateway'"),
        (
            MINIMAL_YAML.replace("    region: eu-west\n", "    region: eu-west\n    region: us\n"),
            "line 6, column 5",
            "invalid YAML: duplicate key 'region'",
        ),
    ],
    ids=[
        "unclosed",
        "indent",
        "tab",
        "two-documents",
        "undefined-alias",
        "duplicate-key",
        "duplicate-nested-key",
    ],
)
def test_invalid_yaml_names_line_and_column(text: str, where: str, problem: str) -> None:
    assert_names(error_of(text), where, problem)


@pytest.mark.parametrize("text", ["", "# only a comment\n", "- a\n- b\n", "just text\n", "42\n"])
def test_top_level_must_be_a_mapping(text: str) -> None:
    err = error_of(text)
    assert str(err) == f"{FILE}: the top level must be a mapping"


def test_merge_keys_may_be_overridden() -> None:
    text = MINIMAL_YAML.replace(
        "    cost: {hourly_usd: 3.0}\n",
        "    cost: &c {hourly_usd: 3.0}\n    emulation_cost: {<<: *c, hourly_usd: 4.0}\n",
    )
    # YAML merge keys are not duplicates; the schema then rejects the made-up key itself.
    assert error_of(text).problems == [
        ("substrates[0].emulation_cost", "Extra inputs are not permitted")
    ]


def test_load_yaml_is_safe_load_that_refuses_a_key_given_twice() -> None:
    """The public loader (bench/otel.py reads its config fragments with it): what yaml.safe_load
    reads, except a repeated key, refused with its line; merge keys are not repeats."""
    text = "a: &x {b: 1, c: [1, 2]}\nd: {<<: *x, b: 2}\n"
    assert load_yaml(text) == yaml.safe_load(text) == {
        "a": {"b": 1, "c": [1, 2]}, "d": {"b": 2, "c": [1, 2]}}
    with pytest.raises(yaml.constructor.ConstructorError, match="duplicate key 'b'") as info:
        load_yaml("a: 1\nn:\n  b: 1\n  b: 2\n")
    assert info.value.problem_mark is not None and info.value.problem_mark.line == 3
    with pytest.raises(yaml.constructor.ConstructorError):  # a SafeLoader: no Python objects
        load_yaml("!!python/object/apply:os.getcwd []\n")


def test_non_string_top_level_key() -> None:
    err = error_of(MINIMAL_YAML + "1: x\n")
    assert err.problems == [("[1]", "Keys should be strings")]


def test_several_schema_problems_listed_one_per_line() -> None:
    data = base()
    put("gateway.port", "x")(data)
    put("substrates.0.kind", "tpu")(data)
    err = error_of(dump(data))
    assert str(err).splitlines() == [
        f"{FILE}: gateway.port: Input should be a valid integer, unable to parse string as an "
        "integer",
        f"{FILE}: substrates[0].kind: Input should be 'gpu', 'low-latency', 'giant-context', "
        "'provider-api', 'sovereign-onprem' or 'cpu'",
    ]


# -- files -------------------------------------------------------------------------------------


def test_load_minimal_file(tmp_path: Path) -> None:
    path = tmp_path / "min.yaml"
    path.write_text(MINIMAL_YAML)
    config = load_config(path)
    assert [e.name for s in config.substrates for e in s.endpoints] == ["e"]
    assert config.gateway.default_profile == "default"
    assert config.gateway.port == 8080
    assert config.tenants == [] and config.mix == []


def test_load_errors_name_the_file(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(MINIMAL_YAML.replace("kind: gpu", "kind: tpu"))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert_names(info.value, "substrates[0].kind", "Input should be", file=str(path))


@pytest.mark.parametrize(
    ("make", "problem"),
    [
        (lambda p: p / "missing.yaml", "cannot read: No such file or directory"),
        (lambda p: p, "cannot read: Is a directory"),
    ],
    ids=["missing", "directory"],
)
def test_unreadable_file(tmp_path: Path, make: Callable[[Path], Path], problem: str) -> None:
    path = make(tmp_path)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == f"{path}: {problem}"
    assert info.value.__suppress_context__


def test_non_utf8_file(tmp_path: Path) -> None:
    path = tmp_path / "latin1.yaml"
    path.write_bytes(MINIMAL_YAML.replace("name: s", "name: caf\xe9").encode("latin-1"))
    line = MINIMAL_YAML[: MINIMAL_YAML.index("name: s")].count("\n") + 1
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == f"{path}: line {line}: not UTF-8 text"
    assert info.value.__suppress_context__


# -- built-in classes, plugins and profiles -----------------------------------------------------


def test_builtins_are_merged_into_a_minimal_file() -> None:
    config = parse_config(MINIMAL_YAML)
    defaults = builtin_defaults()
    assert [c.name for c in config.classes] == [c["name"] for c in defaults["classes"]]
    assert [p.instance_name for p in config.plugins] == [p["type"] for p in defaults["plugins"]]
    assert [p.name for p in config.profiles] == [p["name"] for p in defaults["profiles"]]
    assert {"interactive", "batch", "embeddings", "agent-step"} <= {c.name for c in config.classes}


def test_own_entry_replaces_the_builtin_of_the_same_name() -> None:
    text = MINIMAL_YAML + (
        "classes: [{name: interactive, ttft_slo_ms: 123}, {name: gold}]\n"
        "plugins: [{type: random, name: least-request}]\n"
        "profiles: [{name: default, plugins: [{ref: health}, {ref: least-request}]}]\n"
    )
    config = parse_config(text)
    classes = {c.name: c for c in config.classes}
    assert [c.name for c in config.classes].count("interactive") == 1
    assert classes["interactive"].ttft_slo_ms == 123
    assert classes["interactive"].itl_slo_ms is None  # replaced whole, not merged field by field
    assert "batch" in classes and "gold" in classes
    assert [c.name for c in config.classes][:2] == ["interactive", "gold"]  # own entries first
    lr = [p for p in config.plugins if p.instance_name == "least-request"]
    assert len(lr) == 1 and lr[0].type == "random"
    default = next(p for p in config.profiles if p.name == "default")
    assert [r.ref for r in default.plugins] == ["health", "least-request"]


def test_without_defaults_nothing_is_merged() -> None:
    text = MINIMAL_YAML + (
        "gateway: {default_profile: p}\nplugins: [{type: random}]\n"
        "profiles: [{name: p, plugins: [{ref: random}]}]\nbatch: {enabled: false}\n"
    )
    config = parse_config(text, with_defaults=False)
    assert config.classes == [] and [p.type for p in config.plugins] == ["random"]


def test_builtin_defaults_are_valid_and_build() -> None:
    policies = build_policies(parse_config(MINIMAL_YAML))
    assert set(policies) == {p["name"] for p in builtin_defaults()["profiles"]}
    assert {"default", "round-robin", "least-request", "random"} <= set(policies)
    assert policies["round-robin"].picker.name == "round-robin"
    assert [f.name for f in policies["default"].filters][:3] == [
        "model-served",
        "context-window",
        "health",
    ]


@pytest.mark.parametrize(
    ("loc", "text"),
    [
        (("substrates", 0, "endpoints", 1, "url"), "substrates[0].endpoints[1].url"),
        (("gateway",), "gateway"),
        ((), ""),
        (("a", 0, 1, "b"), "a[0][1].b"),
    ],
)
def test_format_loc(loc: tuple[int | str, ...], text: str) -> None:
    assert format_loc(loc) == text


# -- placement policies ---------------------------------------------------------------------------


class FakeParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    k: int = Field(1, ge=1)
    label: str = "x"


class FakeScorer(Plugin):
    """A scorer with parameters, registered only for these tests."""

    Params = FakeParams

    def score(self, cycle: CycleState, candidates: list[Any]) -> list[float]:
        return [0.5] * len(candidates)


class FakePicker(Plugin):
    def pick(self, cycle: CycleState, scored: list[Scored]) -> Scored:
        return scored[0]


class FakeFilterScorer(Plugin):
    def filter(self, cycle: CycleState, candidates: list[Any]) -> FilterResult:
        return FilterResult(candidates)

    def score(self, cycle: CycleState, candidates: list[Any]) -> list[float]:
        return [1.0] * len(candidates)


class Inert(Plugin):
    """Neither filter, scorer nor picker."""


@pytest.fixture(autouse=True)
def fake_plugins(monkeypatch: pytest.MonkeyPatch) -> None:
    for type_name, cls in [
        ("test-scorer", FakeScorer),
        ("test-picker", FakePicker),
        ("test-filter-scorer", FakeFilterScorer),
        ("test-inert", Inert),
    ]:
        monkeypatch.setitem(REGISTRY, type_name, cls)


def policy_file(plugins: list[Data], refs: list[Data]) -> str:
    data: Data = yaml.safe_load(MINIMAL_YAML)
    data["plugins"] = plugins
    data["profiles"] = [{"name": "p", "plugins": refs}]
    return dump(data)


POLICY_CASES: list[tuple[str, list[Data], list[Data], str, str]] = [
    (
        "unknown-type",
        [{"type": "least-requests"}],
        [{"ref": "least-requests", "weight": 1}],
        "plugins[0].type",
        "unknown plugin type 'least-requests'; known: [",
    ),
    (
        "param-range",
        [{"type": "test-scorer", "parameters": {"k": 0}}],
        [{"ref": "test-scorer", "weight": 1}],
        "plugins[0].parameters.k",
        "greater than or equal to 1",
    ),
    (
        "param-type",
        [{"type": "test-scorer", "name": "s", "parameters": {"k": "many"}}],
        [{"ref": "s", "weight": 1}],
        "plugins[0].parameters.k",
        "valid integer",
    ),
    (
        "param-unknown",
        [{"type": "test-scorer", "parameters": {"kk": 2}}],
        [{"ref": "test-scorer", "weight": 1}],
        "plugins[0].parameters.kk",
        "Extra inputs are not permitted",
    ),
    (
        "params-on-paramless",
        [{"type": "round-robin", "name": "rr", "parameters": {"start": 1}}],
        [{"ref": "rr"}],
        "plugins[0].parameters.start",
        "Extra inputs are not permitted",
    ),
    (
        "scorer-without-weight",
        [{"type": "test-scorer"}],
        [{"ref": "health"}, {"ref": "test-scorer"}],
        "profiles[0].plugins[1].weight",
        "scorer 'test-scorer' needs a weight",
    ),
    (
        "filter-scorer-without-weight",
        [{"type": "test-filter-scorer", "name": "fs"}],
        [{"ref": "fs"}],
        "profiles[0].plugins[0].weight",
        "scorer 'fs' needs a weight",
    ),
    (
        "weight-on-filter",
        [],
        [{"ref": "health", "weight": 1}],
        "profiles[0].plugins[0].weight",
        "'health' is not a scorer; remove weight",
    ),
    (
        "weight-on-picker",
        [],
        [{"ref": "health"}, {"ref": "random", "weight": 2}],
        "profiles[0].plugins[1].weight",
        "'random' is not a scorer",
    ),
    (
        "two-pickers",
        [{"type": "test-picker"}],
        [{"ref": "round-robin"}, {"ref": "health"}, {"ref": "test-picker"}],
        "profiles[0].plugins[2].ref",
        "second picker 'test-picker' (already 'round-robin')",
    ),
    (
        "no-role",
        [{"type": "test-inert", "name": "inert"}],
        [{"ref": "inert"}],
        "profiles[0].plugins[0].ref",
        "'inert' is not a filter, scorer or picker",
    ),
]


@pytest.mark.parametrize(
    ("plugins", "refs", "path", "problem"),
    [c[1:] for c in POLICY_CASES],
    ids=[c[0] for c in POLICY_CASES],
)
def test_policy_problems_name_the_path(
    plugins: list[Data], refs: list[Data], path: str, problem: str
) -> None:
    config = parse_config(policy_file(plugins, refs), FILE)
    with pytest.raises(ConfigError) as info:
        build_policies(config, FILE)
    assert_names(info.value, path, problem)


def test_policy_ref_to_missing_plugin() -> None:
    # The loader reports this first; the builder checks it too for configs built in code.
    text = policy_file([], [{"ref": "health"}, {"ref": "ghost", "weight": 1}])
    assert_names(error_of(text), "profiles[0].plugins[1].ref", "unknown plugin 'ghost'")
    raw = yaml.safe_load(text)
    raw["plugins"] = [{"type": "health"}]
    config = FleetConfig.model_validate(raw)  # schema only, no reference checks
    with pytest.raises(ConfigError) as info:
        build_policies(config, FILE)
    assert_names(info.value, "profiles[0].plugins[1].ref", "unknown plugin 'ghost'")


def test_policy_built_from_plugins_and_profiles() -> None:
    text = policy_file(
        [{"type": "test-scorer", "name": "s", "parameters": {"k": 3, "label": "y"}}],
        [
            {"ref": "model-served"},
            {"ref": "health"},
            {"ref": "s", "weight": 2.5},
            {"ref": "least-request", "weight": 1},
        ],
    )
    policies = build_policies(parse_config(text), FILE, seed=11)
    p = policies["p"]
    # the required filters it does not list run after the one it does (placement/build.py)
    assert [f.name for f in p.filters] == [
        "model-served", "context-window", "jurisdiction", "precision", "capacity-class", "health"]
    assert [(s.name, w) for s, w in p.scorers] == [("s", 2.5), ("least-request", 1)]
    scorer = p.scorers[0][0]
    assert isinstance(scorer, FakeScorer) and scorer.params == FakeParams(k=3, label="y")
    assert isinstance(p.scorers[1][0], LeastRequest)
    assert isinstance(p.filters[0], ModelServed)
    assert isinstance(p.picker, MaxScorePicker)  # no picker named: max-score
    # Seeds differ per profile and follow the seed given.
    seeds = {name: pol.seed for name, pol in policies.items()}
    assert seeds["p"] == 11 and len(set(seeds.values())) == len(seeds)


def test_one_plugin_in_two_roles() -> None:
    text = policy_file([{"type": "test-filter-scorer", "name": "fs"}], [{"ref": "fs", "weight": 1}])
    p = build_policies(parse_config(text), FILE)["p"]
    assert [f.name for f in p.filters] == [*(n for n, _ in REQUIRED_FILTERS), "fs"]
    assert [s.name for s, _ in p.scorers] == ["fs"]


# -- the CLI -------------------------------------------------------------------------------------


def test_cli_check_bad_file_exits_2_without_traceback(tmp_path: Path) -> None:
    data = base()
    put("substrates.0.endpoints.1.url", "ftp://nope")(data)
    put("substrates.1.kind", "tpu")(data)
    path = tmp_path / "bad.yaml"
    path.write_text(dump(data))
    result = CliRunner().invoke(app, ["check", "-c", str(path)])
    assert result.exit_code == 2
    assert "Traceback" not in result.output
    assert "invalid configuration" in result.output
    assert f"{path}: substrates[0].endpoints[1].url: String should match pattern" in result.output
    assert f"{path}: substrates[1].kind: Input should be" in result.output


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b"a: [\n", "invalid YAML"),
        (b"\xff\xfe\x00", "not UTF-8 text"),
        (None, "cannot read"),
    ],
    ids=["yaml", "encoding", "missing"],
)
def test_cli_check_other_failures(tmp_path: Path, content: bytes | None, expected: str) -> None:
    path = tmp_path / "f.yaml"
    if content is not None:
        path.write_bytes(content)
    result = CliRunner().invoke(app, ["check", "-c", str(path)])
    assert result.exit_code == 2
    assert expected in result.output and "Traceback" not in result.output


def test_cli_check_policy_problem(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text(policy_file([], [{"ref": "health", "weight": 1}]))
    result = CliRunner().invoke(app, ["check", "-c", str(path)])
    assert result.exit_code == 2
    assert f"{path}: profiles[0].plugins[0].weight: 'health' is not a scorer" in result.output
    assert "Traceback" not in result.output


def test_cli_check_good_file(tmp_path: Path) -> None:
    path = tmp_path / "good.yaml"
    path.write_text(dump(base()))
    result = CliRunner().invoke(app, ["check", "-c", str(path)])
    assert result.exit_code == 0, result.output
    profiles = len(builtin_defaults()["profiles"]) + 1  # the built-in ones and "fast"
    assert f"ok (2 substrates, 3 endpoints, 2 tenants, {profiles} profiles)" in result.output


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_cli_serve_unreachable_redis_exits_without_traceback(tmp_path: Path) -> None:
    """`admission.store: redis` with nothing listening and `start_without_redis: false`: a
    one-line error naming the URL and the file, exit 2 as for an unreachable PostgreSQL (the
    start-up ping fails; nothing keeps running). By default the gateway starts degraded
    instead (tests/test_redis_start.py)."""
    import subprocess
    import sys

    path = tmp_path / "redis.yaml"
    path.write_text(
        MINIMAL_YAML + "admission: {store: redis, redis_url: 'redis://127.0.0.1:9/0', "
        "start_without_redis: false}\n"
    )
    proc = subprocess.run(
        [sys.executable, "-m", "inferplane.cli", "serve", "-c", str(path),
         "--port", str(_free_port()), "--log-level", "error"],
        capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    assert "error: cannot reach the admission store" in proc.stderr
    assert "redis://127.0.0.1:9/0" in proc.stderr and str(path) in proc.stderr


@pytest.mark.parametrize(
    ("raised", "expected", "code"),
    [
        (
            ConfigError("<config>", [("batch.workload_class", "unknown class 'x'")]),
            "{path}: batch.workload_class: unknown class 'x'",
            2,
        ),
        (RuntimeError("boom at start"), "cannot start the gateway ({path}): RuntimeError: boom", 1),
    ],
    ids=["config", "other"],
)
def test_cli_serve_startup_failure_is_a_message(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, raised: Exception, expected: str, code: int
) -> None:
    import inferplane.api.app as api_app

    def broken(gateway: object) -> None:
        raise raised

    monkeypatch.setattr(api_app, "build_app", broken)
    path = tmp_path / "ok.yaml"
    path.write_text(dump(base()))
    result = CliRunner().invoke(
        app, ["serve", "-c", str(path), "--port", str(_free_port()), "--log-level", "error"]
    )
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output
    assert expected.format(path=path) in result.output


def test_cli_serve_failing_startup_hook_stops_what_started(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An exception in an on_startup hook (after the gateway started) is a message, and the
    runner's clean-up hooks still stop the gateway."""
    from inferplane.api.pipeline import Gateway

    stopped: list[bool] = []
    real_stop = Gateway.stop

    async def failing_start(self: Gateway) -> None:
        raise OSError(13, "Permission denied", "/nope/ledger.sqlite")

    async def stop(self: Gateway) -> None:
        stopped.append(True)
        await real_stop(self)

    monkeypatch.setattr(Gateway, "start", failing_start)
    monkeypatch.setattr(Gateway, "stop", stop)
    path = tmp_path / "ok.yaml"
    path.write_text(dump(base()))
    result = CliRunner().invoke(
        app, ["serve", "-c", str(path), "--port", str(_free_port()), "--log-level", "error"]
    )
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    assert f"cannot start the gateway ({path}): PermissionError" in result.output
    assert stopped == [True]


# -- generated docs: the JSON Schema and the configuration reference -----------------------------

ROOT = Path(__file__).resolve().parents[1]
SCHEMA_JSON = ROOT / "docs" / "fleet.schema.json"
CONFIG_DOC = ROOT / "docs" / "configuration.md"


def gen_config_docs() -> ModuleType:
    return load_file("gen_config_docs", ROOT / "scripts" / "gen_config_docs.py")


def test_committed_json_schema_is_current(tmp_path: Path) -> None:
    fresh = tmp_path / "fleet.schema.json"
    result = CliRunner().invoke(app, ["schema", "-o", str(fresh)])
    assert result.exit_code == 0, result.output
    assert json.loads(fresh.read_text()) == FleetConfig.model_json_schema(by_alias=True)
    assert SCHEMA_JSON.read_text() == fresh.read_text(), (
        "docs/fleet.schema.json is out of date: run `inferplane schema -o docs/fleet.schema.json`"
    )


def test_json_schema_forbids_unknown_keys_everywhere() -> None:
    schema = json.loads(SCHEMA_JSON.read_text())
    assert schema["additionalProperties"] is False
    for name, definition in schema["$defs"].items():
        if definition.get("type") == "object":
            assert definition.get("additionalProperties") is False, name
    assert "class" in schema["$defs"]["ClassRule"]["properties"]  # by alias


def test_configuration_reference_is_current() -> None:
    text = CONFIG_DOC.read_text("utf-8")
    assert gen_config_docs().render(text) == text, (
        "docs/configuration.md is out of date: run `python scripts/gen_config_docs.py`"
    )


def test_configuration_reference_lists_every_field() -> None:
    gen = gen_config_docs()
    text = CONFIG_DOC.read_text("utf-8")
    for path, model in gen.sections():
        assert f"### `{path or 'top level'}`" in text
        for name, info in model.model_fields.items():
            assert f"| `{info.alias or name}` |" in text, f"{model.__name__}.{name}"


def test_generator_refuses_undocumented_fields(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    gen = gen_config_docs()
    monkeypatch.delitem(gen.MEANINGS, "GatewaySpec.host")
    with pytest.raises(gen.UndocumentedFieldsError, match=r"GatewaySpec\.host"):
        gen.fields_block()
    assert gen.main(["--check", "--doc", str(CONFIG_DOC)]) == 2
    assert "GatewaySpec.host" in capsys.readouterr().err


def test_generator_check_reports_a_stale_page(tmp_path: Path) -> None:
    gen = gen_config_docs()
    stale = tmp_path / "configuration.md"
    stale.write_text(CONFIG_DOC.read_text("utf-8").replace("| `host` |", "| `hostname` |"))
    assert gen.main(["--check", "--doc", str(stale)]) == 1
    assert gen.main(["--doc", str(stale)]) == 0  # rewrites it
    assert stale.read_text("utf-8") == CONFIG_DOC.read_text("utf-8")


def test_annotated_example_in_the_docs_is_valid() -> None:
    text = CONFIG_DOC.read_text("utf-8")
    section = text.split("## An annotated example", 1)[1]
    example = section.split("```yaml\n", 1)[1].split("```", 1)[0]
    config = parse_config(example, "docs/configuration.md")
    build_policies(config, "docs/configuration.md")
    assert config.tenants[0].api_keys == [key_hash("sk-quickstart-acme")]


def test_the_first_example_fleet_of_providers_md_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    """docs/providers.md's first example, with the region and tenant it leaves out (audit29
    nit 8: its Claude model needed `profile:`)."""
    monkeypatch.setenv("EXAMPLE_API_KEY", "k1")
    monkeypatch.setenv("ANTHROPIC_API_KEY", "k2")
    doc = Path(__file__).resolve().parent.parent / "docs" / "providers.md"
    example = doc.read_text("utf-8").split("```yaml\n", 1)[1].split("```", 1)[0]
    text = ("regions: [{name: us-east}]\ntenants: [{name: t, api_keys: "
            f"[\"{key_hash('sk-t')}\"]}}]\n" + example)
    config = parse_config(text, "docs/providers.md")
    build_policies(config, "docs/providers.md")
    assert [m.name for s in config.substrates for e in s.endpoints for m in e.models] == [
        "llama-3.1-70b", "claude-sonnet"]


@pytest.mark.parametrize(
    ("gateway", "wait", "stale"),
    [
        ({"scrape_max_interval_s": 7.0}, "7", "6"),  # the default stale_after_s, 6 s
        ({"stale_after_s": 0.5}, "0.5", "0.5"),  # the default 0.5 s cap
    ],
)
def test_paced_scrapes_must_come_before_the_metrics_go_stale(
    gateway: dict[str, Any], wait: str, stale: str
) -> None:
    """The longest wait pacing may set (scrape_max_interval_s) must be under stale_after_s:
    else a slow engine's metrics read stale between two scrapes."""
    data = base()
    data["gateway"].update(gateway)
    err = error_of(dump(data))
    assert err.problems == [
        (
            "gateway",
            f"Value error, scrape_max_interval_s: {wait} s must be under stale_after_s "
            f"({stale} s): an endpoint whose scrapes are paced that far apart would read as "
            "stale between two of them",
        )
    ]
    assert str(err).startswith(f"{FILE}: gateway: Value error, scrape_max_interval_s: {wait} s")


@pytest.mark.parametrize(
    "gateway",
    [
        {"scrape_max_interval_s": 1.9},
        {"scrape_max_duty": None, "scrape_max_interval_s": 3.0},  # no pacing: the cap is unused
        {"scrape_interval_s": 3600, "scrape_max_interval_s": 3.0},  # scrapes off: never paced
        {"stale_after_s": 10.0, "scrape_max_interval_s": 5.0},
    ],
)
def test_scrape_waits_under_the_staleness_horizon_are_accepted(gateway: dict[str, Any]) -> None:
    data = base()
    data["gateway"].update(gateway)
    parse_config(dump(data), FILE)
