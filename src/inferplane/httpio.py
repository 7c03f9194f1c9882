"""Reading request bodies under a deadline, for every aiohttp front end (the API and the batch
lane): a body that arrives too slowly is a 408 (`RequestTimeoutError`), not a held connection,
and one that cannot be read (a corrupt ``Content-Encoding: gzip|deflate``, a body cut short of
its ``Content-Length``, broken chunked framing: aiohttp's `RequestPayloadError`) is a 400
(`InvalidRequestError`), not an internal error."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

from aiohttp import web
from aiohttp.web_protocol import RequestPayloadError

from inferplane.errors import InvalidRequestError, RequestTimeoutError

T = TypeVar("T")


async def read_body(request: web.Request, timeout_s: float) -> bytes:
    """The whole body, or a 408 when it has not arrived within ``timeout_s`` (a 400 when it
    cannot be read: `unreadable`)."""
    try:
        if request.content.is_eof():
            return await request.read()
        async with asyncio.timeout(timeout_s):
            return await request.read()
    except TimeoutError:
        raise RequestTimeoutError(
            f"the request body did not arrive within {timeout_s:g} s (gateway.body_timeout_s)"
        ) from None
    except RequestPayloadError as exc:
        raise unreadable(request, exc) from None


async def idle(step: Awaitable[T], timeout_s: float, request: web.Request | None = None) -> T:
    """One read of a streamed body (an upload) of ``request``, or a 408 when the client pauses
    longer than ``timeout_s`` (a 400 when it cannot be read: `unreadable`)."""
    try:
        async with asyncio.timeout(timeout_s):
            return await step
    except TimeoutError:
        raise RequestTimeoutError(
            f"the upload paused for more than {timeout_s:g} s (gateway.body_timeout_s)"
        ) from None
    except RequestPayloadError as exc:
        raise unreadable(request, exc) from None


async def within(receive: Awaitable[T], timeout_s: float, request: web.Request) -> T:
    """A whole upload of ``request`` (``receive``), or a 408 when it has not arrived within
    ``timeout_s`` (``gateway.upload_timeout_s``) whatever its pace: the connection closes after
    the answer, the rest of the body unread. A `TimeoutError` from ``receive`` itself (a
    deadline of its own) is not this one: it propagates as is."""
    deadline = asyncio.timeout(timeout_s)
    try:
        async with deadline:
            return await receive
    except TimeoutError:
        if not deadline.expired():
            raise
        close_after_answer(request)
        raise RequestTimeoutError(
            f"the upload did not arrive whole within {timeout_s:g} s (gateway.upload_timeout_s)",
            headers={"Connection": "close"},
        ) from None


def close_after_answer(request: web.Request | None) -> None:
    """The connection of ``request`` closes once its answer is written, the rest of the body
    unread (`api.server.GatewayProtocol.close_after_answer`; a no-op on another protocol)."""
    if request is not None:
        close = getattr(request.protocol, "close_after_answer", None)
        if close is not None:
            close()


def unreadable(request: web.Request | None, exc: RequestPayloadError) -> InvalidRequestError:
    """The 400 for a body aiohttp could not read: which ``Content-Encoding`` failed to decode,
    or what was wrong with its framing (aiohttp's own words). The rest of the body is not read:
    the connection closes after the answer (`api.server.GatewayProtocol.close_after_answer`;
    aiohttp would read on to keep it alive, meet the same error and log it as unhandled)."""
    encoding = None if request is None else request.headers.get("Content-Encoding")
    close_after_answer(request)
    if encoding and "decode" in str(exc):
        message = f"request body could not be decoded (Content-Encoding: {encoding})"
    else:
        message = f"request body could not be read: {str(exc).removeprefix('400, message: ')}"
    return InvalidRequestError(message, code="invalid_body", headers={"Connection": "close"})
