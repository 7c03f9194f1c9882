"""`dispatch.eager`: aiohttp's request writer started when the request is handed over, on
Python 3.11 as on 3.12, so a burst's requests go on the wire one by one instead of after the
whole burst's pre-send work."""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from inferplane.dispatch import eager

ACTIVE = eager.NEEDED and eager._WRITER is not None
"""Whether `eager.install` installs here (Python 3.11 with aiohttp 3.14 or newer)."""


async def _log_steps(log: list[str], fut: asyncio.Future[int] | None = None) -> int:
    log.append("start")
    if fut is None:
        return 1
    try:
        value = await fut
    except asyncio.CancelledError:
        log.append("cancelled")
        raise
    log.append("resumed")
    await asyncio.sleep(0)
    if value < 0:
        raise ValueError("negative")
    return value


def _as_writer(monkeypatch: pytest.MonkeyPatch, fn: Callable[..., Any]) -> None:
    """The factory treats coroutines of ``fn`` as aiohttp's writer of a bytes body."""
    monkeypatch.setattr(eager, "_WRITER", fn.__code__)
    monkeypatch.setattr(eager, "_bytes_body", lambda coro: True)


@pytest.fixture
def as_writer(monkeypatch: pytest.MonkeyPatch) -> None:
    _as_writer(monkeypatch, _log_steps)


def _run(body: Callable[[asyncio.AbstractEventLoop], Any]) -> Any:
    async def main() -> Any:
        loop = asyncio.get_running_loop()
        loop.set_task_factory(eager.eager_writer_factory)  # type: ignore[arg-type]
        try:
            return await body(loop)
        finally:
            loop.set_task_factory(None)

    return asyncio.run(main())


@pytest.mark.usefixtures("as_writer")
def test_the_writer_runs_its_first_step_inside_create_task() -> None:
    async def body(loop: asyncio.AbstractEventLoop) -> None:
        log: list[str] = []
        fut: asyncio.Future[int] = loop.create_future()
        task = asyncio.create_task(_log_steps(log, fut))
        assert log == ["start"]  # before create_task returned
        assert not task.done()
        fut.set_result(7)
        assert await task == 7
        assert log == ["start", "resumed"]

    _run(body)


@pytest.mark.usefixtures("as_writer")
def test_a_writer_done_in_its_first_step_is_a_finished_future() -> None:
    async def body(loop: asyncio.AbstractEventLoop) -> None:
        log: list[str] = []
        task = asyncio.create_task(_log_steps(log))
        assert task.done() and task.result() == 1 and log == ["start"]

    _run(body)


@pytest.mark.usefixtures("as_writer")
@pytest.mark.parametrize("first_step_ran", [True, False])
def test_cancelling_reaches_the_writer_where_it_waits(first_step_ran: bool) -> None:
    """Also when the task is cancelled before its own first step: the writer has already run
    its eager step and must see the cancellation (aiohttp closes the connection there)."""

    async def body(loop: asyncio.AbstractEventLoop) -> None:
        log: list[str] = []
        fut: asyncio.Future[int] = loop.create_future()
        task = asyncio.create_task(_log_steps(log, fut))
        if first_step_ran:
            await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert log == ["start", "cancelled"] and task.cancelled()
        assert fut.cancelled()  # as a task cancels what it waits on

    _run(body)


async def _fails_at_once() -> None:
    raise ValueError("first step")


def test_a_writer_failing_in_its_first_step_is_a_failed_future(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _as_writer(monkeypatch, _fails_at_once)

    async def body(loop: asyncio.AbstractEventLoop) -> None:
        task = asyncio.create_task(_fails_at_once())
        assert task.done()
        with pytest.raises(ValueError, match="first step"):
            task.result()

    _run(body)


VAR: contextvars.ContextVar[str] = contextvars.ContextVar("VAR", default="unset")


async def _ctx_steps(seen: list[str], fut: asyncio.Future[int]) -> None:
    seen.append(VAR.get())
    VAR.set("writer")
    await fut
    seen.append(VAR.get())


def test_the_writer_runs_in_a_copy_of_the_callers_context(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _as_writer(monkeypatch, _ctx_steps)

    async def body(loop: asyncio.AbstractEventLoop) -> None:
        seen: list[str] = []
        VAR.set("caller")
        fut: asyncio.Future[int] = loop.create_future()
        task = asyncio.create_task(_ctx_steps(seen, fut))
        assert seen == ["caller"]  # its first step ran inside create_task
        assert VAR.get() == "caller"  # the writer's change stays in its own context
        fut.set_result(0)
        await task
        assert seen == ["caller", "writer"]

    _run(body)


@pytest.mark.usefixtures("as_writer")
def test_an_error_after_the_first_step_fails_the_task() -> None:
    async def body(loop: asyncio.AbstractEventLoop) -> None:
        fut: asyncio.Future[int] = loop.create_future()
        task = asyncio.create_task(_log_steps([], fut))
        fut.set_result(-1)
        with pytest.raises(ValueError, match="negative"):
            await task

    _run(body)


@pytest.mark.usefixtures("as_writer")
def test_other_coroutines_get_ordinary_tasks() -> None:
    async def other(log: list[str]) -> None:
        log.append("other")

    async def body(loop: asyncio.AbstractEventLoop) -> None:
        log: list[str] = []
        task = asyncio.create_task(other(log))
        assert isinstance(task, asyncio.Task) and log == []  # not started yet
        await task
        assert log == ["other"]

    _run(body)


def test_install_leaves_a_loop_with_its_own_factory_alone() -> None:
    async def main() -> tuple[bool, object]:
        loop = asyncio.get_running_loop()

        def own(loop: asyncio.AbstractEventLoop, coro: Any, **kw: Any) -> asyncio.Task[Any]:
            return asyncio.Task(coro, loop=loop, **kw)

        loop.set_task_factory(own)
        return eager.install(), loop.get_task_factory()

    installed, factory = asyncio.run(main())
    assert not installed and factory is not eager.eager_writer_factory


@pytest.mark.skipif(not ACTIVE, reason="Python >= 3.12 starts aiohttp's writer itself, "
                    "or an aiohttp before 3.14")
def test_the_dispatcher_installs_the_factory_on_3_11() -> None:
    from inferplane.dispatch.upstream import Dispatcher

    async def main() -> object:
        d = Dispatcher(connect_timeout_s=1.0, total_timeout_s=5.0)
        await d.start()
        try:
            return asyncio.get_running_loop().get_task_factory()
        finally:
            await d.close()

    assert asyncio.run(main()) is eager.eager_writer_factory


@pytest.mark.skipif(not ACTIVE, reason="Python >= 3.12 starts aiohttp's writer itself, "
                    "or an aiohttp before 3.14")
def test_install_sets_the_factory_once_on_3_11() -> None:
    async def main() -> tuple[bool, bool, object]:
        loop = asyncio.get_running_loop()
        return eager.install(), eager.install(), loop.get_task_factory()

    assert asyncio.run(main()) == (True, True, eager.eager_writer_factory)


def _new_loop(kind: str) -> asyncio.AbstractEventLoop:
    if kind == "uvloop":
        uvloop = pytest.importorskip("uvloop")
        return uvloop.new_event_loop()  # type: ignore[no-any-return]
    return asyncio.new_event_loop()


async def _wire_order(data: Callable[[], object], install: bool) -> list[str]:
    """Two tasks queued together: the first posts ``data()`` over a kept-alive connection, the
    second only notes that it ran; returns the order of aiohttp's "chunk sent" signal (the
    body, from the writer, with the head coalesced into it) and that note."""

    async def answer(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(text="ok")

    if install:
        eager.install()
    app = web.Application()
    app.router.add_post("/", answer)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    order: list[str] = []

    async def sent(*_: object) -> None:
        order.append("wire")

    trace = aiohttp.TraceConfig()
    trace.on_request_chunk_sent.append(sent)
    try:
        async with aiohttp.ClientSession(trace_configs=[trace]) as session:
            url = f"http://127.0.0.1:{port}/"
            async with session.post(url, data=b"warm") as r:  # a kept-alive connection
                await r.read()
            order.clear()

            async def post() -> None:
                async with session.post(url, data=data()) as r:
                    await r.read()

            async def behind() -> None:
                order.append("other")

            await asyncio.gather(asyncio.ensure_future(post()), asyncio.ensure_future(behind()))
    finally:
        await runner.cleanup()
    return order


@pytest.mark.parametrize("loop_kind", ["asyncio", "uvloop"])
@pytest.mark.parametrize("installed", [True, False])
def test_a_post_is_on_the_wire_before_the_callbacks_queued_behind_it(
    installed: bool, loop_kind: str
) -> None:
    """A bytes body is on the wire before the task queued behind its post runs where the
    writer starts eagerly (the factory on 3.11, aiohttp itself on 3.12), and after it where the
    writer is only scheduled (3.11 without the factory), on asyncio's loop and on uvloop's."""
    loop = _new_loop(loop_kind)
    try:
        order = loop.run_until_complete(_wire_order(lambda: b"x" * 1000, installed))
    finally:
        loop.close()
    if (installed and ACTIVE) or not eager.NEEDED:
        assert order == ["wire", "other"]
    else:
        assert order == ["other", "wire"]


@pytest.mark.skipif(not ACTIVE, reason="Python >= 3.12 starts aiohttp's writer itself, "
                    "or an aiohttp before 3.14")
def test_a_streamed_body_keeps_an_ordinary_writer_task() -> None:
    """The eager path is for bytes bodies only (what the gateway sends): a streamed body's
    writer is scheduled as aiohttp schedules it on 3.11."""

    async def chunks() -> AsyncIterator[bytes]:
        yield b"x" * 100

    order = asyncio.run(_wire_order(chunks, True))
    assert order[:2] == ["other", "wire"]
