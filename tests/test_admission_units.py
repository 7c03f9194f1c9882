"""Unit tests of each admission mechanism: table-driven, with injected clocks."""

from __future__ import annotations

import asyncio
import calendar
import math
from datetime import datetime
from typing import Any

import pytest

from inferplane.admission import limits
from inferplane.admission.budget import Budgets, WorstCase, window_bounds
from inferplane.admission.queue import FairQueue, Grant, QueueTimeoutError
from inferplane.admission.retry import RetryBudget, retry_key
from inferplane.admission.state import BucketDemand, CounterDemand, MemoryStore
from inferplane.config.loader import parse_config
from inferplane.config.schema import (
    AdmissionSpec,
    BudgetSpec,
    RetryPolicy,
    TenantSpec,
    WorkloadClass,
)
from inferplane.errors import BudgetExceededError, InvalidRequestError, RateLimitError
from inferplane.fleet.model import Fleet
from inferplane.placement.profile import RequestProfile

H = "sha256:" + "ab" * 32


def ts(s: str) -> float:
    return float(calendar.timegm(datetime.fromisoformat(s).timetuple()))


def tenant(**kw: Any) -> TenantSpec:
    return TenantSpec(name="t", api_keys=[H], **kw)


# -- windows --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("window", "now", "start", "end"),
    [
        ("minute", "2025-03-04T10:11:12", "2025-03-04T10:11:00", "2025-03-04T10:12:00"),
        ("day", "2025-03-04T10:11:12", "2025-03-04T00:00:00", "2025-03-05T00:00:00"),
        ("month", "2025-03-04T10:11:12", "2025-03-01T00:00:00", "2025-04-01T00:00:00"),
        ("month", "2025-12-31T23:59:59", "2025-12-01T00:00:00", "2026-01-01T00:00:00"),
    ],
)
def test_window_bounds(window: Any, now: str, start: str, end: str) -> None:
    assert window_bounds(window, ts(now)) == (ts(start), ts(end))


# -- budget counters with leases ------------------------------------------------------------
def demand(usd: float, tokens: int = 0, limit_usd: float | None = 1.0,
           limit_tokens: int | None = None, key: str = "c") -> CounterDemand:
    return CounterDemand(key, limit_usd, limit_tokens, usd, tokens, 3600.0)


@pytest.mark.parametrize(
    ("steps", "expected"),
    [
        # (op, arg, now) ; reserve returns -1 ok / index
        ([("reserve", 0.6, 0), ("reserve", 0.5, 1)], [-1, 0]),
        ([("reserve", 0.6, 0), ("settle", 0.1, 1), ("reserve", 0.5, 2)], [-1, None, -1]),
        # the first lease expires at 100 (ttl 100): its reservation stops counting
        ([("reserve", 0.6, 0), ("reserve", 0.5, 99), ("reserve", 0.5, 100)], [-1, 0, -1]),
        ([("reserve", 1.0, 0)], [-1]),
        ([("reserve", 1.01, 0)], [0]),
    ],
)
async def test_counter_reserve_settle_expire(steps: list[tuple[str, float, float]],
                                             expected: list[int | None]) -> None:
    s = MemoryStore()
    got: list[int | None] = []
    for i, (op, arg, now) in enumerate(steps):
        if op == "reserve":
            got.append(await s.reserve([demand(arg)], f"l{i}", now + 100, now))
        else:
            await s.settle([demand(0)], "l0", arg, 0, now)
            got.append(None)
    assert got == expected


async def test_reserve_is_all_or_nothing_across_counters() -> None:
    s = MemoryStore()
    a = demand(0.5, key="a")
    b = demand(0.5, limit_usd=0.4, key="b")
    assert await s.reserve([a, b], "l", 100, 0) == 1
    assert (await s.counter("a", 0)).reserved_usd == 0.0  # nothing taken from "a" either


async def test_settle_after_expiry_counts_spend_once() -> None:
    s = MemoryStore()
    await s.reserve([demand(0.5, 10, limit_tokens=100)], "l", 10, 0)
    await s.settle([demand(0.5)], "l", 0.2, 7, 20)  # lease expired at 10
    st = await s.counter("c", 20)
    assert (st.spent_usd, st.spent_tokens, st.reserved_usd, st.reserved_tokens) == (0.2, 7, 0, 0)


async def test_budget_error_names_window_reset_and_retry_after() -> None:
    b = Budgets(MemoryStore(), lease_ttl_s=60)
    t = tenant(budgets=[BudgetSpec(scope="tenant", window="day", usd=1.0)])
    now = ts("2025-03-04T23:00:00")
    await b.reserve(t, H, None, 0.9, 10, "a", now)
    with pytest.raises(BudgetExceededError) as e:
        await b.reserve(t, H, None, 0.2, 10, "b", now)
    assert e.value.status == 429 and e.value.code == "budget_exceeded"
    assert e.value.headers["Retry-After"] == "3600"
    assert "2025-03-05T00:00:00Z" in e.value.message and "day" in e.value.message


async def test_workflow_and_key_budgets_are_separate_counters() -> None:
    b = Budgets(MemoryStore(), lease_ttl_s=60)
    t = tenant(budgets=[BudgetSpec(scope="workflow", window="minute", tokens=100),
                        BudgetSpec(scope="key", window="minute", tokens=150)])
    await b.reserve(t, H, "wf-1", 0.0, 100, "a", 0)
    with pytest.raises(BudgetExceededError, match="workflow 'wf-1'"):
        await b.reserve(t, H, "wf-1", 0.0, 1, "b", 0)
    await b.reserve(t, H, "wf-2", 0.0, 50, "c", 0)
    with pytest.raises(BudgetExceededError, match="this API key"):
        await b.reserve(t, H, "wf-3", 0.0, 1, "d", 0)
    await b.reserve(t, H, None, 0.0, 0, "e", 0)  # no workflow: workflow budgets do not apply


# -- worst case -----------------------------------------------------------------------------
FLEET = """
substrates:
  - {name: api, kind: provider-api, hardware: h100, region: r1, jurisdiction: us,
     cost: {input_per_mtok: 3.0, output_per_mtok: 15.0},
     endpoints: [{name: a, url: "http://127.0.0.1:1",
                  models: [{name: m, profile: llama-3.1-8b, max_context: 8192}]}]}
  - {name: gpu, kind: gpu, hardware: h100, region: r1, jurisdiction: eu,
     cost: {hourly_usd: 3.6},
     endpoints: [{name: b, url: "http://127.0.0.1:2", max_concurrency: 10,
                  models: [{name: m, profile: llama-3.1-8b, max_context: 8192}]}]}
"""


@pytest.mark.parametrize(
    ("jur", "prompt", "max_out", "usd"),
    [
        (None, 1000, 1000, (1000 * 3 + 1000 * 15) / 1e6),  # the per-token API is dearer
        (frozenset({"us"}), 1000, 100, (1000 * 3 + 100 * 15) / 1e6),
        # hourly: 3.6 $/h / 3600 × (1000 × 0.5 ms + 100 × 50 ms) / 10 slots
        (frozenset({"eu"}), 1000, 100, 3.6 / 3600 * (0.5 + 5.0) / 10),
    ],
)
def test_worst_case_usd(jur: frozenset[str] | None, prompt: int, max_out: int,
                        usd: float) -> None:
    cfg = parse_config(FLEET)
    wc = WorstCase(Fleet.from_config(cfg), AdmissionSpec(), 600.0)
    p = RequestProfile("r", "t", "m", prompt_tokens=prompt, max_output_tokens=max_out,
                       allowed_jurisdictions=jur)
    assert wc.usd(p) == pytest.approx(usd)


# -- token buckets --------------------------------------------------------------------------
async def test_bucket_all_or_nothing_and_refill() -> None:
    s = MemoryStore()
    rpm = BucketDemand("r", 2, 2 / 60, 1)
    tpm = BucketDemand("t", 100, 100 / 60, 60)
    assert await s.take([rpm, tpm], 0) == 0
    wait = await s.take([rpm, tpm], 0)  # tokens: 40 left, needs 60 → 20 / (100/60) = 12 s
    assert wait == pytest.approx(12.0)
    assert await s.take([rpm], 0) == 0  # the rpm bucket was not charged by the failed take
    assert await s.take([rpm], 0) == pytest.approx(30.0)
    assert await s.take([rpm], 30) == 0


def test_buckets_reject_request_larger_than_tpm() -> None:
    from inferplane.config.schema import RateLimitSpec

    t = tenant(rate_limits=[RateLimitSpec(tokens_per_min=100)])
    with pytest.raises(InvalidRequestError, match="tokens per minute"):
        limits.buckets(t, H, 101)
    assert len(limits.buckets(t, H, 100)) == 1


# -- ceilings -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("body", "cls_cap", "ten_cap", "policy", "expected", "clamped", "field"),
    [
        ({"max_tokens": 500}, 100, None, "clamp", 100, "500->100", "max_tokens"),
        ({"max_tokens": 500}, 1000, 200, "clamp", 200, "500->200", "max_tokens"),
        ({"max_tokens": 50}, 100, None, "clamp", 50, None, None),  # untouched, no rewrite
        ({}, None, None, "clamp", 1024, None, "max_tokens"),  # class default injected
        ({}, 100, None, "clamp", 100, None, "max_tokens"),  # default above ceiling
        ({"max_completion_tokens": 900}, 300, None, "clamp", 300, "900->300",
         "max_completion_tokens"),
        ({"max_tokens": 500}, 100, None, "reject", "error", None, None),
    ],
)
def test_ceiling(body: dict[str, Any], cls_cap: int | None, ten_cap: int | None, policy: Any,
                 expected: Any, clamped: str | None, field: str | None) -> None:
    cls = WorkloadClass(name="c", max_tokens_ceiling=cls_cap)
    t = tenant(max_tokens_ceiling=ten_cap, max_tokens_policy=policy)
    b = dict(body)
    if expected == "error":
        with pytest.raises(InvalidRequestError) as e:
            limits.apply_ceiling("chat", b, 1024, cls, t)
        assert e.value.param == "max_tokens" and e.value.status == 400
        return
    c = limits.apply_ceiling("chat", b, 1024, cls, t)
    assert (c.max_tokens, c.clamped, c.rewrite) == (expected, clamped, field is not None)
    if field is not None:
        assert b[field] == expected


# -- headers --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("header", "value", "fn"),
    [
        ("x-inferplane-workflow", "", limits.workflow_header),
        ("x-inferplane-workflow", "a b", limits.workflow_header),
        ("x-inferplane-workflow", "x" * 129, limits.workflow_header),
        ("Idempotency-Key", "has space", limits.idempotency_header),
        ("x-inferplane-agent-step", "-1", limits.agent_step),
        ("x-inferplane-agent-step", "1.5", limits.agent_step),
    ],
)
def test_bad_admission_headers_name_the_header(header: str, value: str, fn: Any) -> None:
    with pytest.raises(InvalidRequestError) as e:
        fn({header: value})
    assert e.value.param == header and header in e.value.message


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ({"messages": [{"role": "user"}]}, (0, 0)),
        ({"tools": [{}, {}, {}], "messages": [{"role": "user"}]}, (3, 0)),
        ({"tools": [{}], "messages": [{"role": "tool"}, {"role": "assistant"}, {"role": "tool"},
                                      {"role": "tool"}]}, (1, 2)),
    ],
)
def test_tool_fanout(body: dict[str, Any], expected: tuple[int, int]) -> None:
    assert limits.tool_fanout("chat", body) == expected


# -- retries --------------------------------------------------------------------------------
def test_retry_key_prefers_idempotency_key() -> None:
    assert retry_key("t", H, "k1", b"a") == retry_key("t", H, "k1", b"b")
    assert retry_key("t", H, None, b"a") != retry_key("t", H, None, b"b")
    assert retry_key("t", H, None, b"a") == retry_key("t", H, None, b"a")


def test_retry_budget_ratio_and_minimum() -> None:
    now = [0.0]
    rb = RetryBudget(RetryPolicy(budget_ratio=0.1, budget_min_per_s=0.2, budget_window_s=10),
                     clock=lambda: now[0])
    for _ in range(100):
        rb.record_request()
    # allowance = 0.2 × 10 + 0.1 × 100 = 12
    assert [rb.try_acquire() for _ in range(13)].count(True) == 12
    now[0] = 10.5  # the window slid past everything
    assert rb.allowance() == pytest.approx(2.0)
    assert rb.try_acquire() and rb.try_acquire() and not rb.try_acquire()


# -- priority and fairness ------------------------------------------------------------------
class Slots:
    def __init__(self, n: int) -> None:
        self.n = n

    def __call__(self, pool: object) -> int:
        return self.n


async def test_queue_strict_priority_then_fair_share() -> None:
    slots = Slots(0)
    q = FairQueue(slots, clock=lambda: 0.0)
    order: list[str] = []

    async def req(tenant: str, band: str, tag: str) -> None:
        g = await q.acquire(tenant, band, "p", 10, 5.0)
        order.append(tag)
        g.started()

    arrivals = [("heavy", "sheddable", "h-shed")] + [
        ("heavy", "standard", f"h{i}") for i in range(1, 5)] + [
        ("light", "standard", "l1"), ("light", "standard", "l2"), ("light", "critical", "l-crit")]
    tasks = []
    for a in arrivals:
        tasks.append(asyncio.create_task(req(*a)))
        await asyncio.sleep(0)
    for i in range(len(arrivals)):
        slots.n = 1
        q.pump()
        slots.n = 0
        for _ in range(50):  # let the granted waiter run
            if len(order) > i:
                break
            await asyncio.sleep(0)
    await asyncio.gather(*tasks)
    # critical first (its 10 tokens count for "light"); standard alternates by virtual tokens
    # served (ties to the older head) instead of FIFO h1..h4 then l1, l2; sheddable last.
    assert order == ["l-crit", "h1", "h2", "l1", "h3", "l2", "h4", "h-shed"]


async def test_queue_deadline_and_shedding() -> None:
    q = FairQueue(Slots(0), max_waiting=1, clock=lambda: 0.0)
    with pytest.raises(QueueTimeoutError) as e:
        await q.acquire("a", "standard", "p", 1, 0.0)
    assert e.value.status == 503 and "Retry-After" in e.value.headers
    low = asyncio.create_task(q.acquire("a", "sheddable", "p", 1, 5.0))
    await asyncio.sleep(0)
    high = asyncio.create_task(q.acquire("b", "standard", "p", 1, 5.0))
    await asyncio.sleep(0)
    with pytest.raises(RateLimitError, match="shed"):
        await low  # the sheddable waiter made room for the standard one
    with pytest.raises(RateLimitError, match="none ranks below"):
        await q.acquire("c", "standard", "p", 1, 5.0)  # nothing below it to shed
    high.cancel()
    with pytest.raises(asyncio.CancelledError):
        await high
    assert q.waiting == 0


async def test_queue_pending_grants_count_against_room() -> None:
    q = FairQueue(Slots(1), clock=lambda: 0.0)
    g = await q.acquire("a", "standard", "p", 1, 1.0)
    assert isinstance(g, Grant) and q.room("p") == 0
    g.started()
    g.started()  # idempotent
    assert q.room("p") == 1


# -- the admission stage: the queue tick and the lease TTL --------------------------------------
def _gateway(extra: str = "") -> Any:
    from inferplane.api.pipeline import Gateway
    from tests.builders import MINIMAL_YAML

    return Gateway(parse_config(MINIMAL_YAML + extra, "fleet.yaml"))


async def test_queue_tick_grants_a_waiter_when_slots_free_up_on_their_own() -> None:
    """Capacity can free without a request of this gateway finishing (a scrape, an endpoint
    back in service): the `queue.tick_s` ticker grants the waiter anyway."""
    adm = _gateway("admission: {queue: {tick_s: 0.01}}\n").admission
    slots = Slots(0)
    adm.queue.free_slots = slots
    await adm.start()
    try:
        pool = ("llama-3.1-8b", None, None)
        waiter = asyncio.create_task(adm.queue.acquire("a", "standard", pool, 1, 5.0))
        await asyncio.sleep(0.05)
        assert not waiter.done() and adm.queue.waiting == 1
        slots.n = 1  # nobody calls pump or finish
        grant = await asyncio.wait_for(waiter, 1.0)
        assert isinstance(grant, Grant) and adm.queue.waiting == 0
        ticker = adm._ticker
        assert ticker is not None and not ticker.done()
    finally:
        await adm.close()
    assert adm._ticker is None and ticker.done()


def _ticks_on_virtual_time(
    monkeypatch: pytest.MonkeyPatch, tick_while_idle: bool, script: Any
) -> list[float]:
    """Run ``script(adm, slots)`` on the simulator's virtual clock (from 10.0 s) with the queue
    ticker started (tick_s 0.25, exact in binary); the instants the ticker slept until."""
    from inferplane.admission import controller
    from inferplane.twin.simulator.vloop import VirtualTimeLoop

    ticks: list[float] = []
    sleep_until = controller._sleep_until

    async def counted(loop: asyncio.AbstractEventLoop, when: float) -> None:
        ticks.append(when)
        await sleep_until(loop, when)

    monkeypatch.setattr(controller, "_sleep_until", counted)

    async def main() -> None:
        adm = _gateway("admission: {queue: {tick_s: 0.25}}\n").admission
        adm.tick_while_idle = tick_while_idle
        slots = Slots(0)
        adm.queue.free_slots = slots
        await adm.start()
        try:
            await script(adm, slots)
        finally:
            await adm.close()

    VirtualTimeLoop(start=10.0).run(main())
    return ticks


def test_queue_tick_sleeps_while_nothing_waits_and_keeps_its_grid(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The ticker does not wake an idle gateway: no timer at all while nothing waits. A request
    queued after an idle spell is re-checked on the grid of the ticker's start (10.0 + k/4),
    not tick_s after it arrived; the tick that grants the last waiter is the last one."""
    granted: list[float] = []

    async def script(adm: Any, slots: Slots) -> None:
        loop = asyncio.get_running_loop()
        await asyncio.sleep(100.1)  # idle until 110.1
        pool = ("llama-3.1-8b", None, None)
        waiter = asyncio.create_task(adm.queue.acquire("a", "standard", pool, 1, 50.0))
        waiter.add_done_callback(lambda _: granted.append(loop.time()))
        await asyncio.sleep(0.3)  # 110.4: ticked at 110.25 with no room
        assert not waiter.done() and adm.queue.waiting == 1
        slots.n = 1  # nobody calls pump or finish: the 110.5 tick grants
        await waiter
        await asyncio.sleep(100.0)  # idle again

    ticks = _ticks_on_virtual_time(monkeypatch, False, script)
    assert ticks == [110.25, 110.5]
    assert granted == [110.5]


def test_queue_ticks_while_idle_on_request_for_the_simulator(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With ``tick_while_idle`` (the simulator's setting) the ticker wakes every tick_s from its
    start whether or not anything waits, as an ``asyncio.sleep`` loop did."""

    async def script(adm: Any, slots: Slots) -> None:
        await asyncio.sleep(1.1)

    ticks = _ticks_on_virtual_time(monkeypatch, True, script)
    assert ticks == [10.25, 10.5, 10.75, 11.0, 11.25]


def test_next_grid_accumulates_from_a_grid_instant() -> None:
    from inferplane.admission.controller import _next_grid

    at = 0.0
    grid = []
    for _ in range(7):
        at += 0.1
        grid.append(at)
    assert _next_grid(0.1, 0.1, 0.55) == grid[5]  # 0.6000000000000001, as six sleeps added up
    assert _next_grid(0.1, 0.1, grid[5]) == grid[5]  # an instant on the grid is the next tick
    assert _next_grid(0.1, 0.1, 0.05) == 0.1
    far = _next_grid(0.0, 0.1, 1e6 + 0.05)  # a long idle spell jumps instead of looping
    assert 1e6 + 0.05 <= far < 1e6 + 0.15


async def test_no_ticker_without_the_queue() -> None:
    adm = _gateway("admission: {queue: {enabled: false}}\n").admission
    await adm.start()
    assert adm._ticker is None
    await adm.close()


@pytest.mark.parametrize("replacements", [0, 1, 3])
def test_lease_ttl_covers_every_replacement(replacements: int) -> None:
    adm = _gateway(
        f"gateway: {{upstream_timeout_s: 100, max_replacements: {replacements}}}\n"
        "admission: {lease_margin_s: 5, queue: {default_deadline_ms: 2000}}\n"
    ).admission
    longest = max([2.0] + [(c.queue_deadline_ms or 0) / 1000 for c in adm.classes.values()])
    assert adm.lease_ttl_s == pytest.approx(100 * (1 + replacements) + longest + 5)
    assert adm.budgets.lease_ttl_s == adm.lease_ttl_s


def test_pool_view_is_computed_once_per_snapshot() -> None:
    adm = _gateway().admission
    pool = ("llama-3.1-8b", None, None)
    cap = adm.capacity(pool)
    assert cap > 1 and adm.free_slots(pool) == cap and adm.utilisation(pool) == 0.0
    stats = adm._pool_stats(pool)
    assert adm._pool_stats(pool) is stats  # the same snapshot: no second scan
    r = adm.live.reserve("e", 10)  # a new snapshot: scanned again
    assert adm.free_slots(pool) == cap - 1 and adm.utilisation(pool) == pytest.approx(1 / cap)
    r.release()
    assert adm.free_slots(pool) == cap
    assert adm.free_slots(("no-such-model", None, None)) == 1 << 30  # no usable endpoint
    assert adm.degraded(("no-such-model", None, None)) is None


@pytest.mark.parametrize(
    "at", ["2025-03-04T23:59:59", "2025-03-05T00:00:00", "2025-03-04T00:00:00",
           "2024-02-29T12:00:00", "2025-03-04T12:00:00"],
)
def test_usage_day_is_the_utc_date(at: str) -> None:
    adm = _gateway().admission
    assert adm._utc_day(ts("2025-03-04T12:00:00")) == "2025-03-04"  # a cached day first
    assert adm._utc_day(ts(at)) == at[:10]


def _pool_sums_by_scan(adm: Any, pool: tuple[str, Any, Any]) -> tuple[Any, ...]:
    """The pool's sums by one scan of every endpoint of the snapshot (what `_compute_stats`
    did before it kept each member's terms)."""
    model, jur, kinds = pool
    n = cap = free = slot_free = inflight = room_cap = 0
    err, gated = math.inf, []
    for v in adm.live.snapshot().endpoints:
        e, st = v.endpoint, v.state
        if model not in e.models or not st.usable:
            continue
        if (jur is not None and e.jurisdiction not in jur) or (
            kinds is not None and e.substrate.kind not in kinds
        ):
            continue
        n, cap = n + 1, cap + e.max_concurrency
        room = e.max_concurrency - st.inflight
        if st.requests_left is not None:
            room = min(room, st.requests_left)
        if st.tokens_left is not None and st.tokens_left <= 0:
            room = 0
        room = max(0, room)
        slot_free += room
        per_tok = None if adm.gate_s is None else adm._per_token(e, model)
        if per_tok is None:
            room_cap += e.max_concurrency
        else:
            room_cap += 1
            if st.pending_prefill > 0 and st.pending_prefill_tokens * per_tok >= adm.gate_s:
                gated.append(e.name)
                room = 0
            else:
                room = min(room, 1)
        free, inflight, err = free + room, inflight + st.inflight, min(err, st.error_rate)
    return (n, cap, free, slot_free, inflight, err, room_cap, frozenset(gated))


def _many_endpoints_gateway(gate: float | None) -> Any:
    from inferplane.api.pipeline import Gateway
    from tests.builders import endpoint, model, pool_fleet, to_yaml

    eps = [endpoint(f"e{i}", 9000 + i, max_concurrency=2 + i % 3,
                    models=[model("m")] + ([model("n")] if i % 2 else []),
                    **({"limits": {"requests_per_min": 3}} if i == 5 else {}))
           for i in range(12)]
    queue = {} if gate is None else {"queue": {"max_prefill_queue_s": gate}}
    return Gateway(parse_config(to_yaml(pool_fleet(endpoints=eps, admission=queue)), "f.yaml"))


@pytest.mark.parametrize("gate", [None, 0.02])
@pytest.mark.parametrize("seed", range(4))
def test_pool_sums_kept_per_member_equal_a_scan(
    seed: int, gate: float | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Through random writes, reloads of the columns aside, admission's kept pool sums equal a
    scan of the snapshot; where the live fleet's snapshot log names the views replaced since
    the columns' last read they are brought up to date from it, with no comparison of every
    member's view (`Admission._compare_all`)."""
    import random

    from inferplane.admission import controller

    compares: list[str] = []
    compare_all = controller.Admission._compare_all

    def counted(self: Any, cols: Any, snap: Any, model: str) -> None:
        compares.append(model)
        compare_all(self, cols, snap, model)

    monkeypatch.setattr(controller.Admission, "_compare_all", counted)
    rng = random.Random(seed)
    adm = _many_endpoints_gateway(gate).admission
    from_log = 0
    live, held = adm.live, []
    names = [e.name for e in live.fleet.endpoints]
    pools = [("m", None, None), ("n", None, None), ("m", frozenset({"eu"}), None),
             ("m", frozenset({"us"}), None), ("n", None, frozenset({"gpu"}))]
    for _ in range(200):
        name, op = rng.choice(names), rng.randrange(6)
        if op == 0:
            held.append(live.reserve(name, 100, rng.choice([0, 500, 5000])))
        elif op == 1 and held:
            held.pop(rng.randrange(len(held))).release()
        elif op == 2:
            live.set_health(name, rng.random() < 0.7)
        elif op == 3:
            live.set_ejected(name, rng.random() < 0.3, "x")
        elif op == 4:
            live.observe_outcome(name, rng.random() < 0.5)
            live.clock = (lambda t: lambda: t)(live.clock() + 0.06)  # type: ignore[misc]
        for _ in range(rng.choice([0, 0, 0, 1, 70])):  # snapshots admission does not read
            held.append(live.reserve(rng.choice(names), 100, rng.choice([0, 5000])))
            live.snapshot()
        for pool in rng.sample(pools, 3):
            key = adm._columns_key(live.fleet, pool)
            cols = adm._columns.get(key)
            last, n = (None if cols is None else cols.serial), len(compares)
            st = adm._pool_stats(pool)
            assert (st.usable, st.capacity, st.free, st.slot_free, st.inflight,
                    st.lowest_error_rate, st.room_capacity, st.gated) == _pool_sums_by_scan(
                        adm, pool)
            now = adm._columns[key]
            log = live.snapshot().log
            assert log is not None
            if now is cols and last is not None and last != now.serial and (
                log.changed_between(last, now.serial) is not None
            ):  # the log covers the snapshots since the columns' last read: no compare
                assert len(compares) == n
                from_log += 1
    assert from_log > 0 and compares  # both paths taken (70 unread snapshots: past the log)


def test_a_new_snapshot_recomputes_only_the_endpoints_it_changed() -> None:
    adm = _many_endpoints_gateway(None).admission
    pool = ("m", None, None)
    adm._pool_stats(pool)
    cols = adm._columns[pool]
    seen = list(cols.views)
    adm.live.reserve("e3", 10)
    assert adm._pool_stats(pool).inflight == 1
    assert adm._columns[pool] is cols
    assert [w.name for v, w in zip(seen, cols.views, strict=True) if v is not w] == ["e3"]


def test_pool_columns_are_keyed_by_the_members_and_bounded(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Clients choose the jurisdiction strings of a pool: junk ones select the same members as
    the fleet's own and share their columns (each distinct header value kept its own until a
    reload), and beyond `_MAX_POOL_COLUMNS` pools the least recently used go."""
    from inferplane.admission import controller

    adm = _many_endpoints_gateway(None).admission
    assert {e.jurisdiction for e in adm.live.fleet.endpoints} == {"eu"}
    for i in range(300):
        adm.free_slots(("m", frozenset({"eu", f"zz{i}"}), None))  # as ("m", None, None)
        adm.free_slots(("m", frozenset({f"zz{i}"}), frozenset({"gpu", f"k{i}"})))  # no member
        adm.free_slots((f"no-such-model-{i}", None, None))
        adm.live.reserve("e1", 10).release()  # a new snapshot
    assert len(adm._columns) == 3

    monkeypatch.setattr(controller, "_MAX_POOL_COLUMNS", 3)
    ms, sets = ["m", "n"], [None, frozenset(), frozenset({"eu"})]
    pools = [(m, j, k) for m in ms for j in sets for k in [None, frozenset(), frozenset({"gpu"})]]
    for pool in pools * 2:
        adm.live.reserve("e2", 10).release()
        st = adm._pool_stats(pool)
        assert (st.usable, st.capacity, st.free) == _pool_sums_by_scan(adm, pool)[:3]
        assert len(adm._columns) <= 3


# -- client-retry recognition ----------------------------------------------------------------
async def test_marks_expire_restart_and_clear() -> None:
    s = MemoryStore()
    assert not await s.marked("k", 0)
    await s.mark("k", 10, 0)
    assert await s.marked("k", 9.9) and not await s.marked("k", 10)
    await s.mark("k", 10, 5)  # marked again: the time starts over
    assert await s.marked("k", 14.9)
    await s.unmark("k")
    assert not await s.marked("k", 6)


async def test_expired_entries_are_swept_without_budgets() -> None:
    """Each admitted request's retry check sweeps now and then, as the old mark_seen did: a
    store without budgets (no reserve) keeps no expired loop counter or mark for good."""
    s = MemoryStore()
    await s.incr("loop:t:wf", 1.0, 0.0)
    await s.mark("retry:k", 1.0, 0.0)
    for _ in range(4096):
        await s.marked("retry:other", 10.0)
    assert not s._incrs and not s._marks


async def test_a_retry_is_a_resend_after_a_failure_not_a_twin() -> None:
    """Identical bodies sent alongside each other (best-of-N) or after a success (Regenerate)
    are not retries; a re-send after a failure, a shed or a refusal is, and is shed first while
    the pool is degraded (audit29 #3)."""
    adm = _gateway().admission
    adm.degraded = lambda pool: "saturated"  # type: ignore[method-assign]
    t = tenant()
    body = {"model": "llama-3.1-8b", "max_tokens": 5,
            "messages": [{"role": "user", "content": "hi"}]}

    async def admit() -> Any:
        p = RequestProfile("r", "t", "llama-3.1-8b", prompt_tokens=2, max_output_tokens=5)
        return await adm.admit("chat", dict(body), b"same body", {}, t, H, p)

    retries = adm.metrics.client_retries
    twins = [await admit() for _ in range(4)]  # all in flight at once: none is a retry
    for tk in twins:
        tk.succeeded = True
        await adm.finish(tk)
    regen = await admit()  # the last try succeeded: Regenerate is not a retry
    regen.succeeded = True
    await adm.finish(regen)
    again = await admit()
    await adm.finish(again)  # failed (never accounted as a success)
    with pytest.raises(RateLimitError) as shed:  # the re-send after the failure: a retry
        await admit()
    assert shed.value.code == "retry_shed" and "Retry-After" in shed.value.headers
    with pytest.raises(RateLimitError):  # a retry storm stays shed while degraded
        await admit()
    adm.degraded = lambda pool: None  # type: ignore[method-assign]
    ok = await admit()  # recovered: the retry is admitted, and its success clears the mark
    ok.succeeded = True
    await adm.finish(ok)
    adm.degraded = lambda pool: "saturated"  # type: ignore[method-assign]
    await adm.finish(await admit())
    assert sum(s.value for m in retries.collect() for s in m.samples
               if s.name.endswith("_total")) == 3


async def test_a_shed_retry_does_not_restart_its_window() -> None:
    """A shed is no new failure: a client honouring Retry-After gets in `window_s` after its
    last real failure even while the pool stays degraded (review29-fix29a #1)."""
    adm = _gateway().admission
    now = [0.0]
    adm.clock = lambda: now[0]
    adm.degraded = lambda pool: "saturated"  # type: ignore[method-assign]
    assert adm.spec.retry.window_s == 60.0
    p = RequestProfile("r", "t", "llama-3.1-8b", prompt_tokens=2, max_output_tokens=5)

    async def admit() -> Any:
        return await adm.admit("chat", {"model": "llama-3.1-8b"}, b"same", {}, tenant(), H, p)

    await adm.finish(await admit())  # failed at 0: a re-send until 60 is a retry
    for at in (10.0, 30.0, 55.0):  # each shed, none restarting the time
        now[0] = at
        with pytest.raises(RateLimitError) as shed:
            await admit()
        assert shed.value.code == "retry_shed"
    now[0] = 61.0
    ok = await admit()  # still degraded, but no longer a retry
    ok.succeeded = True
    await adm.finish(ok)


async def test_the_budget_hold_is_given_back_before_the_retry_mark(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The settle runs first, and a store error in the retry mark neither skips it (the hold
    would stay until its lease expired) nor replaces the request's own outcome
    (review29-fix29a #2)."""
    adm = _gateway().admission

    async def down(*_: Any) -> None:
        raise ConnectionError("store down")

    monkeypatch.setattr(adm.store, "mark", down)
    monkeypatch.setattr(adm.store, "unmark", down)
    settled: list[Any] = []
    real_settle = adm.budgets.settle

    async def settle(lease: Any, usd: float, tokens: int) -> None:
        settled.append(lease)
        await real_settle(lease, usd, tokens)

    monkeypatch.setattr(adm.budgets, "settle", settle)
    t = tenant(budgets=[BudgetSpec(scope="tenant", window="day", usd=100.0)])
    p = RequestProfile("r", "t", "llama-3.1-8b", prompt_tokens=2, max_output_tokens=5)

    async def admit() -> Any:
        return await adm.admit("chat", {"model": "llama-3.1-8b"}, b"b", {}, t, H, p)

    tk = await admit()
    assert tk.lease is not None
    await adm.finish(tk)  # a failure: marked (the store fails), settled all the same
    assert settled == [tk.lease]

    async def refuse(*_: Any) -> Any:
        raise RateLimitError("queue deadline", code="queue_timeout")

    monkeypatch.setattr(adm.queue, "acquire", refuse)
    with pytest.raises(RateLimitError) as refused:  # its own refusal, not the store's error
        await admit()
    assert refused.value.code == "queue_timeout"
    assert len(settled) == 2 and settled[1] is not None
