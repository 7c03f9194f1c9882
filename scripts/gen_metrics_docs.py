"""Generate the reference tables of docs/metrics.md from the registries that export the metrics.

The page is hand-written prose with generated blocks between marker comments::

    <!-- BEGIN GENERATED: gateway -->    the gateway's registry (`telemetry.metrics.GatewayMetrics`)
    <!-- BEGIN GENERATED: picker -->     the Envoy picker's own (`telemetry.metrics.PickerMetrics`)
    <!-- BEGIN GENERATED: workers -->    the families the gathering worker adds (`telemetry.gather`)
    <!-- BEGIN GENERATED: economics -->  the economics gauges (`economics.render.FAMILIES`)
    <!-- BEGIN GENERATED: emulator -->   an emulated engine's page (`twin.emulator.metrics`)
    <!-- BEGIN GENERATED: labels -->     every label of the inferplane families, and its values

Usage::

    python scripts/gen_metrics_docs.py           # rewrite the generated blocks in place
    python scripts/gen_metrics_docs.py --check   # exit 1 if the page is out of date

Each table is read from what the code registers or renders, never typed here: a family added to
the registry appears in the reference when this script runs, and the test that runs it
(tests/test_metrics_docs.py) fails while the page lacks it. What cannot be read from the code is
kept below, keyed by family or label name: `WHEN` (when a family of the gateway's page has no
samples), `LABELS` (what a label's values are). A label without an entry in `LABELS`, or an
entry naming nothing exported, makes this script fail, so the two cannot go stale silently.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

from prometheus_client import CollectorRegistry
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.parser import text_string_to_metric_families

from inferplane import docgen
from inferplane.economics.render import EconomicsCollector
from inferplane.telemetry import gather
from inferplane.telemetry.metrics import GatewayMetrics, PickerMetrics, SourcedCounters
from inferplane.twin.emulator.metrics import EngineMetricsPage
from inferplane.twin.engine.model import EngineConfig

DOC = Path(__file__).resolve().parents[1] / "docs" / "metrics.md"

# When a family of the gateway's /metrics page is exported only under a condition (otherwise
# from the process's start). Keyed by family name as exposed.
WHEN: dict[str, str] = {
    "inferplane_event_loop_cpu_seconds_total": "Linux with schedstat",
    "inferplane_event_loop_runqueue_wait_seconds_total": "Linux with schedstat",
    "inferplane_event_loop_timeslices_total": "Linux with schedstat",
    "inferplane_process_runqueue_wait_seconds_total": "Linux with schedstat",
    "inferplane_engine_scrapes_total": "once the gateway scrapes its endpoints",
    "inferplane_health_probes_total": "once the gateway scrapes its endpoints",
    "inferplane_worker_page_refused_total": "a worker of `serve --workers N` only",
    "inferplane_admission_store_outages_total": (
        "an admission store in a file (`admission.path`) or in Redis"),
    "inferplane_admission_store_dropped_total": (
        "an admission store in a file (`admission.path`) or in Redis (which drops none)"),
    "inferplane_admission_store_resets_total": "with `admission.store: redis` only",
    "inferplane_config_replicas": (
        "with `admission.store: redis`, once the processes' fleet files were read from Redis"),
    "inferplane_config_replicas_disagree": (
        "from start (0 without `admission.store: redis`)"),
    "inferplane_config_replicas_stale": (
        "from start (0 without `admission.store: redis`)"),
}

# What each label of an inferplane family holds. "family:label" for a label whose meaning
# depends on the family, else the label's name.
LABELS: dict[str, str] = {
    "api": "`chat`, `completions` or `embeddings`",
    "inferplane_responses_total:api": (
        "`chat`, `completions`, `embeddings`, `models`, `files`, `batches`, `decisions`, "
        "`usage`, `admin` (`/v1/fleet/health`, `/console`) or `other` (any other path, unknown "
        "routes, malformed HTTP, connections past `max_connections_per_client`)"
    ),
    "inferplane_responses_total:code": (
        "the HTTP status the client got, as sent (`200`, `400`, `401`, `403`, `404`, `405`, "
        "`408`, `413`, `415`, `429`, `500`, `502`, `503`, an engine's own status passed "
        "through on a non-streamed answer), except `502`/`500` for a stream that ended in an "
        "error event after its 200 head and `499` for a client that left before its answer ended"
    ),
    "endpoint": "an endpoint's `name` in the fleet file",
    "substrate": "a substrate's (pool's) `name` in the fleet file",
    "pool": "a substrate's (pool's) `name` in the fleet file",
    "code": (
        "the HTTP status sent to the client, e.g. `200`, `400`/`404` (an engine's 4xx passed "
        "through), `499` (client left), `502`"
    ),
    "inferplane_upstream_failures_total:reason": (
        "`connect`, `connection`, `timeout`, `first_byte_timeout`, `credentials` or "
        "`http_<status>`"
    ),
    "inferplane_admission_rejected_total:reason": "the refusal's `error.code` (else `error.type`)",
    "inferplane_spillovers_total:reason": (
        "`outage`, `errors`, `timeout`, `rate_limited`, `failover`, `reserved_exhausted`, "
        "`saturation`, `slo`"
    ),
    "inferplane_epp_flights_reaped_total:reason": "`unobserved`, `picker_stopped`, `no_observer`",
    "inferplane_epp_decisions_total:api": (
        "`chat`, `completions`, `embeddings`, `models` or `other` (any other path)"
    ),
    "inferplane_epp_decisions_total:result": (
        "`routed` (Envoy sends the request to the picked endpoint) or the HTTP status the "
        "picker answered with in Envoy's place: `200` (`/v1/models`), `400`, `401`, `404`, "
        "`405`, `413`, `429`, `500`, `503`"
    ),
    "filter": (
        "the filter that removed them: a filter plugin instance's name, or the built-in "
        "`capacity` (saturated endpoints) and `failover` (endpoints this request already failed on)"
    ),
    "stage": "`filter`, `score` or `pick`",
    "plugin": "a plugin instance's name, or `fused` (the fast path that runs several at once)",
    "workload_class": "a workload class name (built-in or the fleet file's)",
    "from_region": (
        "the preferred region: the client's (`x-inferplane-client-region`) when it sent one, "
        "else the cheapest reserved pool's or a removed reserved endpoint's; for "
        "`rate_limited`, the region of the endpoint that answered 429"
    ),
    "to_region": "the region of the endpoint placed on",
    "version": "the inferplane version",
    "placement": "`compiled` (the mypyc build) or `pure`",
    "reason_kind": (
        "`error_rate`, `stale`, `ttft`, `rate_limited`, `passive`, `consecutive_5xx`, "
        "`first_byte_timeout` (empty for an ejection recorded without a kind)"
    ),
    "stat": "`mean` or `max`",
    "verdict": "`ok`, `pressure` or `past-envelope`",
    "tenant": "a tenant's name with `gateway.metrics.tenant_labels: true`, else `all`",
    "inferplane_admission_store_pending:kind": (
        "`settle` (a request's budget lease settled with its spend) or `usage` (a usage row)"),
    "inferplane_agent_tool_fanout:kind": "`tools` (offered) or `results` (tool results carried)",
    "inferplane_tenant_tokens_total:kind": "`prompt` or `completion`",
    "band": "`critical`, `standard`, `sheddable` or `batch`",
    "result": "`ok` or `error`",
    "sha256": "the running fleet file's SHA-256, hex",
    "worker": (
        "the worker's index, `0` … N-1 (stable across its restarts); under `serve --workers N` "
        "every sample of the page carries it"
    ),
    "inferplane_economics_pool_utilisation:kind": "the substrate kind",
    "inferplane_economics_usd_per_mtok:kind": "the substrate kind",
    "inferplane_economics_joules_per_token:kind": "the substrate kind",
    "basis": "`attributed` or `owned`",
    "model": "a model name as clients send it",
    "inferplane_economics_trigger:kind": (
        "`out_of_band`, `provider_past_break_even` or `divergence_rising`"
    ),
    "subject": "the pool or model the trigger names",
}


@dataclass(frozen=True)
class Family:
    name: str  # as exposed: a counter's ends in _total; a histogram's samples add suffixes
    type: str
    labels: tuple[str, ...]
    help: str


class UnknownCollectorError(Exception):
    """A collector in the gateway's registry that this script cannot describe."""


class StaleTablesError(Exception):
    """`WHEN` or `LABELS` does not match the families exported."""


def _exposed(name: str, typ: str) -> str:
    return f"{name}_total" if typ == "counter" and not name.endswith("_total") else name


def registry_families(registry: CollectorRegistry) -> list[Family]:
    """Every family the registry's collectors describe, in registration order."""
    out: list[Family] = []
    for collector in list(registry._collector_to_names):  # the registry's own record
        if isinstance(collector, MetricWrapperBase):
            (desc,) = collector.describe()
            out.append(Family(_exposed(desc.name, desc.type), desc.type,
                              tuple(collector._labelnames), desc.documentation))
        elif isinstance(collector, SourcedCounters):
            out += [Family(c.name, "counter", (), c.documentation) for c in collector.counters]
        elif isinstance(collector, EconomicsCollector):
            out += [Family(f.name, f.type, tuple(f._labelnames), f.documentation)
                    for f in collector.describe()]
        else:
            raise UnknownCollectorError(
                f"{type(collector).__name__} in the gateway's registry: teach "
                "scripts/gen_metrics_docs.py to describe it"
            )
    return out


def page_families(text: str) -> list[Family]:
    """The families of a page in the text format, their labels read from its samples. The
    ``<name>_created`` gauge that prometheus_client writes after a counter or a histogram (and
    the emulator, as it does) is that family's sample, not a family of the reference."""
    out: dict[str, Family] = {}
    for f in text_string_to_metric_families(text):
        labels: dict[str, None] = {}
        for s in f.samples:
            labels.update(dict.fromkeys(k for k in s.labels if k != "le"))
        base = f.name.removesuffix("_created")
        if f.name != base and any(
                k in out and out[k].type in ("counter", "histogram")
                for k in (base, _exposed(base, "counter"))):
            continue
        name = _exposed(f.name, f.type)
        out[name] = Family(name, f.type, tuple(labels), f.documentation)
    return list(out.values())


def gateway_families() -> list[Family]:
    return registry_families(GatewayMetrics().registry)


def picker_families() -> list[Family]:
    """The families the Envoy picker adds to the registry it shares with the core."""
    registry = CollectorRegistry()
    PickerMetrics(registry)
    return registry_families(registry)


def worker_families() -> list[Family]:
    page = gather.merge({}, 1).decode()  # the gathering worker's own families, no worker's page
    return page_families(page)


def economics_families() -> list[Family]:
    registry = CollectorRegistry()
    registry.register(EconomicsCollector())
    return registry_families(registry)


def emulator_families() -> list[Family]:
    """The families of an emulated engine's page, rendered for an idle engine with a modelled
    power draw (an endpoint whose hardware profile has a power rating). The engine is a stub
    with the attributes `EngineMetricsPage` reads today: when the page reads a new one, this
    fails with an AttributeError on the stub; add the attribute here (at its idle value)."""
    engine = SimpleNamespace(
        config=EngineConfig(num_gpu_blocks=1), num_running=0, num_waiting=0, kv_usage=0.0,
        prefix_queries_total=0, prefix_hits_total=0, num_preemptions_total=0,
        prompt_tokens_total=0, generation_tokens_total=0,
    )
    page = EngineMetricsPage(engine, "m", 0.9)  # type: ignore[arg-type]
    page.device_power = lambda: [0.0]
    return page_families(page.render())


# -- rendering -------------------------------------------------------------------------------------


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def _type_text(f: Family) -> str:
    if f.type == "histogram":
        return "histogram (`_bucket`, `_sum`, `_count`)"
    return f.type


def table(families: Iterable[Family], when: bool = False) -> str:
    head = "| name | type | labels | help |"
    rule = "|---|---|---|---|"
    if when:
        head, rule = head + " exported |", rule + "---|"
    lines = [head, rule]
    for f in families:
        labels = ", ".join(f"`{x}`" for x in f.labels) or "—"
        row = f"| `{f.name}` | {_type_text(f)} | {labels} | {_cell(f.help)} |"
        if when:
            row += f" {_cell(WHEN.get(f.name, 'from start'))} |"
        lines.append(row)
    return "\n".join(lines) + "\n"


def _inferplane() -> list[Family]:
    return [*gateway_families(), *picker_families(), *worker_families(), *economics_families()]


def label_key(family: Family, label: str) -> str:
    key = f"{family.name}:{label}"
    return key if key in LABELS else label


def check_tables() -> None:
    """`WHEN` and `LABELS` match what is exported: every label has a meaning, and no entry
    names a family or label that is gone."""
    families = _inferplane()
    names = {f.name for f in families}
    errors = [f"WHEN names {n}, which the gateway does not export" for n in WHEN
              if n not in {f.name for f in gateway_families()}]
    used: set[str] = set()
    for f in families:
        for label in f.labels:
            key = label_key(f, label)
            if key not in LABELS:
                errors.append(f"{f.name}: label {label!r} has no entry in LABELS")
            used.add(key)
    for key in LABELS:
        family, _, label = key.rpartition(":")
        if key not in used:
            errors.append(f"LABELS entry {key!r} names no exported label"
                          + (f" ({family} is not exported)" if family and family not in names
                             else ""))
    if errors:
        raise StaleTablesError("scripts/gen_metrics_docs.py: " + "; ".join(errors))


def labels_block() -> str:
    check_tables()
    rows: dict[tuple[str, str], list[str]] = {}  # (label, values) → families
    for f in _inferplane():
        for label in f.labels:
            rows.setdefault((label, LABELS[label_key(f, label)]), []).append(f.name)
    lines = ["| label | values | on |", "|---|---|---|"]
    for (label, values), fams in sorted(rows.items()):
        on = ", ".join(f"`{n}`" for n in dict.fromkeys(fams))
        lines.append(f"| `{label}` | {_cell(values)} | {on} |")
    return "\n".join(lines) + "\n"


BLOCKS: dict[str, Callable[[], str]] = {
    "gateway": lambda: table(gateway_families(), when=True),
    "picker": lambda: table(picker_families()),
    "workers": lambda: table(worker_families()),
    "economics": lambda: table(economics_families()),
    "emulator": lambda: table(emulator_families()),
    "labels": labels_block,
}


def render(text: str) -> str:
    """``text`` with every generated block rewritten."""
    return docgen.render(text, BLOCKS, DOC)


def main(argv: list[str] | None = None) -> int:
    return docgen.main(
        argv, description=(__doc__ or "").split("\n")[0], doc=DOC, render=render,
        script="scripts/gen_metrics_docs.py", errors=(StaleTablesError, UnknownCollectorError),
    )


if __name__ == "__main__":
    sys.exit(main())
