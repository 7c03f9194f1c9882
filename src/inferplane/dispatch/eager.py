"""The upstream request's bytes written when it is handed over, on Python 3.11 too.

aiohttp writes a request's head and body from ``ClientRequest.write_bytes``, a task of its own.
From Python 3.12 it starts that task eagerly (``eager_start=True``): the bytes go to the socket
inside ``session.post()``. On 3.11 the task is only scheduled, so it runs after every callback
already queued on the loop. In a burst (all of one trace second's requests arrive at once), the
handlers of the other requests are queued ahead of it, and each runs its whole pre-send path
(classify, admit, place) first: every request of the burst went on the wire after the last one
was placed, and the first request waited for the whole burst's work (docs/benchmarks.md, "The
gateway's gap, continued" and "The gateway's burst on real engines").

`install` gives a 3.11 event loop a task factory that does for that one coroutine what 3.12
does, where the request's body is bytes (what the gateway sends): it runs the writer's first
step at once, in a copy of the caller's context; if the writer finished (the usual case: the
body fits in the socket's buffer) the caller gets a finished future, and aiohttp keeps no task
for it, as on 3.12; if the writer waits (a full buffer) a task resumes it from there, and
cancelling that task reaches the writer where it waits, also before the task's first step.
Every other coroutine, and a writer of any other body (a stream, a multipart form), gets an
ordinary task (a bytes body sent with ``Expect: 100-continue`` is a bytes body: its writer
waits for the 100 from its first step on, as on 3.12). One difference from 3.12 remains: during
the eager step `asyncio.current_task()` is the caller's task, not the writer's (3.12 swaps it
in); aiohttp's writer of a bytes body does not look. On 3.12 and later, on a loop that already
has a task factory, and with an aiohttp older than 3.14 nothing is changed (checked against
3.14.5; tests/test_eager_writer.py fails on a release whose writer it no longer starts at once).
"""

from __future__ import annotations

import asyncio
import contextvars
import sys
from collections.abc import Coroutine
from typing import Any

import aiohttp
from aiohttp import client_reqrep, payload

from inferplane import eagerly


def _tested_aiohttp() -> bool:
    try:
        major, minor = (int(p) for p in aiohttp.__version__.split(".")[:2])
    except ValueError:
        return False
    return (major, minor) >= (3, 14)


_WRITER = (
    getattr(client_reqrep.ClientRequest.write_bytes, "__code__", None)
    if _tested_aiohttp()
    else None
)
NEEDED = sys.version_info < (3, 12)
"""Whether aiohttp leaves the writer to a scheduled task (Python < 3.12)."""


def _bytes_body(coro: Coroutine[Any, Any, Any]) -> bool:
    frame = getattr(coro, "cr_frame", None)
    request = frame.f_locals.get("self") if frame is not None else None
    return isinstance(getattr(request, "_body", None), payload.BytesPayload)


def eager_writer_factory(
    loop: asyncio.AbstractEventLoop,
    coro: Coroutine[Any, Any, Any],
    *,
    context: contextvars.Context | None = None,
) -> asyncio.Future[Any]:
    """A task factory: aiohttp's writer of a bytes body started at once (`inferplane.eagerly`),
    every other coroutine as an ordinary task."""
    if (
        _WRITER is None
        or getattr(coro, "cr_code", None) is not _WRITER
        or not _bytes_body(coro)
    ):
        return asyncio.Task(coro, loop=loop, context=context)
    return eagerly.start(coro, loop, context)


def install(loop: asyncio.AbstractEventLoop | None = None) -> bool:
    """Give the running loop (or ``loop``) the eager writer where it is needed and the loop
    has no task factory of its own; return whether it is installed."""
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
