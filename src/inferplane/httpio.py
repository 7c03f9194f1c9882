"""Reading request bodies under a deadline, for every aiohttp front end (the API and the batch
lane): a body that arrives too slowly is a 408 (`RequestTimeoutError`), not a held connection."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

from aiohttp import web

from inferplane.errors import RequestTimeoutError

T = TypeVar("T")


async def read_body(request: web.Request, timeout_s: float) -> bytes:
    """The whole body, or a 408 when it has not arrived within ``timeout_s``."""
    if request.content.is_eof():
        return await request.read()
    try:
        async with asyncio.timeout(timeout_s):
            return await request.read()
    except TimeoutError:
        raise RequestTimeoutError(
            f"the request body did not arrive within {timeout_s:g} s (gateway.body_timeout_s)"
        ) from None


async def idle(step: Awaitable[T], timeout_s: float) -> T:
    """One read of a streamed body (an upload), or a 408 when the client pauses longer than
    ``timeout_s``."""
    try:
        async with asyncio.timeout(timeout_s):
            return await step
    except TimeoutError:
        raise RequestTimeoutError(
            f"the upload paused for more than {timeout_s:g} s (gateway.body_timeout_s)"
        ) from None
