"""predicted-latency's per-endpoint constants (`_Consts`) and the load terms an endpoint's
state determines (`load_terms`), in a module of their own so that the compiled build compiles
them: the plugin (``placement/plugins/latency.py``) and the fused scoring pass
(``placement/fused.py``) both call `load_terms` — for an idle endpoint once per decision, since
its context is the request's — and the fused pass reads `_Consts` per candidate
(docs/placement.md, "The compiled build")."""

from __future__ import annotations

from inferplane.fleet.model import Endpoint
from inferplane.fleet.state import EndpointState
from inferplane.physics.calibration import frontend_wait_s
from inferplane.physics.roofline import Roofline

#: Upper bound of the engine front end's busy share from streaming (keeps 1/(1-rho) finite).
_MAX_FRONTEND_BUSY = 0.9

#: `Roofline.step_terms` of an endpoint without a roofline
NO_STEP = (0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0)


class _Consts:
    """Per (endpoint, model) constants, computed once per plugin instance (`PredictedLatency`).
    Read-only by convention: a plain class, not a frozen dataclass, so that compiled code reads
    its fields directly."""

    __slots__ = ("attention_excess_s", "embedding", "fixed_s", "frontend_request_s",
                 "frontend_token_s", "max_concurrency", "name", "prefill_s_per_token", "region",
                 "roofline", "step")

    def __init__(
        self,
        roofline: Roofline | None,
        prefill_s_per_token: float,
        fixed_s: float,
        frontend_request_s: float,
        frontend_token_s: float,
        embedding: bool,
        name: str,
        region: str,
        max_concurrency: int,
        step: tuple[float, float, float, float, float, float, float, float, float, float],
        attention_excess_s: float = 0.0,
    ) -> None:
        self.roofline = roofline
        self.prefill_s_per_token = prefill_s_per_token
        #: the hardware's calibrated per-request overhead + provider network RTT
        self.fixed_s = fixed_s
        #: calibrated: the engine front end's intake per request (both pieces:
        #: frontend_request_s + frontend_handoff_s)
        self.frontend_request_s = frontend_request_s
        #: calibrated: the engine front end's work per streamed token
        self.frontend_token_s = frontend_token_s
        self.embedding = embedding
        self.name = name
        self.region = region
        self.max_concurrency = max_concurrency
        #: the roofline's `Roofline.step_terms` (zeros without one), for the decode step
        #: `load_terms` computes inline
        self.step = step
        #: seconds per query-key pair that attention priced apart from the matmuls
        #: (``attention_cost_factor`` > 1, a calibrated CPU engine) adds to a prefill: 0 in the
        #: table. `load_terms` counts it at the queued prompts' own lengths
        #: (`EndpointState.pending_prefill_sq`)
        self.attention_excess_s = attention_excess_s


#: the prefill chunk at which ``prefill_s_per_token`` is taken (`PredictedLatency`)
_REF_CHUNK = 2048


def attention_excess_s(r: Roofline | None) -> float:
    """Seconds per query-key pair of a prefill that ``attention_cost_factor`` adds to the
    roofline's compute beyond a factor of 1 (0.0 without a roofline, and exactly 0.0 for the
    table's profiles)."""
    if r is None:
        return 0.0
    f = r.hardware.attention_cost_factor
    if f == 1.0:
        return 0.0
    terms = r.step_terms()
    return terms[1] * (1.0 - 1.0 / f) * terms[2]  # attention's FLOPs × seconds per FLOP

#: `PredictedLatency`'s per-snapshot reuse of `load_terms`: endpoint → (the state object and the
#: idle context they were computed for, batch, KV tokens, queue_s, raw ITL)
Loads = dict[Endpoint, tuple[EndpointState, float, int, int, float, float]]


def kept_load_terms(
    ep: Endpoint, s: EndpointState, k: _Consts, idle_ctx: float, loads: Loads
) -> tuple[int, int, float, float]:
    """`load_terms`, stored in ``loads`` at ``ep`` for reuse while the snapshot keeps that
    state object: the one store the plugin and the fused scoring pass share."""
    got = load_terms(s, k, idle_ctx)
    batch, kv, queue_s, raw_i = got
    loads[ep] = (s, idle_ctx, batch, kv, queue_s, raw_i)
    return got


def load_terms(s: EndpointState, k: _Consts, idle_ctx: float) -> tuple[int, int, float, float]:
    """(batch, KV tokens, queue_s, raw ITL) of an endpoint with a roofline: what its state
    ``s`` alone determines (`PredictedLatency`'s docstring), for an idle endpoint with
    ``idle_ctx`` (the request's prompt + max output) as the context."""
    queue_s = 0.0
    conc = k.max_concurrency
    inflight = s.inflight
    pending = s.pending_prefill
    decoding = inflight - pending
    batch = decoding if decoding < conc else conc
    ctx = s.inflight_tokens / inflight if inflight > 0 else idle_ctx
    # Prefill is FCFS through the engine's per-step token budget: everything the
    # gateway sent that has not produced its first token is ahead of this request.
    queue_tokens = float(s.pending_prefill_tokens)
    queue_sq = float(s.pending_prefill_sq)  # the queued prompts' squared lengths, summed
    if not s.stale:
        running = s.running
        if running is not None and running > batch:
            batch = int(running)
        waiting = s.waiting
        if waiting is not None and waiting > pending:
            others = waiting - pending  # other clients' prompts, of ctx tokens each
            queue_tokens += others * ctx
            queue_sq += others * ctx * ctx
    if queue_tokens > 0:
        queue_s = queue_tokens * k.prefill_s_per_token
        excess = k.attention_excess_s
        if excess:
            # prefill_s_per_token prices attention at a 2,048-token chunk's pairs per token
            # (1,024); each queued prompt of L tokens attends over its own: L²/2 pairs. The
            # attention priced apart (a calibrated CPU engine, where it is most of a prefill)
            # at the queued prompts' own lengths, from the sum of their squares
            queue_s += excess * 0.5 * (queue_sq - _REF_CHUNK * queue_tokens)
            if queue_s < 0.0:
                queue_s = 0.0
    kv = int(batch * ctx)
    if k.embedding or batch < 0:  # (batch + 1 ≤ 0: an empty step, 0.0)
        raw_i = 0.0
    else:
        # r.step_time_s(0, 0, d, c) for this request's decode step (d = batch + 1 > 0
        # sequences over c = kv + ctx cached tokens), inlined: the same operations in the
        # same order, with no prefill tokens (test_placement_scorers holds it to the call)
        lin, attn, inv_flops, wbytes, kvb, inv_bw, comm, fixed, seq, ctx_s = k.step
        d = batch + 1
        c = kv + int(ctx)
        compute = (lin * d + attn * (0.0 + c)) * inv_flops
        memory = (wbytes + (c + d) * kvb) * inv_bw
        raw_i = (compute if compute > memory else memory) + d * comm + fixed
        if seq:
            raw_i += seq * d
        if ctx_s:
            raw_i += ctx_s * c
    fe_tok = k.frontend_token_s
    if fe_tok > 0 and batch > 0:
        # behind the running streams' chunks, and its own sent with theirs
        queue_s += frontend_wait_s(batch, fe_tok, raw_i) + batch * fe_tok
    if pending > 0 and k.frontend_request_s > 0:
        # The front end takes requests in one at a time, between the chunks it
        # streams (busy share rho): the intakes ahead, stretched by 1/(1-rho).
        # In series with the engine's queue, whichever is longer decides.
        rho = 0.0
        if fe_tok > 0 and raw_i > 0:
            rho = min(_MAX_FRONTEND_BUSY, batch * fe_tok / raw_i)
        fe = pending * k.frontend_request_s / (1.0 - rho)
        if fe > queue_s:
            queue_s = fe
    return batch, kv, queue_s, raw_i
