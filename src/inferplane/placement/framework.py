"""The placement framework: a fixed pipeline of small plugins, pure and synchronous.

``place(profile, snapshot, policy) -> Decision`` runs filters (each returns reasons), then
weighted scorers (each returns values in [0, 1]; the framework clamps, weights and sums), then
exactly one picker, which breaks ties with the policy's seedable random source. No I/O, no clock:
the runner times plugins only through an injected ``timer`` and the decision's time comes from the
snapshot.

A plugin is one small class registered under a *type* (``@register("least-request")``), built
with an instance *name* and validated *parameters*; a class may implement several roles.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol, overload, runtime_checkable

from pydantic import BaseModel, ConfigDict

from inferplane.fleet.model import Fleet
from inferplane.fleet.state import EndpointView, FleetSnapshot
from inferplane.placement.profile import RequestProfile

# `Scored` lives in a module of its own, compiled in the compiled build; exported from here
from inferplane.placement.scored import Scored as Scored

Timer = Callable[[], float]


@dataclass(slots=True)
class CycleState:
    """Per-placement scratch space shared by the plugins of one cycle (like Kubernetes'
    CycleState), and the evidence they leave: ``annotations[endpoint][key] = value`` (predicted
    TTFT, cost, matched blocks …) is copied into the decision."""

    profile: RequestProfile
    snapshot: FleetSnapshot
    rng: random.Random
    data: dict[str, Any] = field(default_factory=dict)
    annotations: dict[str, dict[str, float]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    spillover: Spillover | None = None
    #: endpoint → (view, filter name, reason) for every endpoint removed before scoring, including
    #: ``"failover"`` for those excluded after a failed attempt (the picker's spillover evidence)
    removed: dict[str, tuple[EndpointView, str, str]] = field(default_factory=dict)

    def annotations_of(self, endpoint: str) -> dict[str, float]:
        """The endpoint's annotations, created empty on first use."""
        ann = self.annotations.get(endpoint)
        if ann is None:
            ann = self.annotations[endpoint] = {}
        return ann

    def annotate(self, endpoint: str, key: str, value: float) -> None:
        self.annotations_of(endpoint)[key] = value


@dataclass(slots=True)
class FilterResult:
    """Kept candidates, and for each removed endpoint the reason. (Not frozen: built once per
    filter per decision, and a frozen dataclass's ``__init__`` costs several times more.)"""

    kept: list[EndpointView]
    rejected: dict[str, str] = field(default_factory=dict)


@runtime_checkable
class Filter(Protocol):
    name: str

    def filter(self, cycle: CycleState, candidates: list[EndpointView]) -> FilterResult: ...


@runtime_checkable
class Scorer(Protocol):
    name: str

    def score(self, cycle: CycleState, candidates: list[EndpointView]) -> Sequence[float]: ...


@runtime_checkable
class Picker(Protocol):
    name: str

    def pick(self, cycle: CycleState, scored: list[Scored]) -> Scored: ...


@runtime_checkable
class Proposer(Protocol):
    """Optional: names endpoints that must be among the sampled candidates of a large fleet
    (a prefix index proposes the endpoints holding the most of the prompt; session affinity the
    session's endpoint). Called only when the policy samples. Synchronous, no I/O."""

    name: str

    def propose(self, cycle: CycleState, limit: int) -> list[str]: ...


@runtime_checkable
class PrefixHolder(Protocol):
    """Optional: how many of the prompt's tokens each candidate holds in its prefix cache (its
    longest cached prefix of the prompt, as the plugin's prefix index knows it). The dispatch
    gate reads the policy's first one (`Policy.prefix_holder`) to keep a gated endpoint whose
    cache saves more than its prefill queue costs. Synchronous, no I/O."""

    name: str

    def cached_tokens(self, cycle: CycleState, candidates: Sequence[EndpointView]
                      ) -> list[float]: ...


@runtime_checkable
class PickObserver(Protocol):
    """Optional: told of every pick (e.g. a prefix index learning what each endpoint holds, as
    the Gateway API Inference Extension's PreRequest plugins do). Synchronous, no I/O."""

    name: str

    def on_picked(self, cycle: CycleState, picked: EndpointView) -> None: ...


class NoParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Plugin:
    """Base class for plugins: a name and validated parameters. Subclasses set ``Params``."""

    Params: ClassVar[type[BaseModel]] = NoParams
    type_name: ClassVar[str] = ""
    #: a filter that judges each candidate by its own fields alone (what it keeps of a set is
    #: what it keeps of each member), so that it commutes with every other such filter; False
    #: for one that judges the set as a whole (kept when nothing else remains, a share of the
    #: rest …). `placement.build.required_filters` runs the required ones (and a listed health)
    #: before the first filter that is not.
    per_endpoint: ClassVar[bool] = False

    def __init__(self, name: str, params: BaseModel) -> None:
        self.name = name
        self.params = params


PluginFactory = type[Plugin]
REGISTRY: dict[str, PluginFactory] = {}


def register(type_name: str) -> Callable[[PluginFactory], PluginFactory]:
    """Class decorator: make a plugin class available under ``type_name`` in config."""

    def deco(cls: PluginFactory) -> PluginFactory:
        if type_name in REGISTRY and REGISTRY[type_name] is not cls:
            raise ValueError(f"plugin type {type_name!r} registered twice")
        cls.type_name = type_name
        REGISTRY[type_name] = cls
        return cls

    return deco


#: Why a request left its preferred set: the one vocabulary of spillover reasons used by the
#: decision record, the ``inferplane_spillovers_total{reason}`` metric and the
#: ``x-inferplane-spillover`` header, most serious first.
SPILLOVER_REASONS: tuple[str, ...] = (
    "outage",  # the preferred endpoints fail /health
    "errors",  # ejected for errors (error rate, consecutive 5xx, stale metrics)
    "timeout",  # ejected for first-byte timeouts, or slow against peers
    "rate_limited",  # ejected after 429s (a provider's Retry-After)
    "failover",  # failed an earlier attempt of this request
    "reserved_exhausted",  # the reserved substrate's committed concurrency is in use
    "saturation",  # past the concurrency envelope (low priorities)
    "slo",  # predicted over the latency SLO
)


@dataclass(frozen=True, slots=True)
class Spillover:
    """The request left its preferred set. ``kind`` is one of `SPILLOVER_REASONS` (the most
    serious cause among the preferred endpoints); ``reason`` says it in words with counts.
    Deltas compare the pick with the best preferred endpoint: predicted TTFT and cost where the
    preferred one was scored, else cost at list price over the pick's predicted duration and
    the network RTT from the client (``delta_rtt_s``)."""

    reason: str
    preferred: str | None
    chosen: str
    from_region: str | None
    to_region: str
    delta_ttft_s: float | None = None
    delta_cost_usd: float | None = None
    egress_usd: float | None = None
    kind: str = "slo"
    delta_rtt_s: float | None = None

    def header_value(self) -> str:
        """The ``x-inferplane-spillover`` header: ``reason=…; from=…; to=…; preferred=…;
        chosen=…`` and the deltas that are known (``delta_ttft_ms``, ``delta_rtt_ms``,
        ``delta_cost_usd``). Names and regions match the config's name pattern (no ``;``)."""
        parts = [
            f"reason={self.kind}",
            f"from={self.from_region or '-'}",
            f"to={self.to_region}",
            f"preferred={self.preferred or '-'}",
            f"chosen={self.chosen}",
        ]
        if self.delta_ttft_s is not None:
            parts.append(f"delta_ttft_ms={self.delta_ttft_s * 1e3:.1f}")
        if self.delta_rtt_s is not None:
            parts.append(f"delta_rtt_ms={self.delta_rtt_s * 1e3:.1f}")
        if self.delta_cost_usd is not None:
            parts.append(f"delta_cost_usd={self.delta_cost_usd:.3g}")
        return "; ".join(parts)


@dataclass(slots=True)
class CandidateRecord:
    """One endpoint's evidence in a decision: the filter that removed it and why, or its
    scores, weighted total and annotations. Read-only by convention, not frozen: one is built
    per endpoint per decision, and a frozen dataclass's ``__init__`` (each field set through
    ``object.__setattr__``) cost about as much as everything else recorded for it."""

    endpoint: str
    substrate: str
    rejected_by: str | None = None
    reason: str | None = None
    scores: dict[str, float] = field(default_factory=dict)
    total: float | None = None
    annotations: dict[str, float] = field(default_factory=dict)


def record_fields(rec: CandidateRecord) -> dict[str, Any]:
    """A record's fields as a dict, in field order, the dicts it holds not copied (what the
    ledger encodes; `dataclasses.asdict` would deep-copy them). `Evidence.fields` writes the
    same seven keys inline for a scored candidate: change the two together."""
    return {
        "endpoint": rec.endpoint,
        "substrate": rec.substrate,
        "rejected_by": rec.rejected_by,
        "reason": rec.reason,
        "scores": rec.scores,
        "total": rec.total,
        "annotations": rec.annotations,
    }


class Evidence(Sequence[CandidateRecord]):
    """A decision's candidate records, built when first read: one per endpoint the decision
    judged (the snapshot's, or a large fleet's sample), in its order — the filter's record for
    an endpoint a filter removed, else the scored candidate's scores, total and annotations.

    `place` keeps what the records are made of (the filters' records, the scored candidates,
    the cycle's annotations) instead of building one object per candidate that most readers
    never look at: the gateway reads the pick's annotations (`Decision.candidate` builds that
    one record), and the ledger encodes the rest straight from them (`fields`). Reading it as
    a sequence builds every record once; it then behaves as the tuple of them (equal to an
    equal tuple). A record `get` built is kept: asked again (the gateway reads the pick's
    three or four times a request), or read in the sequence later, it is the same object.

    The records reflect what `place` kept, not a copy of it: they are built from
    ``cycle.annotations`` and the `Scored` (and its scores dict) when read, so nothing may
    mutate those after `place` returns — a plugin or reader that did would change what the
    decision says and what the ledger records. `place` itself is done with them when it
    builds the decision."""

    __slots__ = ("_annotations", "_endpoints", "_items", "_one", "_picked", "_records", "_scored")

    def __init__(
        self,
        endpoints: Sequence[EndpointView],
        records: dict[str, CandidateRecord],
        scored: list[Scored],
        annotations: dict[str, dict[str, float]],
        picked: Scored | None = None,
    ) -> None:
        self._endpoints = endpoints
        self._records = records
        self._scored = scored
        self._annotations = annotations
        self._picked = picked
        self._items: tuple[CandidateRecord, ...] | None = None
        #: the records `get` built, by endpoint (None until it builds one)
        self._one: dict[str, CandidateRecord] | None = None

    def _sources(self) -> Sequence[CandidateRecord | Scored]:
        """Per endpoint, in order: its filter record or its scored candidate."""
        endpoints, records, scored = self._endpoints, self._records, self._scored
        if not records and len(scored) == len(endpoints):
            for sc, v in zip(scored, endpoints, strict=True):
                if sc.view is not v:
                    break
            else:
                return scored  # nothing removed, the candidates in order: the usual case
        by_name = {sc.view.name: sc for sc in scored}
        return [
            records.get(v.name) or by_name.get(v.name) or _rejected(v, "?", "not evaluated")
            for v in endpoints
        ]

    def _record(self, sc: Scored) -> CandidateRecord:
        view = sc.view
        name = view.name
        return CandidateRecord(
            name, view.endpoint.substrate_name, None, None, sc.scores, sc.total,
            self._annotations.get(name, {}),
        )

    def _build(self) -> tuple[CandidateRecord, ...]:
        items = self._items
        if items is None:
            record = self._record
            built = [s if isinstance(s, CandidateRecord) else record(s) for s in self._sources()]
            one = self._one
            if one:  # the records `get` built already stay the ones read
                built = [one.get(c.endpoint, c) for c in built]
            items = self._items = tuple(built)
        return items

    def get(self, endpoint: str) -> CandidateRecord | None:
        """One endpoint's record (built alone if the others were not, and kept), None if the
        decision did not judge it."""
        one = self._one
        if one is not None:
            rec = one.get(endpoint)
            if rec is not None:
                return rec
        rec = self._records.get(endpoint)
        if rec is not None:
            return rec
        items = self._items
        if items is not None:
            for c in items:
                if c.endpoint == endpoint:
                    rec = c
                    break
            else:
                return None
        else:
            picked = self._picked
            if picked is not None and picked.view.name == endpoint:
                rec = self._record(picked)  # the gateway's read: no walk
            else:
                for sc in self._scored:
                    if sc.view.name == endpoint:
                        rec = self._record(sc)
                        break
                else:
                    for v in self._endpoints:
                        if v.name == endpoint:
                            rec = _rejected(v, "?", "not evaluated")
                            break
                    else:
                        return None
        if one is None:
            self._one = {endpoint: rec}
        else:
            one[endpoint] = rec
        return rec

    def fields(self) -> list[dict[str, Any]]:
        """Every record as `record_fields` gives it, built without the record objects where
        they were not built yet (how the ledger encodes a decision)."""
        if self._items is not None:
            return [record_fields(c) for c in self._items]
        ann = self._annotations
        out: list[dict[str, Any]] = []
        for s in self._sources():
            if isinstance(s, CandidateRecord):
                out.append(record_fields(s))
                continue
            view = s.view
            name = view.name
            # `record_fields` of the record `_record` would build, inline: one helper for
            # both cost 5,900 instructions per 16-endpoint encode (0.4 %; callgrind, 18:34 UTC)
            out.append({
                "endpoint": name,
                "substrate": view.endpoint.substrate_name,
                "rejected_by": None,
                "reason": None,
                "scores": s.scores,
                "total": s.total,
                "annotations": ann.get(name, {}),
            })
        return out

    def __len__(self) -> int:
        if self._items is not None:
            return len(self._items)
        return len(self._endpoints)

    @overload
    def __getitem__(self, i: int) -> CandidateRecord: ...
    @overload
    def __getitem__(self, i: slice) -> tuple[CandidateRecord, ...]: ...
    def __getitem__(self, i: int | slice) -> CandidateRecord | tuple[CandidateRecord, ...]:
        return self._build()[i]

    def __iter__(self) -> Iterator[CandidateRecord]:
        return iter(self._build())

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Evidence):
            return self._build() == other._build()
        if isinstance(other, tuple):
            return self._build() == other
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return repr(self._build())


@dataclass(frozen=True, slots=True)
class Envelope:
    """Predicted service envelope of the pick."""

    ttft_s: float | None = None
    itl_s: float | None = None
    cost_usd: float | None = None


#: the envelope of a decision without a pick
NO_ENVELOPE = Envelope()


@dataclass(slots=True)
class Decision:
    """The evidence of one placement. Read-only by convention, not frozen: one is built per
    placement, and a frozen dataclass's ``__init__`` sets each of its twelve fields through
    ``object.__setattr__``."""

    decision_id: str
    policy: str
    profile: RequestProfile
    #: one record per endpoint judged; `place` gives an `Evidence`, built when first read
    candidates: Sequence[CandidateRecord]
    picked: EndpointView | None
    removed_by: dict[str, int]
    predicted: Envelope = NO_ENVELOPE
    spillover: Spillover | None = None
    notes: tuple[str, ...] = ()
    timings_s: dict[str, float] = field(default_factory=dict)
    snapshot_version: int = 0
    at: float = 0.0

    @property
    def endpoint(self) -> str | None:
        return self.picked.name if self.picked is not None else None

    def candidate(self, endpoint: str) -> CandidateRecord:
        """The record of one endpoint (every endpoint of the snapshot has one)."""
        candidates = self.candidates
        if type(candidates) is Evidence:
            got = candidates.get(endpoint)
            if got is not None:
                return got
        else:
            for c in candidates:
                if c.endpoint == endpoint:
                    return c
        raise KeyError(endpoint)


class MaxScorePicker(Plugin):
    """Highest total wins; ties broken uniformly at random (seeded)."""

    def pick(self, cycle: CycleState, scored: list[Scored]) -> Scored:
        best = max(s.total for s in scored)
        top = [s for s in scored if s.total >= best - 1e-12]
        return top[0] if len(top) == 1 else cycle.rng.choice(top)


@dataclass
class Policy:
    """A built placement profile: its filters, weighted scorers and one picker."""

    name: str
    filters: list[Filter]
    scorers: list[tuple[Scorer, float]]
    picker: Picker
    seed: int = 0
    observers: list[PickObserver] = field(default_factory=list)
    max_candidates: int = 0
    #: the scorers in one pass (`inferplane.placement.fused`), set by `build_policies` when the
    #: profile's scorer set is the fused one; None: each scorer in turn (the reference path)
    fused: Callable[[CycleState, list[EndpointView]], list[Scored]] | None = None
    #: the filters in one pass (`inferplane.placement.fused_filters`), set by `build_policies`
    #: when the profile's filter list is the fused one: (kept, per filter its removals)
    fused_filters: (
        Callable[
            [CycleState, list[EndpointView]],
            tuple[list[EndpointView], list[list[tuple[EndpointView, str]]]],
        ]
        | None
    ) = None
    rng: random.Random = field(init=False)
    proposers: list[Proposer] = field(init=False, default_factory=list)
    #: the first filter, scorer or picker that knows the prompt's cached tokens per endpoint
    #: (`PrefixHolder`): the dispatch gate's hit test; None: gated endpoints are always skipped
    prefix_holder: PrefixHolder | None = field(init=False, default=None)
    _pools: dict[str, list[list[int]]] = field(init=False, default_factory=dict, repr=False)
    _pools_of: Fleet | None = field(init=False, default=None, repr=False)

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)
        seen: set[int] = set()
        for p in [*self.filters, *(s for s, _ in self.scorers), self.picker]:
            if id(p) in seen:
                continue
            seen.add(id(p))
            if isinstance(p, Proposer):
                self.proposers.append(p)
            if self.prefix_holder is None and isinstance(p, PrefixHolder):
                self.prefix_holder = p
        if not self.observers:
            seen.clear()
            for p in [*self.filters, *(s for s, _ in self.scorers), self.picker]:
                if isinstance(p, PickObserver) and id(p) not in seen:
                    seen.add(id(p))
                    self.observers.append(p)

    def pools(self, fleet: Fleet, model: str) -> list[list[int]]:
        """Fleet positions of the endpoints serving ``model``, grouped by substrate (pool);
        computed once per fleet and model."""
        if self._pools_of is not fleet:
            self._pools_of = fleet
            self._pools = {}
        got = self._pools.get(model)
        if got is None:
            by_pool: dict[str, list[int]] = {}
            for i, e in enumerate(fleet.endpoints):
                if model in e.models:
                    by_pool.setdefault(e.substrate.name, []).append(i)
            got = self._pools[model] = list(by_pool.values())
        return got


def place(
    profile: RequestProfile,
    snapshot: FleetSnapshot,
    policy: Policy,
    *,
    decision_id: str = "",
    timer: Timer | None = None,
    rng: random.Random | None = None,
) -> Decision:
    """Run one placement cycle. Never raises for an empty result: the decision has
    ``picked=None`` and ``removed_by`` says which filter removed how many endpoints."""
    endpoints = snapshot.endpoints
    limit = policy.max_candidates
    if limit and len(endpoints) > limit:
        cycle = CycleState(profile=profile, snapshot=snapshot, rng=rng or policy.rng)
        sample = _sample(cycle, policy, limit)
        if sample is not None:
            d = _place(cycle, policy, sample, decision_id, timer)
            if d.picked is not None:
                return d
            # nothing in the sample survived the filters: judge the whole fleet, so that a
            # feasible endpoint is never missed and "0/N eligible" counts every endpoint
    cycle = CycleState(profile=profile, snapshot=snapshot, rng=rng or policy.rng)
    return _place(cycle, policy, None, decision_id, timer)


def _sample(cycle: CycleState, policy: Policy, limit: int) -> list[EndpointView] | None:
    """Pool-first candidate sampling for a fleet larger than ``limit``: the endpoints the
    proposers name (prefix holders, the session's endpoint), then a seeded random draw from
    every pool (substrate) serving the model, an equal share each, so that every pool — the
    reserved and the cheap ones included — is represented (Kubernetes' scheduler scores a
    sample of feasible nodes for the same reason). Candidates keep the fleet's order. None when
    the snapshot does not follow the fleet's order (a hand-built snapshot): evaluate all."""
    snapshot = cycle.snapshot
    endpoints = snapshot.endpoints
    fleet = snapshot.fleet
    if len(endpoints) != len(fleet.endpoints):
        return None
    chosen: set[int] = set()
    by_name = fleet.by_name
    for p in policy.proposers:
        for name in p.propose(cycle, limit):
            e = by_name.get(name)
            if e is not None:
                chosen.add(e.index)
    pools = policy.pools(fleet, cycle.profile.model)
    if pools:
        share = -(-max(limit - len(chosen), len(pools)) // len(pools))  # ceil
        rng = cycle.rng
        for pool in pools:
            chosen.update(pool if len(pool) <= share else rng.sample(pool, share))
    picked = sorted(chosen)
    views = [endpoints[i] for i in picked]
    for v in views:
        if v.endpoint is not fleet.endpoints[v.endpoint.index]:
            return None
    if not views:
        return None
    cycle.notes.append(f"sampled {len(views)} of {len(endpoints)} endpoints")
    return views


def _gate_wait_s(c: EndpointView, t: float | None, now: float) -> float:
    """Seconds until the prefill queue the gateway put on a gated endpoint is done: from the
    first tokens predicted for its pending requests (`EndpointState.prefill_done_at`), so a
    prefill that has been running for a while counts only what is left of it; without those
    predictions, or once the latest of them has passed with requests still pending there (the
    prediction was too low: it says nothing about what is left), all of its pending prompt
    tokens at ``t`` seconds each. ``t`` None (no physics model): the pending tokens themselves,
    in tokens — the predictions, in seconds, are not used."""
    st = c.state
    done_at = st.prefill_done_at
    if t is None:
        return float(st.pending_prefill_tokens)
    if done_at is None or done_at <= now:
        return t * st.pending_prefill_tokens
    return done_at - now


def _gate_holders(
    cycle: CycleState, policy: Policy, candidates: list[EndpointView], gated: frozenset[str]
) -> tuple[dict[str, float], frozenset[str]] | None:
    """Before the filters: the prompt tokens each candidate holds (`Policy.prefix_holder`),
    when some gated endpoint holds more of them than its wait costs (`_gate_wait_s` below ``h
    × t``: waiting there is shorter than prefilling, there, what it holds) — those may stay
    candidates (`_gate_keep` decides after the filters, so that an open endpoint a filter
    removes does not count). Returns the tokens held per candidate and those gated endpoints;
    None: every gated endpoint is skipped."""
    holder = policy.prefix_holder
    if holder is None or not cycle.profile.block_hashes:
        return None
    held = holder.cached_tokens(cycle, candidates)
    model, now = cycle.profile.model, cycle.snapshot.now
    maybe = frozenset(
        c.name for c, h in zip(candidates, held, strict=True)
        if c.name in gated and h > 0
        and h * ((t := c.endpoint.prefill_s_per_token(model)) or 1.0) > _gate_wait_s(c, t, now)
    )
    if not maybe:
        return None
    return {c.name: h for c, h in zip(candidates, held, strict=True)}, maybe


def _gate_keep(
    cycle: CycleState, candidates: list[EndpointView], gated: frozenset[str],
    held: dict[str, float],
) -> list[EndpointView]:
    """After the filters: of the gated endpoints they kept, those where the request's cached
    prefix saves more than the prefill queued there costs stay; the rest are dropped (the
    caller records them). With ``P`` the prompt tokens, ``h`` those an endpoint holds, ``t``
    its prefill seconds per token (`Endpoint.prefill_s_per_token`) and ``wait`` the seconds
    until its queued prefill is done (`_gate_wait_s`: from the first tokens predicted for the
    requests pending there, else — or once that prediction is overdue — ``t × pending``, their
    uncached prompt tokens), a gated endpoint stays when ``wait < t × h`` and ``wait + t_gated
    × (P − h)`` (its queue, then the rest of the prompt) is below ``min t_open × (P − h_open)``
    over the open candidates the filters kept (none: it stays). An open endpoint without a
    physics model is counted at the gated one's speed; a gated endpoint without one is judged
    in tokens (``wait`` = its pending tokens, every open one counted at its speed). Without
    predictions, on equal hardware, this is ``h − h_open > pending``. The scorers then choose
    among the candidates."""
    model, now = cycle.profile.model, cycle.snapshot.now
    prompt = float(cycle.profile.prompt_tokens)
    open_s: list[tuple[float, float | None]] = [  # (uncached tokens, s per token) per open one
        (prompt - held.get(c.name, 0.0), c.endpoint.prefill_s_per_token(model))
        for c in candidates if c.name not in gated
    ]
    out: list[EndpointView] = []
    kept: list[str] = []
    for c in candidates:
        if c.name not in gated:
            out.append(c)
            continue
        h = held.get(c.name, 0.0)
        t_g = c.endpoint.prefill_s_per_token(model)
        wait = _gate_wait_s(c, t_g, now)  # in tokens when t_g is None
        t = t_g or 1.0
        if wait < t * h and all(
            wait + t * (prompt - h) < (t if t_o is None or t_g is None else t_o) * rest
            for rest, t_o in open_s
        ):
            out.append(c)
            kept.append(c.name)
    if kept:
        cycle.notes.append(
            f"dispatch gate: kept {', '.join(kept)} (its cached prefix saves more than its "
            "prefill queue costs)"
        )
    return out


def _place(
    cycle: CycleState,
    policy: Policy,
    sample: list[EndpointView] | None,
    decision_id: str,
    timer: Timer | None,
) -> Decision:
    profile, snapshot = cycle.profile, cycle.snapshot
    timings: dict[str, float] = {}
    records: dict[str, CandidateRecord] = {}
    removed: dict[str, int] = {}
    endpoints = snapshot.endpoints if sample is None else sample
    candidates = list(endpoints)
    excluded = profile.excluded
    if excluded:
        kept = [c for c in candidates if c.name not in excluded]
        for c in candidates:
            if c.name in excluded:
                records[c.name] = _rejected(c, "failover", "failed an earlier attempt")
                cycle.removed[c.name] = (c, "failover", "failed an earlier attempt")
        if len(kept) != len(candidates):
            removed["failover"] = len(candidates) - len(kept)
        candidates = kept
    full = profile.full
    if full:
        kept = [c for c in candidates if c.name not in full]
        for c in candidates:
            if c.name in full:
                records[c.name] = _rejected(
                    c, "capacity", "max_concurrency reached across replicas (shared slots)"
                )
        if len(kept) != len(candidates):
            removed["capacity"] = len(candidates) - len(kept)
        candidates = kept
    gated = profile.gated
    holders = None  # the gate's prefix test (`_gate_holders`)
    if gated and candidates:
        holders = _gate_holders(cycle, policy, candidates, gated)
        if holders is not None:  # gated holders that may stay go through the filters first
            gated = gated.difference(holders[1])
    if gated:
        kept = [c for c in candidates if c.name not in gated]
        for c in candidates:
            if c.name in gated:
                records[c.name] = _rejected(
                    c, "capacity", "prefill queue past admission.queue.max_prefill_queue_s"
                )
        if len(kept) != len(candidates):
            removed["capacity"] = removed.get("capacity", 0) + len(candidates) - len(kept)
        candidates = kept

    fused_filters = policy.fused_filters
    if fused_filters is not None and candidates:
        t0 = timer() if timer else 0.0
        candidates, removals = fused_filters(cycle, candidates)
        if timer:
            timings["filter:fused"] = timer() - t0
        gone = cycle.removed
        for f, rem in zip(policy.filters, removals, strict=True) if any(removals) else ():
            if rem:
                fname = f.name
                removed[fname] = removed.get(fname, 0) + len(rem)
                for c, why in rem:
                    records[c.name] = _rejected(c, fname, why)
                    gone[c.name] = (c, fname, why)
    for f in policy.filters if fused_filters is None else ():
        if not candidates:
            break
        t0 = timer() if timer else 0.0
        result = f.filter(cycle, candidates)
        if timer:
            timings[f"filter:{f.name}"] = timer() - t0
        rejected = result.rejected
        if rejected:
            fname = f.name
            removed[fname] = removed.get(fname, 0) + len(rejected)
            gone = cycle.removed
            for c in candidates:
                reason = rejected.get(c.name)
                if reason is not None:
                    records[c.name] = _rejected(c, fname, reason)
                    gone[c.name] = (c, fname, reason)
        candidates = result.kept

    if holders is not None and candidates:
        n = len(candidates)
        kept = _gate_keep(cycle, candidates, profile.gated, holders[0])
        if len(kept) != n:
            stay = {c.name for c in kept}
            for c in candidates:
                if c.name not in stay:
                    records[c.name] = _rejected(
                        c, "capacity", "prefill queue past admission.queue.max_prefill_queue_s"
                    )
            removed["capacity"] = removed.get("capacity", 0) + n - len(kept)
        candidates = kept

    picked: Scored | None = None
    scored: list[Scored] = []
    annotations = cycle.annotations
    fused = policy.fused
    if candidates and fused is not None and not annotations:
        t0 = timer() if timer else 0.0
        scored = fused(cycle, candidates)
        if timer:
            timings["score:fused"] = timer() - t0
        picked = _pick(cycle, policy, scored, timings, timer)
    elif candidates:
        n = len(candidates)
        per: list[dict[str, float]] = [{} for _ in candidates]
        totals = [0.0] * n
        for s, weight in policy.scorers:
            t0 = timer() if timer else 0.0
            values = s.score(cycle, candidates)
            if timer:
                timings[f"score:{s.name}"] = timer() - t0
            if len(values) != n:  # a plugin bug: never score silently by position
                raise ValueError(
                    f"scorer {s.name!r} returned {len(values)} values for {n} candidates"
                )
            name = s.name
            for i, v in enumerate(values):
                if not v > 0.0:  # also NaN
                    v = 0.0
                elif v > 1.0:
                    v = 1.0
                per[i][name] = v
                totals[i] += weight * v
        scored = [Scored(c, t, d) for c, t, d in zip(candidates, totals, per, strict=True)]
        picked = _pick(cycle, policy, scored, timings, timer)

    predicted = NO_ENVELOPE
    if picked is not None:
        a = annotations.get(picked.view.name) or {}
        predicted = Envelope(a.get("ttft_s"), a.get("itl_s"), a.get("cost_usd"))
    return Decision(
        decision_id=decision_id,
        policy=policy.name,
        profile=profile,
        candidates=Evidence(endpoints, records, scored, annotations, picked),
        picked=picked.view if picked is not None else None,
        removed_by=removed,
        predicted=predicted,
        spillover=cycle.spillover,
        notes=tuple(cycle.notes),
        timings_s=timings,
        snapshot_version=snapshot.version,
        at=snapshot.now,
    )


def _pick(
    cycle: CycleState,
    policy: Policy,
    scored: list[Scored],
    timings: dict[str, float],
    timer: Timer | None,
) -> Scored:
    """Run the picker (timed), then tell the observers."""
    picker = policy.picker
    t0 = timer() if timer else 0.0
    picked = picker.pick(cycle, scored)
    if timer:
        timings[f"pick:{picker.name}"] = timer() - t0
    picked_view = picked.view
    for obs in policy.observers:
        obs.on_picked(cycle, picked_view)
    return picked


def _rejected(v: EndpointView, by: str, reason: str) -> CandidateRecord:
    return CandidateRecord(
        endpoint=v.name, substrate=v.endpoint.substrate_name, rejected_by=by, reason=reason
    )
