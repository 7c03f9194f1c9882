"""A coroutine started at once, as Python 3.12's eager tasks start one, on any event loop.

``asyncio.create_task(coro)`` only schedules ``coro``: it runs after every callback already
queued, in a later turn of the loop, and whoever waits for it (``asyncio.wait``) is woken in the
turn after that. For a coroutine that usually finishes without waiting on anything (the settle of
an admission ticket on the in-memory store: `admission.controller.Admission.finish_soon`) that is
two turns of the loop, a task and a waiter's timer for work that is done in one call.

`start` runs the coroutine's first step at once, in a copy of the caller's context (what a task
would run it in). When it finishes there, the caller gets a finished future holding its result
or exception, and no task is made; when it waits (a Redis round trip) a task resumes it from
there (`Resumed`), and cancelling that task reaches the coroutine where it waits. What differs
from a task: the first step runs before `start` returns, inside the caller's turn, and during it
`asyncio.current_task()` is the caller's task — so a coroutine whose first step enters an
``asyncio.timeout`` (which cancels the task it was entered in) must not be started this way.
"""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Coroutine, Generator
from types import TracebackType
from typing import Any, TypeVar

T = TypeVar("T")

_STARTED = object()


class Resumed(Coroutine[Any, Any, Any]):
    """A coroutine already past its first step, driven on by a task: the task's first step
    hands over the future the coroutine waits on, every later step (and any exception the task
    throws, a cancellation before its first step included) goes to the coroutine itself."""

    __slots__ = ("_coro", "_pending")

    def __init__(self, coro: Coroutine[Any, Any, Any], pending: object) -> None:
        self._coro = coro
        self._pending = pending

    def send(self, value: Any) -> Any:
        pending, self._pending = self._pending, _STARTED
        if pending is not _STARTED:
            return pending  # what the coroutine awaits; the task waits on it
        return self._coro.send(value)

    def throw(
        self,
        typ: type[BaseException] | BaseException,
        val: object = None,
        tb: TracebackType | None = None,
    ) -> Any:
        pending, self._pending = self._pending, _STARTED
        exc = typ if isinstance(typ, BaseException) else typ()
        if isinstance(exc, asyncio.CancelledError) and isinstance(pending, asyncio.Future):
            pending.cancel()  # as a task cancels the future it waits on
        return self._coro.throw(exc)

    def close(self) -> None:
        self._coro.close()

    def __await__(self) -> Generator[Any, None, Any]:
        return self

    def __iter__(self) -> Resumed:
        return self

    def __next__(self) -> Any:
        return self.send(None)


def start(
    coro: Coroutine[Any, Any, T],
    loop: asyncio.AbstractEventLoop | None = None,
    context: contextvars.Context | None = None,
) -> asyncio.Future[T]:
    """Run ``coro``'s first step now; a finished future when it finished there, else a task
    that runs the rest (module docstring). ``loop``: the running loop by default."""
    loop = loop or asyncio.get_running_loop()
    ctx = contextvars.copy_context() if context is None else context
    try:
        pending = ctx.run(coro.send, None)
    except StopIteration as stop:
        done: asyncio.Future[T] = loop.create_future()
        done.set_result(stop.value)
        return done
    except (KeyboardInterrupt, SystemExit):
        raise
    except asyncio.CancelledError:
        cancelled: asyncio.Future[T] = loop.create_future()
        cancelled.cancel()
        return cancelled
    except BaseException as exc:  # as a task that failed in its first step
        failed: asyncio.Future[T] = loop.create_future()
        failed.set_exception(exc)
        return failed
    return asyncio.Task(Resumed(coro, pending), loop=loop, context=ctx)
