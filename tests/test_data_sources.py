"""Data sources: where a request's data lives, named by header or class — co-location as a
preference, residency as a hard filter — from the fleet file through classify to placement and
the decision record."""

from __future__ import annotations

import random
import time

import pytest

from inferplane.config.loader import parse_config
from inferplane.errors import ConfigError, InvalidRequestError
from inferplane.fleet.live import LiveFleet
from inferplane.fleet.model import Fleet
from inferplane.ledger.record import decision_to_dict
from inferplane.placement.build import build_policies
from inferplane.placement.classify import Classifier
from inferplane.placement.framework import REGISTRY, CycleState, place
from tests.builders import SMALL_FLEET_YAML

SOURCES = """\
data_sources:
  - {name: eu-patients, region: eu-west, jurisdiction: eu, residency: true}
  - {name: us-catalog, region: us-east, jurisdiction: us}
classes:
  - {name: clinical, data_source: eu-patients}
"""
CONFIG = parse_config(SMALL_FLEET_YAML + SOURCES, "fleet.yaml")
CLASSIFIER = Classifier(CONFIG)
TENANTS = {t.name: t for t in CONFIG.tenants}


def classify(headers: dict[str, str], tenant: str = "acme"):  # type: ignore[no-untyped-def]
    profile, _ = CLASSIFIER.classify(
        request_id="r-1", api="chat",
        body={"model": "llama-3.1-8b", "messages": [{"role": "user", "content": "hi"}]},
        headers=headers, tenant=TENANTS[tenant],
    )
    return profile


def test_a_named_source_sets_the_data_region_and_residency_narrows_jurisdictions() -> None:
    p = classify({"x-inferplane-data-source": "eu-patients"})
    assert (p.data_source, p.data_region) == ("eu-patients", "eu-west")
    assert p.allowed_jurisdictions == frozenset({"eu"})  # acme may use eu and us
    q = classify({"x-inferplane-data-source": "us-catalog"})
    assert (q.data_region, q.allowed_jurisdictions) == ("us-east", frozenset({"eu", "us"}))
    c = classify({"x-inferplane-class": "clinical"})
    assert c.data_source == "eu-patients" and c.allowed_jurisdictions == frozenset({"eu"})
    assert classify({}).data_source is None


@pytest.mark.parametrize(
    ("headers", "param", "match"),
    [
        ({"x-inferplane-data-source": "nope"}, "x-inferplane-data-source",
         "unknown data source 'nope'; known: eu-patients, us-catalog"),
        ({"x-inferplane-data-source": "eu-patients", "x-inferplane-jurisdictions": "us"},
         "x-inferplane-data-source", "keeps its data in jurisdiction 'eu'"),
        ({"x-inferplane-data-source": "us-catalog", "x-inferplane-data-region": "eu-west"},
         "x-inferplane-data-region", "lives in 'us-east'"),
    ],
)
def test_bad_data_source_requests_are_400s(
    headers: dict[str, str], param: str, match: str
) -> None:
    with pytest.raises(InvalidRequestError, match=match) as info:
        classify(headers)
    assert info.value.status == 400 and info.value.param == param


@pytest.mark.parametrize(
    ("extra", "where"),
    [
        ("data_sources: [{name: d, region: mars, jurisdiction: eu}]\n", "data_sources[0].region"),
        ("classes: [{name: c, data_source: missing}]\n", "data_source"),
        ("data_sources: [{name: d, region: eu-west, jurisdiction: eu},"
         " {name: d, region: us-east, jurisdiction: us}]\n", "data_sources[1]"),
    ],
)
def test_config_errors_name_the_field(extra: str, where: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(SMALL_FLEET_YAML + extra, "fleet.yaml")
    assert where in str(info.value)


def test_residency_is_a_hard_filter_and_the_record_names_the_source() -> None:
    live = LiveFleet(Fleet.from_config(CONFIG), stale_after_s=2.0)
    policy = build_policies(CONFIG, "fleet.yaml")["default"]
    # the only endpoint that serves qwen3-32b is in the US: a residency source in the EU
    # leaves nothing, and says why
    profile = classify({"x-inferplane-data-source": "eu-patients"}).with_(model="qwen3-32b")
    d = place(profile, live.snapshot(), policy, decision_id="r-1", timer=time.perf_counter)
    assert d.picked is None and "jurisdiction" in " ".join(d.removed_by)
    eu = place(classify({"x-inferplane-data-source": "eu-patients"}), live.snapshot(), policy,
               decision_id="r-2", timer=time.perf_counter)
    assert eu.picked is not None and eu.picked.endpoint.jurisdiction == "eu"
    rec = decision_to_dict(eu)["request"]
    assert (rec["data_source"], rec["data_region"]) == ("eu-patients", "eu-west")


def test_a_source_without_residency_is_a_co_location_preference() -> None:
    """The locality scorer's data term rewards endpoints in the source's region."""
    live = LiveFleet(Fleet.from_config(CONFIG), stale_after_s=2.0)
    snap = live.snapshot()
    scorer = REGISTRY["locality"]("locality", REGISTRY["locality"].Params())
    views = [v for v in snap.endpoints if v.name in ("eu-0", "us-0")]

    def scores(headers: dict[str, str]) -> dict[str, float]:
        cyc = CycleState(profile=classify(headers, tenant="globex"), snapshot=snap,
                         rng=random.Random(0))
        return dict(zip((v.name for v in views), scorer.score(cyc, views), strict=True))

    us = scores({"x-inferplane-data-source": "us-catalog"})
    eu = scores({"x-inferplane-data-source": "eu-patients"})
    assert us["us-0"] > us["eu-0"] and eu["eu-0"] > eu["us-0"]
