"""`inferplane.eagerly`: a coroutine's first step run at once, the rest in a task; and the
admission settle that uses it (`Admission.finish_soon`)."""

from __future__ import annotations

import asyncio
import contextvars

import pytest

from inferplane import eagerly
from inferplane.admission.controller import Admission, Ticket
from inferplane.admission.state import MemoryStore
from inferplane.config.loader import parse_config
from inferplane.config.schema import FleetConfig
from inferplane.fleet.live import LiveFleet
from inferplane.fleet.model import Fleet
from inferplane.placement.profile import RequestProfile
from inferplane.telemetry.metrics import GatewayMetrics
from tests.builders import pool_fleet, tenant, to_yaml

VAR: contextvars.ContextVar[str] = contextvars.ContextVar("var", default="unset")


async def test_a_coroutine_that_does_not_wait_is_finished_when_start_returns() -> None:
    ran: list[str] = []

    async def work() -> int:
        ran.append(VAR.get())
        VAR.set("inside")  # in a copy of the caller's context, as a task's
        return 7

    VAR.set("caller")
    fut = eagerly.start(work())
    assert ran == ["caller"]
    assert fut.done() and fut.result() == 7
    assert VAR.get() == "caller"


async def test_a_first_step_that_raises_gives_a_failed_future() -> None:
    async def boom() -> None:
        raise ValueError("no")

    fut = eagerly.start(boom())
    assert fut.done()
    with pytest.raises(ValueError, match="no"):
        fut.result()

    async def cancelled() -> None:
        raise asyncio.CancelledError

    assert eagerly.start(cancelled()).cancelled()


async def test_a_coroutine_that_waits_goes_on_in_a_task() -> None:
    gate = asyncio.Event()
    steps: list[str] = []

    async def work() -> str:
        steps.append("first")
        await gate.wait()
        steps.append("rest")
        return "done"

    fut = eagerly.start(work())
    assert steps == ["first"] and isinstance(fut, asyncio.Task) and not fut.done()
    gate.set()
    assert await fut == "done"
    assert steps == ["first", "rest"]


async def test_cancelling_the_task_reaches_the_coroutine_where_it_waits() -> None:
    seen: list[str] = []

    async def work() -> None:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            seen.append("cancelled")
            raise

    fut = eagerly.start(work())
    fut.cancel()  # before the task's first step
    with pytest.raises(asyncio.CancelledError):
        await fut
    assert seen == ["cancelled"]


def _admission(store: object, config: FleetConfig | None = None) -> tuple[Admission, Ticket]:
    config = config or parse_config(to_yaml(pool_fleet(9, tenants=[tenant("t", "sk-t")])))
    live = LiveFleet(Fleet.from_config(config))
    adm = Admission(config, live, GatewayMetrics(), store=store)  # type: ignore[arg-type]
    profile = RequestProfile(request_id="r", tenant="t", model="m", workload_class="interactive")
    t = Ticket("t", "sha256:" + "0" * 64, None, "interactive", profile)
    t.observe(0.25, 10, 5)
    return adm, t


class SlowStore(MemoryStore):
    """The in-memory store whose usage write waits for ``gate`` (a Redis round trip)."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = asyncio.Event()

    async def add_usage(self, *args: object, **kwargs: object) -> None:
        await self.gate.wait()
        await super().add_usage(*args, **kwargs)  # type: ignore[arg-type]


async def test_the_settle_on_the_memory_store_is_done_when_finish_soon_returns() -> None:
    adm, t = _admission(MemoryStore())
    fut = adm.finish_soon(t)
    assert fut.done() and t.done and not adm._tasks
    assert adm.finish_soon(t) is fut  # started once
    assert await adm.settled(t, 1.0)
    rows = await adm.store.usage("t")
    assert [(r.usd, r.prompt_tokens, r.completion_tokens) for r in rows] == [(0.25, 10, 5)]


@pytest.mark.parametrize("caller", ["task", "loop callback"])
async def test_a_budget_lease_on_the_memory_store_is_settled_when_finish_soon_returns(
    caller: str,
) -> None:
    # `finish_soon` runs `Budgets.settle` and `MemoryStore.settle` in the caller's turn, and
    # from the EPP's orphan check in no task at all (a `call_later` callback): a wait there
    # would leave the future pending, and an `asyncio.timeout` there fails without a task
    budgets = [{"scope": "tenant", "window": "day", "usd": 5.0}]
    config = parse_config(to_yaml(pool_fleet(9, tenants=[tenant("t", "sk-t", budgets=budgets)])))
    adm, t = _admission(MemoryStore(), config)
    now = adm.clock()
    t.lease = await adm.budgets.reserve(
        config.tenants[0], t.key_hash, None, 1.0, 100, t.settle_id, now
    )
    (key,) = [d.key for d in t.lease.counters]
    st = await adm.store.counter(key, now)
    assert (st.reserved_usd, st.reserved_tokens, st.spent_usd) == (1.0, 100, 0.0)

    futs: list[asyncio.Future[None]] = []
    if caller == "task":
        futs.append(adm.finish_soon(t))
    else:
        loop = asyncio.get_running_loop()
        called = loop.create_future()

        def orphan_check() -> None:
            assert asyncio.current_task() is None
            futs.append(adm.finish_soon(t))
            called.set_result(None)

        loop.call_soon(orphan_check)
        await called
    (fut,) = futs
    assert fut.done() and fut.exception() is None and not adm._tasks
    assert t.lease.settled
    st = await adm.store.counter(key, adm.clock())
    assert (st.reserved_usd, st.reserved_tokens, st.spent_usd, st.spent_tokens) == (
        0.0, 0, 0.25, 15)


async def test_another_stores_settle_runs_in_its_own_task_and_settled_waits_for_it() -> None:
    store = SlowStore()  # its waits could enter timeouts: never in the caller's task
    adm, t = _admission(store)
    fut = adm.finish_soon(t)
    assert isinstance(fut, asyncio.Task) and fut is not asyncio.current_task()
    assert not fut.done() and fut in adm._tasks and not t.done  # not started yet
    assert not await adm.settled(t, 0.01)  # ran out: counted, the settle goes on
    assert adm.metrics.admission_settle_timeouts._value.get() == 1
    store.gate.set()
    assert await adm.settled(t, 1.0)
    assert not adm._tasks
    assert len(await store.usage("t")) == 1
