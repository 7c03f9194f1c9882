"""Fused scoring: the default profile's seven scorers in one pass over the candidates.

The framework's reference path asks each scorer for a list of values, then clamps, weighs and
sums them and builds one score dict per candidate; each scorer walks the candidates again,
reads the same fields again and writes its annotations into the cycle one key at a time. At 16
endpoints that bookkeeping is most of a decision's cost. `FusedScoring` computes exactly what
the reference path computes for one fixed scorer set — ``predicted-latency``,
``prefix-affinity`` (``room_weight: 0``), ``session-affinity``, ``load``, ``cost``,
``locality`` and ``energy``, in that order, any weights and parameters (the shipped ``default``
profile) — in one walk: every value, every annotation (same keys, same order), the same score
dicts, weighted totals summed in the same order, the same state left for ``on_picked``.

It is a second implementation of those formulas, kept honest by ``tests/test_placement_fused.py``
(randomised fleets, loads and requests: fused and reference decisions must be equal, evidence
included) and by ``bench/placement_speed.py --dump`` (byte-identical before and after). A
profile with any other scorer set, order or a room weight is scored by the reference path;
``Policy.fused`` is None there. The prefix matchers, session affinity's memory
(`SessionAffinity.endpoint_of`) and energy are still the plugins themselves (their logic lives
in one place); the per-endpoint constants and price tables are the plugins' own caches.

What makes the pass cheaper than the plugins in turn, besides walking the candidates once:

* **One prefix walk.** When no other profile uses the profile's ``predicted-latency`` and
  ``prefix-affinity`` instances and their matchers have the same parameters, both would learn
  every pick into identical indexes; `compile` makes prefix-affinity read predicted-latency's
  (`PrefixAffinity.share_matcher`), so a decision walks the prompt's chain once and a pick is
  learned once.
* **Per-state terms.** What an endpoint's state object alone determines — predicted-latency's
  load terms (batch, KV, queue, decode step), its TTFT correction and expected-retry factors,
  and the load scorer's value — is kept per endpoint while the snapshot keeps its view (the
  live fleet gives a new view and state only to endpoints that changed: a reservation touches
  one), in one tuple with the endpoint's constants: a candidate's inputs are one lookup.
* **The TTFT step inlined.** ``Roofline.step_time_s`` for the uncached prompt is computed in
  the loop from the roofline's constants (`Roofline.step_terms`), in the same order of
  operations.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from inferplane.config.schema import RegionSpec
from inferplane.fleet.model import Endpoint, Fleet
from inferplane.fleet.state import EndpointState, EndpointView
from inferplane.physics import Roofline
from inferplane.placement.framework import CycleState, Policy, Scored
from inferplane.placement.latency_terms import NO_STEP, Loads, _Consts, kept_load_terms
from inferplane.placement.plugins.affinity import PrefixAffinity, SessionAffinity
from inferplane.placement.plugins.economics import Cost, Energy, Load, Locality, _Price
from inferplane.placement.plugins.latency import PredictedLatency

#: (TTFT correction factor or None, expected-retry factor, load value clamped, busy (in
#: flight > 0), context the load terms were computed for, batch, KV tokens, queue_s, raw ITL):
#: `FusedScoring._state_terms`
_StateTerms = tuple[float | None, float, float, bool, float, int, int, float, float]
#: (endpoint, predicted-latency's constants, roofline, region, fixed TTFT s, embedding, price,
#: hourly rate per second or None, the roofline's ten step terms): `FusedScoring._row`
_Row = tuple[
    Endpoint, _Consts, Roofline | None, str, float, bool, _Price, float | None,
    float, float, float, float, float, float, float, float, float, float,
]


class _Cand:
    """One candidate's inputs, kept at its endpoint's fleet position while the snapshot keeps
    its view (`FusedScoring._terms_of`): the view, endpoint, state and name, the endpoint's
    constants (`FusedScoring._row`: predicted-latency's, the price's, the roofline's ten step
    terms) and what the state alone determines (`FusedScoring._state_terms`). A class, not a
    tuple: compiled, its fields are read where they are stored, without unboxing a tuple's."""

    __slots__ = ("attn", "batch", "busy", "comm", "ctx_of", "ctx_s", "embedding", "ep",
                 "fixed", "fixed_s", "hourly_s", "inv_bw", "inv_flops", "itl_obs", "k", "kv",
                 "kvb", "lin", "name", "p_burst", "p_cached", "p_conc", "p_in", "p_out",
                 "queue_s", "r", "raw_i", "region", "retry", "s", "seq", "tf", "v4", "view",
                 "wbytes")

    def __init__(self, view: EndpointView, row: _Row, st: _StateTerms) -> None:
        self.view = view
        s = view.state
        self.s = s
        self.name = view.name
        self.itl_obs = s.itl_p50_s
        (self.ep, self.k, self.r, self.region, self.fixed_s, self.embedding, pr, self.hourly_s,
         self.lin, self.attn, self.inv_flops, self.wbytes, self.kvb, self.inv_bw, self.comm,
         self.fixed, self.seq, self.ctx_s) = row
        self.p_in, self.p_cached, self.p_out = pr.input, pr.cached, pr.output
        self.p_conc, self.p_burst = pr.concurrency, pr.burst
        (self.tf, self.retry, self.v4, self.busy, self.ctx_of, self.batch, self.kv,
         self.queue_s, self.raw_i) = st


#: client regions whose RTTs `FusedScoring` keeps at once (`FusedScoring._rtt`)
_MAX_CLIENT_REGIONS = 64

#: The scorer classes (exact types, in profile order) that `FusedScoring` computes.
FUSED_SCORERS: tuple[type, ...] = (
    PredictedLatency,
    PrefixAffinity,
    SessionAffinity,
    Load,
    Cost,
    Locality,
    Energy,
)


class FusedScoring:
    """Scores a policy's candidates in one pass (module docstring). Build with `compile`."""

    __slots__ = ("A", "C", "E", "L", "Lo", "P", "S", "_cost_p", "_fleet", "_loc_p", "_rows",
                 "_rtt", "_terms", "names", "weights")

    def __init__(self, policy: Policy) -> None:
        plugins = [s for s, _ in policy.scorers]
        self.P, self.A, self.S, self.L, self.C, self.Lo, self.E = plugins
        self.names = tuple(s.name for s in plugins)
        self.weights = tuple(w for _, w in policy.scorers)
        # model → per fleet position: the endpoint's constants (`_row`), and the candidate's
        # view with those and what its state object alone determines (`_terms`)
        self._rows: dict[str, list[_Row | None]] = {}
        self._terms: dict[str, list[_Cand | None]] = {}
        self._fleet: Fleet | None = None
        # client region → region → `Fleet.rtt_s` (the fleet's, fixed while it is loaded)
        self._rtt: dict[str | None, dict[str, float]] = {}
        # the cost and locality scorers' parameters as plain values (a pydantic model's
        # attribute costs several times a local's)
        cp, lp = self.C.p, self.Lo.p  # type: ignore[attr-defined]
        self._cost_p: tuple[float, float] = (cp.output_fraction, cp.burst_factor)
        self._loc_p: tuple[float, float, float, float, float, float] = (
            lp.bytes_per_token, lp.output_fraction, lp.rtt_reference_s, lp.rtt_weight,
            lp.egress_weight, lp.data_weight,
        )

    @classmethod
    def compile(
        cls, policy: Policy, exclusive: Callable[[object], bool] | None = None
    ) -> FusedScoring | None:
        """The fused scorer for ``policy``, or None when its scorers are not exactly the fused
        set (then the reference path scores it). ``exclusive(plugin)``: whether no other
        profile uses that plugin instance; when both prefix-reading plugins are exclusive and
        their indexes would be identical, prefix-affinity reads predicted-latency's
        (`PrefixAffinity.share_matcher`: one walk of the prompt's chain and one lesson per
        pick instead of two)."""
        if tuple(type(s) for s, _ in policy.scorers) != FUSED_SCORERS:
            return None
        latency = policy.scorers[0][0]
        prefix = policy.scorers[1][0]
        assert isinstance(latency, PredictedLatency) and isinstance(prefix, PrefixAffinity)
        if prefix.room_weight > 0 or getattr(prefix, "rendezvous_weight", 0.0) > 0:
            return None  # the extra terms for new prefixes are scored by the plugin itself
        names = [s.name for s, _ in policy.scorers]
        if len(set(names)) != len(names):
            return None
        if (
            exclusive is not None
            and exclusive(latency)
            and exclusive(prefix)
            and prefix.matcher is not latency.matcher
            and latency.matcher.twin_of(prefix.matcher)
        ):
            prefix.share_matcher(latency.matcher)
        return cls(policy)

    def _row(self, ep: Endpoint, model: str, rows: list[_Row | None]) -> _Row:
        """The endpoint's constants for ``model``: predicted-latency's (`_Consts`), the cost
        scorer's price (`_Price`, its hourly rate per second) and the roofline's step terms
        (`Roofline.step_terms`), at the endpoint's fleet position in ``rows``."""
        P, C = self.P, self.C
        assert isinstance(P, PredictedLatency) and isinstance(C, Cost)
        k = (P._consts.get(model) or {}).get(ep) or P._constants(ep, model)
        pr = (C._prices.get(model) or {}).get(ep) or C._price(ep, model)
        r = k.roofline
        terms = r.step_terms() if r is not None else NO_STEP
        hourly_s = pr.hourly / 3600.0 if pr.hourly is not None else None
        row: _Row = (ep, k, r, k.region, k.fixed_s, k.embedding, pr, hourly_s, *terms)
        i = ep.index
        if i >= len(rows):
            rows.extend([None] * (i + 1 - len(rows)))
        rows[i] = row
        return row

    def _state_terms(
        self,
        ep: Endpoint,
        s: EndpointState,
        k: _Consts,
        idle_ctx: float,
        model: str,
        loads: Loads,
    ) -> _StateTerms:
        """What the endpoint's state alone determines: its TTFT correction and expected-retry
        factors and the load scorer's clamped value, and predicted-latency's load terms
        (batch, KV tokens, queue_s, raw ITL; for an idle endpoint with the request's prompt +
        max output as the context, ``idle_ctx``)."""
        P, L = self.P, self.L
        assert isinstance(P, PredictedLatency) and isinstance(L, Load)
        r = k.roofline
        if r is None:
            batch, kv, queue_s, raw_i = 0, 0, 0.0, 0.0
        else:
            batch, kv, queue_s, raw_i = kept_load_terms(ep, s, k, idle_ctx, loads)
        f = s.ttft_ratio_p50
        kmin, kmax = P._kmin, P._kmax
        tf = None if f is None else (kmin if f < kmin else (kmax if f > kmax else f))
        e = s.error_rate
        retry = 1.0
        if e > 0.0 and P._err_w > 0.0:
            err_max = P._err_max
            retry = 1.0 + P._err_w * e / (1.0 - (e if e < err_max else err_max))
        # load (`Load.score`), clamped as the framework clamps
        x = (s.inflight + s.queue_depth) / ep.spec.max_concurrency
        lconc = x if x < 1.0 else 1.0
        blocks, block_size = s.num_gpu_blocks, s.block_size
        cap = float(blocks * block_size) if blocks and block_size else L._capacity(ep, model)
        x = s.inflight_tokens / cap
        tok = x if x < 1.0 else 1.0
        kv_usage = s.kv_usage
        kvu = kv_usage if not s.stale and kv_usage is not None else 0.0
        v = 1.0 - (L.wq * lconc + L.wt * tok + L.wk * kvu) / L.norm
        if not v > 0.0:
            v = 0.0
        elif v > 1.0:
            v = 1.0
        return tf, retry, v, s.inflight > 0, idle_ctx, batch, kv, queue_s, raw_i

    def _terms_of(
        self,
        c: EndpointView,
        model: str,
        idle_ctx: float,
        loads: Loads,
        rows: list[_Row | None],
        terms: list[_Cand | None],
    ) -> _Cand:
        """The candidate's view, endpoint, state and name, its endpoint's constants (`_row`)
        and what its state alone determines (`_state_terms`) in one `_Cand`, kept at the
        endpoint's fleet position while the snapshot keeps that view (the live fleet gives a
        new view only to the endpoints whose state changed)."""
        ep = c.endpoint
        i = ep.index
        row = rows[i] if i < len(rows) else None
        if row is None or row[0] is not ep:
            row = self._row(ep, model, rows)
        got = _Cand(c, row, self._state_terms(ep, c.state, row[1], idle_ctx, model, loads))
        if i >= len(terms):
            terms.extend([None] * (i + 1 - len(terms)))
        terms[i] = got
        return got

    def __call__(self, cycle: CycleState, candidates: list[EndpointView]) -> list[Scored]:
        P, A, Lo = self.P, self.A, self.Lo
        assert isinstance(P, PredictedLatency) and isinstance(A, PrefixAffinity)
        assert isinstance(Lo, Locality) and isinstance(self.C, Cost)
        prof = cycle.profile
        fleet = cycle.snapshot.fleet
        if fleet is not self._fleet:  # a reloaded fleet: its endpoints are new objects
            self._fleet = fleet
            self._rows, self._terms, self._rtt = {}, {}, {}
        model = prof.model
        prompt = prof.prompt_tokens
        fprompt = float(prompt)
        max_out = prof.max_output_tokens
        client, data = prof.client_region, prof.data_region
        rows = self._rows.get(model)
        if rows is None:
            rows = self._rows[model] = []
        terms = self._terms.get(model)
        if terms is None:
            terms = self._terms[model] = []
        nterms = len(terms)

        # -- predicted-latency's inputs (latency.py, `PredictedLatency.score`)
        idle_ctx = float(prompt + max_out)
        ttft_slo, itl_slo = prof.ttft_slo_s, prof.itl_slo_s
        kmin, kmax = P._kmin, P._kmax
        loads = P._load.get(model)
        if loads is None:
            loads = P._load[model] = {}
        ewma = P._ewma
        unknown_ttft, unknown_itl, ref_ttft = P._unknown_ttft, P._unknown_itl, P._ref_ttft
        matched = P.matcher.matches(cycle, candidates)
        nblocks = len(prof.block_hashes)
        # -- prefix-affinity (`PrefixAffinity.score`, room weight 0): the same walk when it
        # reads predicted-latency's matcher
        a_matched: Sequence[float] | None = None
        if nblocks:
            a_matched = matched if A.matcher is P.matcher else A.matcher.matches(cycle, candidates)
        # -- session-affinity (`SessionAffinity.score`): 1 on the session's last endpoint
        S = self.S
        assert isinstance(S, SessionAffinity)
        last = S.endpoint_of(prof)
        # -- cost (`Cost.score`)
        output_fraction, burst_factor = self._cost_p
        out_tok = output_fraction * max_out
        # -- locality (`Locality.score`)
        bytes_per_token, loc_output_fraction, rtt_ref, rtt_w, egress_w, data_w = self._loc_p
        regions = fleet.regions
        in_gb = prompt * bytes_per_token / 1e9
        out_gb = loc_output_fraction * max_out * bytes_per_token / 1e9
        per_region: dict[str, tuple[float, float]] = {}
        rtts = self._rtt.get(client)
        if rtts is None:
            if len(self._rtt) >= _MAX_CLIENT_REGIONS:  # (a fleet without regions takes any)
                self._rtt.clear()
            rtts = self._rtt[client] = {}
        last_region: str | None = None
        region_rtt = egress_usd = 0.0

        nP, nA, nS, nL, nC, nLo, nE = self.names
        wP, wA, wS, wL, wC, wLo, wE = self.weights
        annotations = cycle.annotations
        ranked: list[float] = []
        # per candidate after the first pass: (view, total of the first four scorers, their
        # clamped values, cost ranked, region)
        firsts: list[tuple[EndpointView, float, float, float, float, float, float, str]] = []
        for i, c in enumerate(candidates):
            idx = c.endpoint.index
            t = terms[idx] if idx < nterms else None
            if t is None or t.view is not c:
                t = self._terms_of(c, model, idle_ctx, loads, rows, terms)
                nterms = len(terms)
            s, name, region, r = t.s, t.name, t.region, t.r
            retry, v4 = t.retry, t.v4
            batch, kv, queue_s, raw_i = t.batch, t.kv, t.queue_s, t.raw_i
            if not t.busy and t.ctx_of != idle_ctx and r is not None:
                # idle: the load terms' context is the request's (not kept: the next request's
                # is another)
                batch, kv, queue_s, raw_i = kept_load_terms(t.ep, s, t.k, idle_ctx, loads)
            # predicted-latency
            m = matched[i]
            if nblocks:
                cached = int(prompt * m / nblocks)
                if cached > prompt:
                    cached = prompt
            else:
                cached = 0
            if prompt > 0:
                uncached = prompt - cached
                if uncached < 1:
                    uncached = 1
            else:
                uncached = 0
            if region is not last_region:
                got = per_region.get(region)
                if got is None:
                    rtt = rtts.get(region)
                    if rtt is None:
                        rtt = rtts[region] = fleet.rtt_s(client, region)
                    e = 0.0
                    if client is not None and client != region:
                        e += in_gb * _rate(regions, client) + out_gb * _rate(regions, region)
                    if data is not None and data != region:
                        e += in_gb * _rate(regions, data)
                    got = per_region[region] = (rtt, e)
                region_rtt, egress_usd = got
                last_region = region
            if r is None:
                queue_s = 0.0
                ttft = (s.ttft_p50_s or unknown_ttft) + region_rtt
                itl = s.itl_p50_s or unknown_itl
                raw_t, raw_i = ttft, itl
            else:
                # r.step_time_s(uncached, cached, batch, kv), inlined (same operations)
                tokens = uncached + batch
                if tokens <= 0:
                    step = 0.0
                else:
                    pairs = uncached * (cached + 0.5 * uncached)
                    pairs += kv
                    compute = (t.lin * tokens + t.attn * pairs) * t.inv_flops
                    memory = (t.wbytes + (cached + kv + tokens) * t.kvb) * t.inv_bw
                    step = (compute if compute > memory else memory) + tokens * t.comm + t.fixed
                    seq = t.seq
                    if seq:
                        step += seq * (batch + (uncached > 0))
                    ctx_s = t.ctx_s
                    if ctx_s:
                        step += ctx_s * kv
                raw_t = queue_s + step + t.fixed_s
                ttft, itl = raw_t, raw_i
                tf = t.tf
                if tf is not None:
                    ttft *= tf
                prev = ewma.get(name)
                if prev is not None:
                    obs = t.itl_obs  # s.itl_p50_s
                    if obs is not None and prev[1] > 0:
                        f = obs / prev[1]
                        itl *= kmin if f < kmin else (kmax if f > kmax else f)
                ttft += region_rtt
            expected_ttft = ttft * retry if retry > 1.0 else ttft
            check_itl = itl_slo is not None and not t.embedding
            if ttft_slo is None and not check_itl:
                meets = 1.0
                x = expected_ttft / ref_ttft
            else:
                x = 0.0 if ttft_slo is None else expected_ttft / ttft_slo
                if check_itl:
                    y = itl / itl_slo  # type: ignore[operator]
                    if y > x:
                        x = y
                meets = 1.0 if x <= 1.0 else 0.0
            v1 = 1.0 / ((1.0 + x) * retry) if retry > 1.0 else 1.0 / (1.0 + x)
            # cost
            u = float(uncached)
            hourly_s = t.hourly_s
            if hourly_s is None:
                cu = u if u < fprompt else fprompt
                usd = cu * t.p_in + (prompt - cu) * t.p_cached + out_tok * t.p_out
            else:  # pr.hourly / 3600.0 * duration / pr.concurrency
                usd = hourly_s * (raw_t + region_rtt + out_tok * raw_i) / t.p_conc
            rank_usd = usd * burst_factor if t.p_burst else usd
            ranked.append(rank_usd)
            # the annotations, keys in the reference path's order
            if a_matched is not None and retry <= 1.0:
                m = a_matched[i]
                annotations[name] = {
                    "ttft_s": ttft,
                    "ttft_raw_s": raw_t,
                    "itl_s": itl,
                    "itl_raw_s": raw_i,
                    "queue_s": queue_s,
                    "uncached_tokens": u,
                    "meets_slo": meets,
                    "prefix_match": float(m),
                    "cost_usd": usd,
                    "rtt_s": region_rtt,
                    "egress_usd": egress_usd,
                }
                v2 = m / nblocks
                if not v2 > 0.0:
                    v2 = 0.0
                elif v2 > 1.0:
                    v2 = 1.0
            else:
                ann = {
                    "ttft_s": ttft,
                    "ttft_raw_s": raw_t,
                    "itl_s": itl,
                    "itl_raw_s": raw_i,
                    "queue_s": queue_s,
                    "uncached_tokens": u,
                    "meets_slo": meets,
                }
                if retry > 1.0:
                    ann["retry_factor"] = retry
                if a_matched is None:
                    v2 = 0.0
                else:
                    m = a_matched[i]
                    ann["prefix_match"] = float(m)
                    v2 = m / nblocks
                    if not v2 > 0.0:
                        v2 = 0.0
                    elif v2 > 1.0:
                        v2 = 1.0
                ann["cost_usd"] = usd
                ann["rtt_s"] = region_rtt
                ann["egress_usd"] = egress_usd
                annotations[name] = ann
            # clamp, weigh, sum the first four scorers (in scorer order, as the reference
            # path); cost, locality and energy need every candidate first
            if not v1 > 0.0:
                v1 = 0.0
            elif v1 > 1.0:
                v1 = 1.0
            v3 = 1.0 if name == last else 0.0
            total = 0.0 + wP * v1
            total += wA * v2
            total += wS * v3
            total += wL * v4
            firsts.append((c, total, v1, v2, v3, v4, rank_usd, region))
        cycle.data[P._key] = True  # predicted-latency scored this cycle (`on_picked`)

        # -- normalisations over the candidates
        lo = hi = ranked[0]  # min(ranked), max(ranked): `_minmax_low_is_best`
        for x in ranked:
            if x < lo:
                lo = x
            if x > hi:
                hi = x
        span = hi - lo
        flat = span <= 1e-18
        emax = max([e for _, e in per_region.values()])  # the most any candidate's egress
        lnorm_w = Lo.norm
        r_scores: dict[str, float] = {}
        for region, (rtt, e) in per_region.items():
            r_term = 1.0 - min(1.0, rtt / rtt_ref)
            e_term = 1.0 - e / emax if emax > 0 else 1.0
            d_term = 1.0 if data is None or data == region else 0.0
            v = (
                rtt_w * r_term + egress_w * e_term + data_w * d_term
            ) / lnorm_w
            r_scores[region] = 0.0 if not v > 0.0 else (1.0 if v > 1.0 else v)
        e_vals = self.E.score(cycle, candidates) if prof.energy_aware else None
        if e_vals is not None and len(e_vals) != len(candidates):
            raise ValueError("a scorer returned a value count other than the candidates'")

        # -- the last three scorers: clamp, weigh, add to the totals; the scored candidates
        i = 0
        out: list[Scored] = []
        for c, total, v1, v2, v3, v4, x, region in firsts:
            if flat:
                v5 = 1.0
            else:
                v5 = (hi - x) / span
                if not v5 > 0.0:
                    v5 = 0.0
                elif v5 > 1.0:
                    v5 = 1.0
            v6 = r_scores[region]
            if e_vals is None:
                v7 = 1.0
            else:
                v7 = e_vals[i]
                i += 1
                if not v7 > 0.0:
                    v7 = 0.0
                elif v7 > 1.0:
                    v7 = 1.0
            total += wC * v5
            total += wLo * v6
            total += wE * v7
            out.append(Scored(c, total, {nP: v1, nA: v2, nS: v3, nL: v4, nC: v5, nLo: v6,
                                         nE: v7}))
        return out


def _rate(regions: dict[str, RegionSpec], region: str) -> float:
    spec = regions.get(region)
    return spec.egress_usd_per_gb if spec is not None else 0.0
