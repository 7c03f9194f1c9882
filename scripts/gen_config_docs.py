"""Generate the reference tables of docs/configuration.md from the pydantic config models.

The page is hand-written prose with generated blocks between marker comments::

    <!-- BEGIN GENERATED: fields -->   every section and field: name, type, default, meaning
    <!-- BEGIN GENERATED: builtins -->  the built-in classes, plugins and profiles

Usage::

    python scripts/gen_config_docs.py           # rewrite the generated blocks in place
    python scripts/gen_config_docs.py --check   # exit 1 if the page is out of date

Every field needs a meaning: its ``Field(description=...)`` in ``config/schema.py``, or an entry
in ``MEANINGS`` below. A new field without either makes this script (and the test that runs it)
fail, so the reference cannot silently miss a field.
"""

from __future__ import annotations

import inspect
import re
import sys
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from inferplane import docgen
from inferplane.config import schema
from inferplane.config.loader import builtin_defaults
from inferplane.config.schema import FleetConfig

DOC = Path(__file__).resolve().parents[1] / "docs" / "configuration.md"

NAME_PATTERN = schema.NAME_PATTERN

# Meanings of fields that carry no ``description`` in the schema, keyed by "Model.field".
MEANINGS: dict[str, str] = {
    "FleetConfig.gateway": "how the gateway process listens, scrapes and forwards",
    "FleetConfig.regions": "regions, their RTTs and egress prices; none means any region name",
    "FleetConfig.substrates": "the hardware pools and their endpoints",
    "FleetConfig.tenants": "who may call the gateway, with which keys and policy",
    "FleetConfig.classes": "workload classes, merged over the built-in ones",
    "FleetConfig.class_rules": "how a request without `x-inferplane-class` gets its class",
    "FleetConfig.plugins": "placement plugin instances, merged over the built-in ones",
    "FleetConfig.profiles": "placement profiles wiring plugins, merged over the built-in ones",
    "FleetConfig.mix": "traffic mix for the simulator and trace replay",
    "GatewaySpec.host": "address to listen on",
    "GatewaySpec.port": "port to listen on (0: any free port)",
    "GatewaySpec.connect_timeout_s": "upstream TCP connect limit",
    "GatewaySpec.default_profile": "placement profile of classes that name none",
    "GatewaySpec.seed": "seed of the placement pickers' random source (tie-breaking)",
    "RegionSpec.name": "region name, referenced by substrates, tenants and headers",
    "RegionSpec.egress_usd_per_gb": "price of data leaving the region, USD per GB",
    "CostModel.input_per_mtok": "USD per million prompt tokens",
    "CostModel.output_per_mtok": "USD per million generated tokens",
    "CostModel.cached_input_per_mtok": "USD per million prompt tokens served from a prefix cache",
    "ServedModel.name": "model name as clients send it in `model`",
    "ServedModel.variant": "variant (fine-tune, quantisation…) a request may ask for",
    "ServedModel.precision": "numeric precision it runs at",
    "ServedModel.max_context": "longest prompt + output it accepts, in tokens",
    "EmulationSpec.max_num_seqs": "most sequences in one batch (vLLM `--max-num-seqs`)",
    "EmulationSpec.max_num_batched_tokens": "token budget of one step (chunked prefill)",
    "EmulationSpec.block_size": "KV-cache block size in tokens",
    "EmulationSpec.gpu_memory_utilization": "share of device memory for weights and KV cache",
    "EndpointSpec.name": "endpoint name, unique in the file; shown in decisions and headers",
    "EndpointSpec.url": "base URL (scheme, host, port; no path), unique in the file",
    "EndpointSpec.engine": "serving engine, for its `/metrics` names",
    "EndpointSpec.models": "the models it serves",
    "EndpointSpec.emulation": "settings of the emulated engine",
    "SubstrateSpec.name": "substrate name, unique in the file",
    "SubstrateSpec.kind": "kind of hardware pool",
    "SubstrateSpec.hardware": "physics hardware profile name",
    "SubstrateSpec.region": "region it runs in (a `regions` name when regions are listed)",
    "SubstrateSpec.zone": (
        "availability zone; on a re-placement the `failure-domain` filter avoids a failed "
        "attempt's zone (after its failure domain)"
    ),
    "SubstrateSpec.jurisdiction": "legal jurisdiction of the data it processes (e.g. `eu`)",
    "SubstrateSpec.failure_domain": (
        "failure domain (rack, power feed); on a re-placement the `failure-domain` filter "
        "avoids a failed attempt's failure domain first, then its zone, while others remain"
    ),
    "SubstrateSpec.capacity_class": "reserved capacity is used before burst",
    "SubstrateSpec.cost": "what it costs",
    "SubstrateSpec.endpoints": "its serving instances",
    "TenantSpec.name": "tenant name, unique in the file",
    "TenantSpec.default_class": "class of requests no header or rule classifies",
    "WorkloadClass.name": "class name, unique in the file",
    "WorkloadClass.ttft_slo_ms": "time-to-first-token objective",
    "WorkloadClass.itl_slo_ms": "inter-token latency objective",
    "WorkloadClass.priority": "admission priority",
    "WorkloadClass.allow_burst": "may run on burst capacity",
    "WorkloadClass.default_max_tokens": "`max_tokens` when the request sets none",
    "WorkloadClass.energy_aware": "prefer endpoints with lower energy per token",
    "ClassRule.workload_class": "class assigned when the rule matches",
    "ClassRule.min_prompt_tokens": "matches prompts of at least this many (estimated) tokens",
    "ClassRule.api": "matches one API only",
    "PluginSpec.type": "registered plugin type",
    "PluginSpec.name": "instance name profiles refer to; defaults to the type",
    "PluginSpec.parameters": "the type's parameters, checked at start-up",
    "PluginRef.ref": "plugin instance name",
    "PluginRef.weight": "scorer weight; required for scorers, forbidden otherwise",
    "ProfileSpec.name": "profile name, referenced by classes and `gateway.default_profile`",
    "ProfileSpec.plugins": "plugins in order: filters run in this order",
    "MixEntry.tenant": "tenant of this share",
    "MixEntry.workload_class": "class of this share",
    "MixEntry.region": "client region of this share",
    "MixEntry.fraction": "relative share of the traffic",
    "MixEntry.model": "model to request; default: the trace's",
    "FleetConfig.admission": "the admission stage: shared state, retries, queues",
    "TenantSpec.budgets": "spending limits, checked before generation",
    "TenantSpec.rate_limits": "token-bucket request and token rates",
    "TenantSpec.loop": "agent loop limits",
    "BudgetSpec.scope": "what one limit counts: the tenant, each key, or each workflow",
    "BudgetSpec.window": "calendar window (UTC) the limit resets over",
    "RateLimitSpec.scope": "one bucket for the tenant, or one per API key",
    "RateLimitSpec.requests_per_min": "requests per minute",
    "LoopLimits.workflow_window_s": "window of `max_workflow_requests`",
    "RetryPolicy.budget_window_s": "window the retry budget is computed over",
    "QueueSpec.enabled": "queue while saturated; off: shed at once",
    "QueueSpec.default_deadline_ms": "longest wait of a class that sets no `queue_deadline_ms`",
    "AdmissionSpec.enabled": "run the admission stage (budgets, rate limits, queues)",
    "AdmissionSpec.store": "where shared counters live: this process, or Redis for replicas",
    "AdmissionSpec.redis_url": "Redis URL when `store: redis`",
    "AdmissionSpec.redis_prefix": "prefix of every Redis key",
    "AdmissionSpec.retry": "retry recognition and re-placement budget",
    "AdmissionSpec.queue": "priority queues",
}


# -- walking the models ---------------------------------------------------------------------------


def _models_in(annotation: Any) -> Iterator[type[BaseModel]]:
    if inspect.isclass(annotation) and issubclass(annotation, BaseModel):
        yield annotation
    for arg in get_args(annotation):
        yield from _models_in(arg)


def _is_list(annotation: Any) -> bool:
    if get_origin(annotation) is list:
        return True
    return any(_is_list(a) for a in get_args(annotation) if a is not type(None))


def sections() -> list[tuple[str, type[BaseModel]]]:
    """(YAML path, model) for the file and every nested model, depth first in field order."""
    out: list[tuple[str, type[BaseModel]]] = [("", FleetConfig)]

    def walk(path: str, model: type[BaseModel]) -> None:
        for name, info in model.model_fields.items():
            key = info.alias or name
            for sub in _models_in(info.annotation):
                sub_path = f"{path}.{key}" if path else key
                if _is_list(info.annotation):
                    sub_path += "[]"
                out.append((sub_path, sub))
                walk(sub_path, sub)

    walk("", FleetConfig)
    return out


def _anchor(path: str) -> str:
    return re.sub(r"[^a-z0-9_-]", "", path.replace(".", "").lower())


# -- rendering -------------------------------------------------------------------------------------


def type_text(annotation: Any, paths: dict[type[BaseModel], str]) -> str:
    """A short, readable type: ``list of endpoint``, ``"gpu" | "cpu"``, ``number or null``."""
    origin = get_origin(annotation)
    args = get_args(annotation)
    if annotation is type(None):
        return "null"
    if origin in (Union, types.UnionType):
        return " or ".join(type_text(a, paths) for a in args)
    if origin is Literal:
        return " \\| ".join(f'`"{a}"`' for a in args)
    if origin is list:
        return f"list of {type_text(args[0], paths)}"
    if origin is dict:
        return f"map of {type_text(args[0], paths)} to {type_text(args[1], paths)}"
    if inspect.isclass(annotation) and issubclass(annotation, BaseModel):
        path = paths[annotation]
        return f"[{path}](#{_anchor(path)})"
    names = {str: "string", int: "integer", float: "number", bool: "boolean", Any: "any"}
    if annotation in names:
        return names[annotation]
    alias_value = getattr(annotation, "__value__", None)  # `type X = ...` aliases
    if alias_value is not None:
        return type_text(alias_value, paths)
    return str(annotation)


def constraints(info: FieldInfo) -> str:
    parts: list[str] = []
    for m in info.metadata:
        for attr, sym in (("gt", ">"), ("ge", "≥"), ("lt", "<"), ("le", "≤")):
            value = getattr(m, attr, None)
            if value is not None:
                parts.append(f"{sym} {value}")
        if getattr(m, "min_length", None):
            parts.append(f"at least {m.min_length}")
        pattern = getattr(m, "pattern", None)
        if pattern == NAME_PATTERN:
            parts.append("a name")
        elif pattern and pattern.startswith("^https?"):
            parts.append("an http(s) URL")
        elif pattern:
            parts.append(f"matching `{pattern}`")
    return ", ".join(parts)


def _value(v: Any) -> str:
    if v is None:
        return "`null`"
    if isinstance(v, bool):
        return f"`{str(v).lower()}`"
    if isinstance(v, str):
        return f'`"{v}"`'
    if isinstance(v, BaseModel):
        return "defaults"
    if isinstance(v, list | dict) and not v:
        return f"`{v}`"
    return f"`{v}`"


def default_text(info: FieldInfo) -> str:
    if info.default_factory is not None:
        return _value(info.default_factory())  # type: ignore[call-arg]
    if info.default is PydanticUndefined:
        return "**required**"
    return _value(info.default)


class UndocumentedFieldsError(Exception):
    """Some fields have neither a description nor an entry in `MEANINGS`."""


def meaning(model: type[BaseModel], name: str, info: FieldInfo) -> str | None:
    text = info.description or MEANINGS.get(f"{model.__name__}.{name}")
    return text.replace("|", "\\|") if text else None


def _summary(model: type[BaseModel]) -> str:
    doc = inspect.cleandoc(model.__doc__ or "")
    return " ".join(doc.split("\n\n")[0].split())


def fields_block() -> str:
    secs = sections()
    paths = {model: (path or "top level") for path, model in secs}
    lines: list[str] = []
    undocumented: list[str] = []
    for path, model in secs:
        title = path or "top level"
        lines += [f'<a id="{_anchor(title)}"></a>', "", f"### `{title}`", ""]
        summary = _summary(model)
        if summary:
            lines += [summary, ""]
        lines += ["| field | type | default | meaning |", "|---|---|---|---|"]
        for name, info in model.model_fields.items():
            key = info.alias or name
            typ = type_text(info.annotation, paths)
            extra = constraints(info)
            if extra:
                typ += f" ({extra})"
            text = meaning(model, name, info)
            if text is None:
                undocumented.append(f"{model.__name__}.{name}")
            lines.append(f"| `{key}` | {typ} | {default_text(info)} | {text} |")
        lines.append("")
    if undocumented:
        raise UndocumentedFieldsError(
            "fields without a meaning (add Field(description=...) in config/schema.py, or an "
            f"entry in MEANINGS in scripts/gen_config_docs.py): {', '.join(undocumented)}"
        )
    return "\n".join(lines).rstrip() + "\n"


def builtins_block() -> str:
    from inferplane.placement import plugins as _plugins  # noqa: F401  (registers the types)
    from inferplane.placement.framework import REGISTRY

    d = builtin_defaults()
    lines = [
        "Classes:",
        "",
        "| name | TTFT SLO (ms) | ITL SLO (ms) | priority | default max tokens |",
        "|---|---|---|---|---|",
    ]
    base = schema.WorkloadClass
    for c in d["classes"]:
        wc = base.model_validate(c)
        ttft = "—" if wc.ttft_slo_ms is None else f"{wc.ttft_slo_ms:g}"
        itl = "—" if wc.itl_slo_ms is None else f"{wc.itl_slo_ms:g}"
        lines.append(f"| `{wc.name}` | {ttft} | {itl} | {wc.priority} | {wc.default_max_tokens} |")
    lines += ["", "Plugins (one instance of each, named after its type):", ""]
    lines += ["| name | role |", "|---|---|"]
    for p in d["plugins"]:
        spec = schema.PluginSpec.model_validate(p)
        cls = REGISTRY[spec.type]
        roles = [role for method, role in ROLES if callable(getattr(cls, method, None))]
        lines.append(f"| `{spec.instance_name}` | {', '.join(roles)} |")
    lines += ["", "Profiles:", "", "| name | plugins, in order |", "|---|---|"]
    for p in d["profiles"]:
        prof = schema.ProfileSpec.model_validate(p)
        refs = ", ".join(
            f"`{r.ref}`" + (f" (weight {r.weight:g})" if r.weight is not None else "")
            for r in prof.plugins
        )
        lines.append(f"| `{prof.name}` | {refs} |")
    return "\n".join(lines) + "\n"


ROLES = (("filter", "filter"), ("score", "scorer"), ("pick", "picker"))
BLOCKS = {"fields": fields_block, "builtins": builtins_block}


def render(text: str) -> str:
    """``text`` with every generated block rewritten."""
    return docgen.render(text, BLOCKS, DOC)


def main(argv: list[str] | None = None) -> int:
    return docgen.main(
        argv, description=__doc__.split("\n")[0], doc=DOC, render=render,
        script="scripts/gen_config_docs.py", errors=(UndocumentedFieldsError,),
    )


if __name__ == "__main__":
    sys.exit(main())
