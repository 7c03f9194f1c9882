"""The upstream request's bytes written when it is handed over, on Python 3.11 too.

aiohttp writes a request's head and body from ``ClientRequest.write_bytes``, a task of its own.
From Python 3.12 it starts that task eagerly (``eager_start=True``): the bytes go to the socket
inside ``session.post()``. On 3.11 the task is only scheduled, so it runs after every callback
already queued on the loop. In a burst (all of one trace second's requests arrive at once), the
handlers of the other requests are queued ahead of it, and each runs its whole pre-send path
(classify, admit, place) first: every request of the burst goes on the wire after the last one
is placed, and the first request waits for the whole burst's work (docs/benchmarks.md, "The
gateway's gap, continued"; session 14 measured it again per request).

`install` gives a 3.11 event loop a task factory that does for that one coroutine what 3.12
does: it runs the writer's first step at once, in a copy of the caller's context; if the writer
finished (the usual case: the body fits in the socket's buffer) the caller gets a finished
future, and aiohttp keeps no task for it, as on 3.12; if the writer waits (a full buffer, a
100-continue) a task resumes it from there, so cancelling the task reaches the writer where it
waits. Every other coroutine gets an ordinary task. On 3.12 and later, on a loop that already
has a task factory, or with an aiohttp whose writer is not the method named above, nothing is
changed.
"""

from __future__ import annotations

import asyncio
import contextvars
import sys
from collections.abc import Coroutine, Generator
from typing import Any

from aiohttp import client_reqrep

_WRITER = getattr(client_reqrep.ClientRequest.write_bytes, "__code__", None)
NEEDED = sys.version_info < (3, 12)
"""Whether aiohttp leaves the writer to a scheduled task (Python < 3.12)."""


class _Pass:
    """Yields one value to the task that awaits it, and returns what the task sends back."""

    __slots__ = ("value",)

    def __init__(self, value: object) -> None:
        self.value = value

    def __await__(self) -> Generator[Any, None, None]:
        yield self.value


async def _resume(coro: Coroutine[Any, Any, Any], pending: object) -> Any:
    """Drive ``coro`` on from where its eager first step left it (waiting on ``pending``)."""
    while True:
        try:
            await _Pass(pending)
        except BaseException as exc:  # the task's cancellation, thrown in where coro waits
            try:
                pending = coro.throw(exc)
            except StopIteration as stop:
                return stop.value
        else:
            try:
                pending = coro.send(None)
            except StopIteration as stop:
                return stop.value


def eager_writer_factory(
    loop: asyncio.AbstractEventLoop,
    coro: Coroutine[Any, Any, Any],
    *,
    context: contextvars.Context | None = None,
) -> asyncio.Future[Any]:
    """A task factory: aiohttp's request writer started at once, every other coroutine as an
    ordinary task."""
    if _WRITER is None or getattr(coro, "cr_code", None) is not _WRITER:
        return asyncio.Task(coro, loop=loop, context=context)
    ctx = contextvars.copy_context() if context is None else context
    try:
        pending = ctx.run(coro.send, None)
    except StopIteration as stop:
        done: asyncio.Future[Any] = loop.create_future()
        done.set_result(stop.value)
        return done
    except (KeyboardInterrupt, SystemExit):
        raise
    except asyncio.CancelledError:
        cancelled: asyncio.Future[Any] = loop.create_future()
        cancelled.cancel()
        return cancelled
    except BaseException as exc:  # as a task that failed in its first step
        failed: asyncio.Future[Any] = loop.create_future()
        failed.set_exception(exc)
        return failed
    return asyncio.Task(_resume(coro, pending), loop=loop, context=ctx)


def install(loop: asyncio.AbstractEventLoop | None = None) -> bool:
    """Give the running loop (or ``loop``) the eager writer where it is needed and the loop
    has no task factory of its own; return whether it was installed."""
    loop = loop or asyncio.get_running_loop()
    if not NEEDED or _WRITER is None:
        return False
    factory = loop.get_task_factory()
    if factory is eager_writer_factory:
        return True
    if factory is not None:
        return False
    loop.set_task_factory(eager_writer_factory)  # type: ignore[arg-type]
    return True
