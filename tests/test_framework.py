"""The placement framework (filters → weighted scorers → one picker) with fake plugins, and the
basic plugins table-driven over a small fleet built from YAML."""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Sequence

import pytest

from inferplane.fleet.state import EndpointState, EndpointView, FleetSnapshot
from inferplane.placement.framework import (
    CycleState,
    FilterResult,
    MaxScorePicker,
    NoParams,
    PickObserver,
    Plugin,
    Policy,
    place,
)
from inferplane.placement.plugins.basic import (
    ContextWindow,
    Health,
    LeastRequest,
    ModelServed,
    RandomPick,
    RoundRobin,
)
from inferplane.placement.profile import RequestProfile
from tests.builders import profile, snapshot, state

NAMES = ["eu-0", "eu-1", "us-0"]

# -- fake plugins ----------------------------------------------------------------------------


class Reject(Plugin):
    """Filter: removes the named endpoints with a reason; remembers what it was given."""

    def __init__(self, name: str, reject: dict[str, str]) -> None:
        super().__init__(name, NoParams())
        self.reject = reject
        self.seen: list[list[str]] = []

    def filter(self, cycle: CycleState, candidates: list[EndpointView]) -> FilterResult:
        self.seen.append([c.name for c in candidates])
        kept = [c for c in candidates if c.name not in self.reject]
        rejected = {c.name: self.reject[c.name] for c in candidates if c.name in self.reject}
        return FilterResult(kept, rejected)


class Fixed(Plugin):
    """Scorer: a fixed raw value per endpoint (anything, even out of range or NaN)."""

    def __init__(self, name: str, values: dict[str, float]) -> None:
        super().__init__(name, NoParams())
        self.values = values
        self.calls = 0

    def score(self, cycle: CycleState, candidates: list[EndpointView]) -> Sequence[float]:
        self.calls += 1
        for c in candidates:
            cycle.annotate(c.name, "raw", self.values.get(c.name, 0.0))
        return [self.values.get(c.name, 0.0) for c in candidates]


class Watcher(Fixed):
    """Scorer and pick observer at once."""

    def __init__(self, name: str) -> None:
        super().__init__(name, {})
        self.picked: list[str] = []

    def on_picked(self, cycle: CycleState, picked: EndpointView) -> None:
        self.picked.append(picked.name)


class Annotator(Plugin):
    """Scorer that leaves a predicted envelope, a note and a spillover-free cycle."""

    def score(self, cycle: CycleState, candidates: list[EndpointView]) -> Sequence[float]:
        for i, c in enumerate(candidates):
            cycle.annotate(c.name, "ttft_s", 0.1 * (i + 1))
            cycle.annotate(c.name, "itl_s", 0.01)
            cycle.annotate(c.name, "cost_usd", 0.002)
        cycle.notes.append("annotated")
        return [1.0 if i == 0 else 0.0 for i in range(len(candidates))]


def policy(
    filters: Sequence[object] = (),
    scorers: Sequence[tuple[object, float]] = (),
    picker: object | None = None,
    seed: int = 0,
) -> Policy:
    return Policy(
        name="test",
        filters=list(filters),  # type: ignore[arg-type]
        scorers=list(scorers),  # type: ignore[arg-type]
        picker=picker or MaxScorePicker("max-score", NoParams()),  # type: ignore[arg-type]
        seed=seed,
    )


def record(decision_candidates: Sequence[object], name: str) -> object:
    return next(c for c in decision_candidates if c.endpoint == name)  # type: ignore[attr-defined]


# -- filters -----------------------------------------------------------------------------------


def test_filters_run_in_order_and_their_reasons_are_recorded() -> None:
    first = Reject("first", {"eu-0": "too warm"})
    second = Reject("second", {"us-0": "too far"})
    d = place(profile(), snapshot(), policy([first, second]))
    assert first.seen == [NAMES]
    assert second.seen == [["eu-1", "us-0"]]  # only what the first kept
    assert d.endpoint == "eu-1"
    assert d.removed_by == {"first": 1, "second": 1}
    assert [c.endpoint for c in d.candidates] == NAMES  # snapshot order
    by = {c.endpoint: c for c in d.candidates}
    assert (by["eu-0"].rejected_by, by["eu-0"].reason) == ("first", "too warm")
    assert (by["us-0"].rejected_by, by["us-0"].reason) == ("second", "too far")
    assert by["eu-1"].rejected_by is None and by["eu-1"].total == 0.0
    assert by["eu-0"].substrate == "eu-h100" and by["us-0"].substrate == "us-h200"


def test_empty_result_is_a_decision_without_pick_and_counts_per_filter() -> None:
    a = Reject("a", {"eu-0": "x", "eu-1": "x"})
    b = Reject("b", {"us-0": "y"})
    never = Reject("never", {})
    scorer = Fixed("s", {})
    d = place(profile(), snapshot(), policy([a, b, never], [(scorer, 1.0)]))
    assert d.picked is None and d.endpoint is None
    assert d.removed_by == {"a": 2, "b": 1}
    assert never.seen == [] and scorer.calls == 0  # nothing left: later stages skipped
    assert {c.endpoint: c.rejected_by for c in d.candidates} == {
        "eu-0": "a",
        "eu-1": "a",
        "us-0": "b",
    }
    assert d.predicted.ttft_s is None


def test_excluded_endpoints_are_removed_first_with_a_reason() -> None:
    f = Reject("f", {})
    d = place(profile(excluded=frozenset({"eu-0", "gone"})), snapshot(), policy([f]))
    assert f.seen == [["eu-1", "us-0"]]
    assert d.removed_by == {"failover": 1}
    rec = record(d.candidates, "eu-0")
    assert rec.rejected_by == "failover"  # type: ignore[attr-defined]
    assert rec.reason == "failed an earlier attempt"  # type: ignore[attr-defined]
    assert d.endpoint in {"eu-1", "us-0"}


def test_all_excluded_gives_no_pick() -> None:
    d = place(profile(excluded=frozenset(NAMES)), snapshot(), policy())
    assert d.picked is None and d.removed_by == {"failover": 3}


# -- scoring -----------------------------------------------------------------------------------


def test_framework_clamps_weights_and_sums() -> None:
    s1 = Fixed("s1", {"eu-0": -0.5, "eu-1": 1.7, "us-0": math.nan})
    s2 = Fixed("s2", {"eu-0": 0.5, "eu-1": 0.25, "us-0": 1.0})
    d = place(profile(), snapshot(), policy(scorers=[(s1, 2.0), (s2, 0.5)]))
    by = {c.endpoint: c for c in d.candidates}
    assert by["eu-0"].scores == {"s1": 0.0, "s2": 0.5}
    assert by["eu-1"].scores == {"s1": 1.0, "s2": 0.25}
    assert by["us-0"].scores == {"s1": 0.0, "s2": 1.0}  # NaN → 0
    assert by["eu-0"].total == pytest.approx(0.25)
    assert by["eu-1"].total == pytest.approx(2.125)
    assert by["us-0"].total == pytest.approx(0.5)
    assert d.endpoint == "eu-1"
    assert by["eu-0"].annotations == {"raw": 0.5}  # the last scorer's annotation
    for c in d.candidates:
        assert all(0.0 <= v <= 1.0 for v in c.scores.values())


@pytest.mark.parametrize(
    ("raw", "clamped"),
    [(-1e9, 0.0), (0.0, 0.0), (0.3, 0.3), (1.0, 1.0), (2.0, 1.0), (math.inf, 1.0),
     (-math.inf, 0.0), (math.nan, 0.0)],
)  # fmt: skip
def test_clamp_table(raw: float, clamped: float) -> None:
    d = place(profile(), snapshot(), policy(scorers=[(Fixed("s", {"eu-0": raw}), 1.0)]))
    assert record(d.candidates, "eu-0").scores == {"s": clamped}  # type: ignore[attr-defined]


def test_zero_weight_scorer_counts_for_nothing() -> None:
    loud = Fixed("loud", {"us-0": 1.0})
    quiet = Fixed("quiet", {"eu-0": 1.0})
    d = place(profile(), snapshot(), policy(scorers=[(loud, 0.0), (quiet, 1.0)]))
    assert d.endpoint == "eu-0"
    assert record(d.candidates, "us-0").scores == {"loud": 1.0, "quiet": 0.0}  # type: ignore[attr-defined]


def test_a_scorer_with_the_wrong_number_of_values_is_a_bug_not_a_silent_zero() -> None:
    class Short(Plugin):
        def score(self, cycle: CycleState, candidates: list[EndpointView]) -> Sequence[float]:
            return [1.0]

    with pytest.raises(ValueError, match="scorer 'short' returned 1 values for 3 candidates"):
        place(profile(), snapshot(), policy(scorers=[(Short("short", NoParams()), 1.0)]))


def test_annotations_become_the_predicted_envelope() -> None:
    d = place(
        profile(),
        snapshot(now=42.5, version=9),
        policy(scorers=[(Annotator("ann", NoParams()), 1.0)]),
        decision_id="d-1",
    )
    assert d.endpoint == "eu-0"
    assert (d.predicted.ttft_s, d.predicted.itl_s, d.predicted.cost_usd) == (0.1, 0.01, 0.002)
    assert d.notes == ("annotated",)
    assert (d.decision_id, d.policy, d.snapshot_version, d.at) == ("d-1", "test", 9, 42.5)
    assert d.spillover is None


# -- picking -----------------------------------------------------------------------------------


def picks(seed: int, n: int = 40) -> list[str]:
    p = policy(seed=seed)  # no scorers: every candidate ties at 0
    snap = snapshot()
    return [place(profile(), snap, p).endpoint or "" for _ in range(n)]


def test_ties_broken_by_seeded_rng_same_seed_same_picks() -> None:
    assert picks(3) == picks(3)
    assert set(picks(3)) == set(NAMES)  # every tied endpoint gets picked over many trials


def test_ties_different_seeds_reach_every_endpoint() -> None:
    first_picks = {picks(seed, n=1)[0] for seed in range(40)}
    assert first_picks == set(NAMES)
    assert len({tuple(picks(seed, n=10)) for seed in range(5)}) > 1


def test_injected_rng_overrides_the_policy_rng() -> None:
    p = policy(seed=0)
    snap = snapshot()
    a = [place(profile(), snap, p, rng=random.Random(5)).endpoint for _ in range(5)]
    b = [place(profile(), snap, p, rng=random.Random(5)).endpoint for _ in range(5)]
    assert a == b and len(set(a)) == 1  # fresh rng per call: same first draw each time


def test_max_score_picks_a_unique_best_without_the_rng() -> None:
    class NoRandom(random.Random):
        def choice(self, seq: Sequence[object]) -> object:
            raise AssertionError("rng used for a unique best")

    s = Fixed("s", {"us-0": 0.9, "eu-0": 0.8})
    d = place(profile(), snapshot(), policy(scorers=[(s, 1.0)]), rng=NoRandom())
    assert d.endpoint == "us-0"


def test_max_score_ties_only_among_the_best() -> None:
    s = Fixed("s", {"eu-1": 0.7, "us-0": 0.7, "eu-0": 0.2})
    seen = {
        place(profile(), snapshot(), policy([], [(s, 1.0)], seed=k)).endpoint for k in range(30)
    }
    assert seen == {"eu-1", "us-0"}


def test_round_robin_cycles_in_endpoint_order() -> None:
    rr = RoundRobin("rr", NoParams())
    p = policy(picker=rr)
    snap = snapshot()
    got = [place(profile(), snap, p).endpoint for _ in range(7)]
    assert got == ["eu-0", "eu-1", "us-0", "eu-0", "eu-1", "us-0", "eu-0"]


def test_round_robin_over_the_remaining_candidates() -> None:
    p = policy([Reject("f", {"eu-1": "x"})], picker=RoundRobin("rr", NoParams()))
    snap = snapshot()
    assert [place(profile(), snap, p).endpoint for _ in range(4)] == ["eu-0", "us-0"] * 2


def test_random_picker_is_seeded() -> None:
    def run(seed: int) -> list[str | None]:
        p = policy(picker=RandomPick("random", NoParams()), seed=seed)
        return [place(profile(), snapshot(), p).endpoint for _ in range(30)]

    assert run(1) == run(1)
    assert set(run(1)) == set(NAMES)


# -- least-request -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("states", "scores"),
    [
        ({}, [1.0, 1.0, 1.0]),
        ({"eu-0": state(inflight=4), "eu-1": state(inflight=2)}, [0.0, 0.5, 1.0]),
        ({"eu-0": state(inflight=1, waiting=3.0), "us-0": state(inflight=2)}, [0.0, 1.0, 0.5]),
        # a stale engine's queue is not trusted: only the gateway's own in-flight count
        ({"eu-0": state(inflight=1, waiting=30.0, stale=True)}, [0.0, 1.0, 1.0]),
    ],
    ids=["all-equal", "inflight", "inflight+waiting", "stale-waiting-ignored"],
)
def test_least_request_scores(states: dict[str, EndpointState], scores: list[float]) -> None:
    snap = snapshot(states=states)
    got = LeastRequest("lr", NoParams()).score(cycle_for(profile(), snap), list(snap.endpoints))
    assert list(got) == pytest.approx(scores)


def test_least_request_prefers_fewer_in_flight() -> None:
    snap = snapshot(states={"eu-0": state(inflight=9), "eu-1": state(inflight=1),
                            "us-0": state(inflight=5)})  # fmt: skip
    p = policy(scorers=[(LeastRequest("lr", NoParams()), 1.0)])
    assert {place(profile(), snap, p).endpoint for _ in range(10)} == {"eu-1"}


# -- timings and observers ------------------------------------------------------------------------


def test_timings_only_with_an_injected_timer() -> None:
    ticks = itertools.count()

    def timer() -> float:
        return float(next(ticks))

    p = policy([Reject("f", {})], [(Fixed("s", {}), 1.0)])
    d = place(profile(), snapshot(), p, timer=timer)
    assert d.timings_s == {"filter:f": 1.0, "score:s": 1.0, "pick:max-score": 1.0}
    assert place(profile(), snapshot(), p).timings_s == {}


def test_pick_observers_called_once_per_pick() -> None:
    w = Watcher("w")
    p = policy([Reject("f", {"eu-0": "x"})], [(w, 1.0)])
    assert p.observers == [w]  # collected from the policy's plugins
    d1 = place(profile(), snapshot(), p)
    d2 = place(profile(), snapshot(), p)
    assert w.picked == [d1.endpoint, d2.endpoint]
    place(profile(excluded=frozenset(NAMES)), snapshot(), p)  # no pick: not called
    assert len(w.picked) == 2


def test_observer_in_two_roles_is_called_once() -> None:
    class FilterWatcher(Watcher):
        def filter(self, cycle: CycleState, candidates: list[EndpointView]) -> FilterResult:
            return FilterResult(candidates)

    w = FilterWatcher("fw")
    p = policy([w], [(w, 1.0)])
    assert p.observers == [w]
    assert isinstance(w, PickObserver)
    place(profile(), snapshot(), p)
    assert len(w.picked) == 1


def test_explicit_observers_replace_collected_ones() -> None:
    w, other = Watcher("w"), Watcher("other")
    p = Policy("t", [], [(w, 1.0)], MaxScorePicker("m", NoParams()), observers=[other])
    place(profile(), snapshot(), p)
    assert (w.picked, len(other.picked)) == ([], 1)


# -- basic filters, table-driven -------------------------------------------------------------


def cycle_for(prof: RequestProfile, snap: FleetSnapshot) -> CycleState:
    return CycleState(profile=prof, snapshot=snap, rng=random.Random(0))


def run_filter(
    plugin: Plugin, prof: RequestProfile, states: dict[str, EndpointState] | None = None
) -> tuple[list[str], dict[str, str]]:
    snap = snapshot(states=states)
    result = plugin.filter(cycle_for(prof, snap), list(snap.endpoints))  # type: ignore[attr-defined]
    return [v.name for v in result.kept], dict(result.rejected)


@pytest.mark.parametrize(
    ("prof", "kept", "rejected"),
    [
        (profile(), NAMES, {}),
        (
            profile(model="qwen3-32b"),
            ["us-0"],
            {
                "eu-0": "does not serve model 'qwen3-32b'",
                "eu-1": "does not serve model 'qwen3-32b'",
            },
        ),
        (
            profile(variant="instruct"),
            ["eu-1"],
            {
                "eu-0": "serves variant 'default', not 'instruct'",
                "us-0": "serves variant 'default', not 'instruct'",
            },
        ),
        (profile(model="nope"), [], {n: "does not serve model 'nope'" for n in NAMES}),
    ],
    ids=["served-everywhere", "one-endpoint", "variant", "nowhere"],
)
def test_model_served(prof: RequestProfile, kept: list[str], rejected: dict[str, str]) -> None:
    assert run_filter(ModelServed("model-served", NoParams()), prof) == (kept, rejected)


TOO_LONG = "needs 8193 tokens, max context 8192"


@pytest.mark.parametrize(
    ("prof", "kept", "rejected"),
    [
        (profile(prompt_tokens=8000, max_output_tokens=192), NAMES, {}),  # exact fit
        (
            profile(prompt_tokens=8000, max_output_tokens=193),
            ["us-0"],
            {"eu-0": TOO_LONG, "eu-1": TOO_LONG},
        ),
        (profile(prompt_tokens=8192, max_output_tokens=0), NAMES, {}),
        # embeddings produce no output tokens: only the prompt must fit
        (profile(api="embeddings", prompt_tokens=8000, max_output_tokens=5000), NAMES, {}),
        (
            profile(prompt_tokens=40000),
            [],
            {
                "eu-0": "needs 40100 tokens, max context 8192",
                "eu-1": "needs 40100 tokens, max context 8192",
                "us-0": "needs 40100 tokens, max context 32768",
            },
        ),
        # an endpoint that does not serve the model is model-served's business, not this one's
        (profile(model="qwen3-32b", prompt_tokens=9000), NAMES, {}),
    ],
    ids=["exact-fit", "one-over", "prompt-only", "embeddings", "too-long", "not-served"],
)
def test_context_window(prof: RequestProfile, kept: list[str], rejected: dict[str, str]) -> None:
    assert run_filter(ContextWindow("context-window", NoParams()), prof) == (kept, rejected)


@pytest.mark.parametrize(
    ("states", "kept", "rejected"),
    [
        ({}, NAMES, {}),
        ({"eu-0": state(healthy=False)}, ["eu-1", "us-0"], {"eu-0": "failing /health"}),
        (
            {"eu-1": state(ejected=True, ejected_reason="p99 TTFT 4x fleet")},
            ["eu-0", "us-0"],
            {"eu-1": "ejected: p99 TTFT 4x fleet"},
        ),
        ({"us-0": state(ejected=True)}, ["eu-0", "eu-1"], {"us-0": "ejected: outlier"}),
        # stale metrics are not a health verdict
        ({"eu-0": state(stale=True)}, NAMES, {}),
        (
            {"eu-0": state(healthy=False, ejected=True)},
            ["eu-1", "us-0"],
            {"eu-0": "failing /health"},
        ),
    ],
    ids=["all-healthy", "unhealthy", "ejected", "ejected-no-reason", "stale-ok", "both"],
)
def test_health(
    states: dict[str, EndpointState], kept: list[str], rejected: dict[str, str]
) -> None:
    assert run_filter(Health("health", NoParams()), profile(), states) == (kept, rejected)


def test_basic_filters_in_a_policy_say_who_removed_what() -> None:
    p = policy(
        [
            ModelServed("model-served", NoParams()),
            ContextWindow("context-window", NoParams()),
            Health("health", NoParams()),
        ],
        [(LeastRequest("least-request", NoParams()), 1.0)],
    )
    snap = snapshot(states={"us-0": state(healthy=False)})
    d = place(profile(variant="instruct", prompt_tokens=9000), snap, p)
    assert d.picked is None
    assert d.removed_by == {"model-served": 2, "context-window": 1}
    d = place(profile(), snap, p)
    assert d.endpoint in {"eu-0", "eu-1"} and d.removed_by == {"health": 1}
