"""The dispatcher's two boundaries around an upstream call: the first-byte deadline
(`_first_byte_deadline`) and the translation of client exceptions (`_translate`)."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest
from aiohttp.client_reqrep import ConnectionKey

from inferplane.dispatch.answer import UpstreamAttemptFailed
from inferplane.dispatch.upstream import _first_byte_deadline, _translate
from inferplane.looplag import LoopLag
from tests.builders import fleet

ENDPOINT = fleet().endpoints[0]


@pytest.mark.parametrize("with_lag", [False, True])
async def test_a_block_past_the_deadline_is_a_first_byte_timeout(with_lag: bool) -> None:
    lag = LoopLag() if with_lag else None
    with pytest.raises(UpstreamAttemptFailed) as info:
        async with _first_byte_deadline(ENDPOINT, 0.02, lag, 0.05):
            await asyncio.sleep(1)
    assert info.value.reason == "first_byte_timeout"
    assert info.value.upstream == ENDPOINT.name
    assert "within 0.02 s" in info.value.message


@pytest.mark.parametrize("seconds", [None, 5.0])
async def test_a_timeout_that_is_not_the_deadlines_leaves_as_it_came(
    seconds: float | None,
) -> None:
    with pytest.raises(TimeoutError):
        async with _first_byte_deadline(ENDPOINT, seconds, LoopLag(), None):
            raise TimeoutError  # the session's own timeout
    with pytest.raises(UpstreamAttemptFailed) as info, _translate(ENDPOINT):  # it names it
        async with _first_byte_deadline(ENDPOINT, seconds, None, None):
            raise TimeoutError
    assert info.value.reason == "timeout"


async def test_a_block_in_time_passes_its_value_and_other_errors_through() -> None:
    async with _first_byte_deadline(ENDPOINT, 5.0, LoopLag(), 10.0):
        await asyncio.sleep(0)
    with pytest.raises(ValueError, match="boom"):
        async with _first_byte_deadline(ENDPOINT, 5.0, None, None):
            raise ValueError("boom")


def _connector_error() -> aiohttp.ClientConnectorError:
    key = ConnectionKey("h", 1, False, True, None, None, None)
    return aiohttp.ClientConnectorError(key, OSError(111, "Connection refused"))


@pytest.mark.parametrize(
    ("exc", "reason", "message"),
    [
        (TimeoutError(), "timeout", "timed out before answering"),
        (_connector_error(), "connect", "cannot connect (Connection refused)"),
        (aiohttp.ServerDisconnectedError(), "connection",
         "connection failed (ServerDisconnectedError)"),
        (ConnectionResetError(), "connection", "connection failed (ConnectionResetError)"),
    ],
)
def test_client_exceptions_become_attempt_failures(
    exc: BaseException, reason: str, message: str
) -> None:
    with pytest.raises(UpstreamAttemptFailed) as info, _translate(ENDPOINT):
        raise exc
    assert info.value.reason == reason
    assert info.value.message.endswith(message)
    assert info.value.__suppress_context__


def test_other_exceptions_pass_through_translate() -> None:
    with pytest.raises(KeyError), _translate(ENDPOINT):
        raise KeyError("x")
    with _translate(ENDPOINT):
        pass
