"""docs/metrics.md, the metrics reference, is generated from the registries
(scripts/gen_metrics_docs.py): it is current, it lists every family a real gateway's page has,
its hand-kept tables (`WHEN`, `LABELS`) cannot go stale silently, and the docs name no metric
that is not exported."""

from __future__ import annotations

import re
from pathlib import Path
from types import ModuleType

import pytest
from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from inferplane.api.pipeline import Gateway
from inferplane.config.loader import parse_config
from inferplane.fleet.scraper import StaticMetricsSource
from tests.builders import endpoint, load_file, pool_fleet, to_yaml

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "metrics.md"

# backticked `inferplane_…` names in the docs that are not metrics
NOT_METRICS = {"inferplane_original_dst", "inferplane_fail_open", "inferplane_console"}


def gen() -> ModuleType:
    return load_file("gen_metrics_docs", ROOT / "scripts" / "gen_metrics_docs.py")


def test_metrics_reference_is_current() -> None:
    text = DOC.read_text("utf-8")
    assert gen().render(text) == text, (
        "docs/metrics.md is out of date: run `python scripts/gen_metrics_docs.py`"
    )


async def test_reference_lists_every_family_of_a_real_gateways_page() -> None:
    """Independent of the generator's walk: the page a gateway renders, after a request's worth
    of series exist, names only families the reference lists, each with its type."""
    cfg = parse_config(to_yaml(pool_fleet(endpoints=[endpoint("e0", 1)], key="sk-m")), "f.yaml")
    gw = Gateway(cfg, metrics_source=StaticMetricsSource())
    gw.metrics.requests.labels("chat", "e0", "200").inc()
    gw.metrics.loop_lost.count_from(lambda: 0.0)
    text = DOC.read_text("utf-8")
    page = generate_latest(gw.metrics.registry).decode()
    families = list(text_string_to_metric_families(page))
    counters = {f.name for f in families if f.type == "counter"}
    assert len(families) > 40
    for f in families:
        if f.name.endswith("_created") and f.name.removesuffix("_created") in counters:
            continue  # a labelled counter's _created samples, written as a family of their own
        name = f"{f.name}_total" if f.type == "counter" else f.name
        assert f"| `{name}` | {f.type}" in text, name


def test_every_inferplane_family_has_alertable_help() -> None:
    """A help says what is counted in the name's unit: seconds for ``_seconds``, dollars for
    ``_usd``; none is empty."""
    g = gen()
    for f in g._inferplane():
        assert len(f.help.split()) >= 4, f.name
        base = f.name.removesuffix("_total")
        if base.endswith("_seconds"):
            assert "second" in f.help.lower(), f.name
        if base.endswith("_usd"):
            assert "dollar" in f.help.lower() or "USD" in f.help, f.name


def test_a_new_family_is_read_with_its_labels_and_an_unknown_collector_refused() -> None:
    g = gen()
    registry = CollectorRegistry()
    Counter("inferplane_new_things", "New things, by colour", ["colour"], registry=registry)
    (fam,) = g.registry_families(registry)
    assert (fam.name, fam.type, fam.labels) == ("inferplane_new_things_total", "counter",
                                                ("colour",))

    class Custom(Collector):
        def collect(self):  # type: ignore[no-untyped-def]
            return iter(())

        def describe(self):  # type: ignore[no-untyped-def]
            return iter(())

    registry.register(Custom())
    with pytest.raises(g.UnknownCollectorError, match="Custom"):
        g.registry_families(registry)


def test_generator_refuses_a_label_without_meaning(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    g = gen()
    monkeypatch.delitem(g.LABELS, "band")
    with pytest.raises(g.StaleTablesError, match="label 'band'"):
        g.labels_block()
    assert g.main(["--check", "--doc", str(DOC)]) == 2
    assert "inferplane_admission_queue_depth: label 'band'" in capsys.readouterr().err


@pytest.mark.parametrize(("table", "key"), [
    ("WHEN", "inferplane_gone_total"), ("LABELS", "colour"),
    ("LABELS", "inferplane_gone_total:reason"),
])
def test_generator_refuses_entries_that_name_nothing_exported(
    monkeypatch: pytest.MonkeyPatch, table: str, key: str
) -> None:
    g = gen()
    monkeypatch.setitem(getattr(g, table), key, "something")
    with pytest.raises(g.StaleTablesError, match=re.escape(key)):
        g.check_tables()


def test_generator_check_reports_a_stale_page(tmp_path: Path) -> None:
    g = gen()
    stale = tmp_path / "metrics.md"
    lines = DOC.read_text("utf-8").splitlines(keepends=True)
    stale.write_text("".join(x for x in lines if not x.startswith("| `inferplane_ttft_seconds`")))
    assert g.main(["--check", "--doc", str(stale)]) == 1
    assert g.main(["--doc", str(stale)]) == 0  # rewrites it
    assert stale.read_text("utf-8") == DOC.read_text("utf-8")


def test_docs_name_no_metric_that_is_not_exported() -> None:
    """Every backticked ``inferplane_…`` name in README and docs/ (the benchmark logs aside) is
    an exported family, one of its samples (``_total``, ``_created``, ``_bucket``, ``_sum``,
    ``_count``), a prefix (ending in ``_``) or a known non-metric name."""
    known = set(NOT_METRICS)
    for f in gen()._inferplane():
        base = f.name.removesuffix("_total")
        known |= {f.name, *(base + s for s in ("_total", "_created", "_bucket", "_sum", "_count"))}
    files = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    unknown = []
    for path in files:
        if path.name == "benchmarks.md":
            continue
        for span in re.findall(r"`([^`\n]*)`", path.read_text("utf-8")):
            for name in re.findall(r"\binferplane_[a-z0-9_]*[a-z0-9]\b", span):
                if name not in known:
                    unknown.append(f"{path.name}: {name}")
    assert not unknown, unknown
