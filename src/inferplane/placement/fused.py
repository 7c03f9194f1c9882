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
``Policy.fused`` is None there. The prefix matchers, session affinity and energy are still
called as the plugins themselves (their logic lives in one place); the per-endpoint constants
and price tables are the plugins' own caches.
"""

from __future__ import annotations

from collections.abc import Sequence

from inferplane.config.schema import RegionSpec
from inferplane.fleet.state import EndpointView
from inferplane.placement.framework import CycleState, Policy, Scored
from inferplane.placement.plugins.affinity import PrefixAffinity, SessionAffinity
from inferplane.placement.plugins.economics import Cost, Energy, Load, Locality
from inferplane.placement.plugins.latency import PredictedLatency

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

    __slots__ = ("A", "C", "E", "L", "Lo", "P", "S", "names", "weights")

    def __init__(self, policy: Policy) -> None:
        plugins = [s for s, _ in policy.scorers]
        self.P, self.A, self.S, self.L, self.C, self.Lo, self.E = plugins
        self.names = tuple(s.name for s in plugins)
        self.weights = tuple(w for _, w in policy.scorers)

    @classmethod
    def compile(cls, policy: Policy) -> FusedScoring | None:
        """The fused scorer for ``policy``, or None when its scorers are not exactly the fused
        set (then the reference path scores it)."""
        if tuple(type(s) for s, _ in policy.scorers) != FUSED_SCORERS:
            return None
        prefix = policy.scorers[1][0]
        assert isinstance(prefix, PrefixAffinity)
        if prefix.room_weight > 0 or getattr(prefix, "rendezvous_weight", 0.0) > 0:
            return None  # the extra terms for new prefixes are scored by the plugin itself
        names = [s.name for s, _ in policy.scorers]
        if len(set(names)) != len(names):
            return None
        return cls(policy)

    def __call__(self, cycle: CycleState, candidates: list[EndpointView]) -> list[Scored]:
        P, A, L, C, Lo = self.P, self.A, self.L, self.C, self.Lo
        assert isinstance(P, PredictedLatency) and isinstance(A, PrefixAffinity)
        assert isinstance(L, Load) and isinstance(C, Cost) and isinstance(Lo, Locality)
        prof = cycle.profile
        fleet = cycle.snapshot.fleet
        rtt_s = fleet.rtt_s
        model = prof.model
        prompt = prof.prompt_tokens
        fprompt = float(prompt)
        max_out = prof.max_output_tokens
        client, data = prof.client_region, prof.data_region

        # -- predicted-latency's inputs (latency.py, `PredictedLatency.score`)
        idle_ctx = float(prompt + max_out)
        ttft_slo, itl_slo = prof.ttft_slo_s, prof.itl_slo_s
        kmin, kmax = P._kmin, P._kmax
        by_ep = P._consts.get(model) or {}
        loads = P._load.get(model)
        if loads is None:
            loads = P._load[model] = {}
        ewma = P._ewma
        unknown_ttft, unknown_itl, ref_ttft = P._unknown_ttft, P._unknown_itl, P._ref_ttft
        err_w, err_max = P._err_w, P._err_max
        matched = P.matcher.matches(cycle, candidates)
        nblocks = len(prof.block_hashes)
        # -- prefix-affinity (`PrefixAffinity.score`, room weight 0)
        a_matched: Sequence[float] | None = (
            A.matcher.matches(cycle, candidates) if nblocks else None
        )
        # -- session-affinity: the plugin itself
        s_vals = self.S.score(cycle, candidates)
        # -- load (`Load.score`)
        wq, wt, wk, lnorm = L.wq, L.wt, L.wk, L.norm
        # -- cost (`Cost.score`)
        cp = C.p
        out_tok = cp.output_fraction * max_out
        burst_factor = cp.burst_factor
        prices = C._prices.get(model) or {}
        # -- locality (`Locality.score`)
        lp = Lo.p
        regions = fleet.regions
        in_gb = prompt * lp.bytes_per_token / 1e9
        out_gb = lp.output_fraction * max_out * lp.bytes_per_token / 1e9
        per_region: dict[str, tuple[float, float]] = {}

        annotations = cycle.annotations
        raw: dict[str, tuple[float, float]] = {}
        p_vals: list[float] = []
        l_vals: list[float] = []
        ranked: list[float] = []
        cand_regions: list[str] = []
        egress: list[float] = []
        for i, c in enumerate(candidates):
            ep, s = c.endpoint, c.state
            name = c.name
            # predicted-latency
            k = by_ep.get(ep) or P._constants(ep, model)
            m = matched[i]
            cached = min(prompt, int(prompt * m / nblocks)) if nblocks else 0
            uncached = max(1, prompt - cached) if prompt > 0 else 0
            region = k.region
            got = per_region.get(region)
            if got is None:
                rtt = rtt_s(client, region)
                e = 0.0
                if client is not None and client != region:
                    e += in_gb * _rate(regions, client) + out_gb * _rate(regions, region)
                if data is not None and data != region:
                    e += in_gb * _rate(regions, data)
                got = per_region[region] = (rtt, e)
            region_rtt, egress_usd = got
            r = k.roofline
            queue_s = 0.0
            if r is None:
                ttft = (s.ttft_p50_s or unknown_ttft) + region_rtt
                itl = s.itl_p50_s or unknown_itl
                raw_t, raw_i = ttft, itl
            else:
                hit = loads.get(ep)
                if hit is not None and hit[0] is s and (s.inflight > 0 or hit[1] == idle_ctx):
                    batch, kv, queue_s, raw_i = hit[2], hit[3], hit[4], hit[5]
                else:
                    batch, kv, queue_s, raw_i = P._load_terms(ep, s, k, r, idle_ctx, loads)
                raw_t = queue_s + r.step_time_s(uncached, cached, batch, kv) + k.fixed_s
                ttft, itl = raw_t, raw_i
                f = s.ttft_ratio_p50
                if f is not None:
                    ttft *= kmin if f < kmin else (kmax if f > kmax else f)
                prev = ewma.get(name)
                if prev is not None:
                    obs = s.itl_p50_s
                    if obs is not None and prev[1] > 0:
                        f = obs / prev[1]
                        itl *= kmin if f < kmin else (kmax if f > kmax else f)
                ttft += region_rtt
            raw[name] = (raw_t, raw_i)
            e_rate = s.error_rate
            retry = 1.0
            expected_ttft = ttft
            if e_rate > 0.0 and err_w > 0.0:
                retry = 1.0 + err_w * e_rate / (1.0 - (e_rate if e_rate < err_max else err_max))
                expected_ttft = ttft * retry
            check_itl = itl_slo is not None and not k.embedding
            if ttft_slo is None and not check_itl:
                meets = True
                x = expected_ttft / ref_ttft
            else:
                x = 0.0 if ttft_slo is None else expected_ttft / ttft_slo
                if check_itl:
                    y = itl / itl_slo  # type: ignore[operator]
                    if y > x:
                        x = y
                meets = x <= 1.0
            ann = {
                "ttft_s": ttft,
                "ttft_raw_s": raw_t,
                "itl_s": itl,
                "itl_raw_s": raw_i,
                "queue_s": queue_s,
                "uncached_tokens": float(uncached),
                "meets_slo": 1.0 if meets else 0.0,
            }
            if retry > 1.0:
                ann["retry_factor"] = retry
                p_vals.append(1.0 / ((1.0 + x) * retry))
            else:
                p_vals.append(1.0 / (1.0 + x))
            if a_matched is not None:
                ann["prefix_match"] = float(a_matched[i])
            # load
            x = (s.inflight + s.queue_depth) / ep.spec.max_concurrency
            lconc = x if x < 1.0 else 1.0
            blocks, block_size = s.num_gpu_blocks, s.block_size
            cap = float(blocks * block_size) if blocks and block_size else L._capacity(ep, model)
            x = s.inflight_tokens / cap
            tok = x if x < 1.0 else 1.0
            kv_usage = s.kv_usage
            kvu = kv_usage if not s.stale and kv_usage is not None else 0.0
            l_vals.append(1.0 - (wq * lconc + wt * tok + wk * kvu) / lnorm)
            # cost
            pr = prices.get(ep) or C._price(ep, model)
            u = float(uncached)
            u = u if u < fprompt else fprompt
            if pr.hourly is None:
                usd = u * pr.input + (prompt - u) * pr.cached + out_tok * pr.output
            else:
                duration = raw_t + region_rtt + out_tok * raw_i  # pr.region is k.region
                usd = pr.hourly / 3600.0 * duration / pr.concurrency
            ann["cost_usd"] = usd
            ranked.append(usd * burst_factor if pr.burst else usd)
            # locality
            ann["rtt_s"] = region_rtt
            ann["egress_usd"] = egress_usd
            cand_regions.append(region)
            egress.append(egress_usd)
            annotations[name] = ann
        cycle.data[P._key] = raw

        # -- normalisations over the candidates
        lo, hi = min(ranked), max(ranked)  # `_minmax_low_is_best`
        span = hi - lo
        c_vals = [1.0] * len(ranked) if span <= 1e-18 else [(hi - x) / span for x in ranked]
        emax = max(egress)
        lnorm_w = Lo.norm
        r_scores: dict[str, float] = {}
        for region, (rtt, e) in per_region.items():
            r_term = 1.0 - min(1.0, rtt / lp.rtt_reference_s)
            e_term = 1.0 - e / emax if emax > 0 else 1.0
            d_term = 1.0 if data is None or data == region else 0.0
            r_scores[region] = (
                lp.rtt_weight * r_term + lp.egress_weight * e_term + lp.data_weight * d_term
            ) / lnorm_w
        e_vals = self.E.score(cycle, candidates) if prof.energy_aware else None
        if len(s_vals) != len(candidates) or (e_vals is not None and len(e_vals) != len(s_vals)):
            raise ValueError("a scorer returned a value count other than the candidates'")

        # -- clamp, weigh, sum (in scorer order, as the reference path), score dicts
        nP, nA, nS, nL, nC, nLo, nE = self.names
        wP, wA, wS, wL, wC, wLo, wE = self.weights
        out: list[Scored] = []
        append = out.append
        for i, c in enumerate(candidates):
            v1 = p_vals[i]
            if not v1 > 0.0:
                v1 = 0.0
            elif v1 > 1.0:
                v1 = 1.0
            if a_matched is None:
                v2 = 0.0
            else:
                v2 = a_matched[i] / nblocks
                if not v2 > 0.0:
                    v2 = 0.0
                elif v2 > 1.0:
                    v2 = 1.0
            v3 = s_vals[i]
            if not v3 > 0.0:
                v3 = 0.0
            elif v3 > 1.0:
                v3 = 1.0
            v4 = l_vals[i]
            if not v4 > 0.0:
                v4 = 0.0
            elif v4 > 1.0:
                v4 = 1.0
            v5 = c_vals[i]
            if not v5 > 0.0:
                v5 = 0.0
            elif v5 > 1.0:
                v5 = 1.0
            v6 = r_scores[cand_regions[i]]
            if not v6 > 0.0:
                v6 = 0.0
            elif v6 > 1.0:
                v6 = 1.0
            if e_vals is None:
                v7 = 1.0
            else:
                v7 = e_vals[i]
                if not v7 > 0.0:
                    v7 = 0.0
                elif v7 > 1.0:
                    v7 = 1.0
            total = 0.0
            total += wP * v1
            total += wA * v2
            total += wS * v3
            total += wL * v4
            total += wC * v5
            total += wLo * v6
            total += wE * v7
            append(Scored(c, total, {nP: v1, nA: v2, nS: v3, nL: v4, nC: v5, nLo: v6, nE: v7}))
        return out


def _rate(regions: dict[str, RegionSpec], region: str) -> float:
    spec = regions.get(region)
    return spec.egress_usd_per_gb if spec is not None else 0.0
