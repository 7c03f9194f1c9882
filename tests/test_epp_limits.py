"""The picker's gRPC receive limit follows ``gateway.max_body_bytes`` (Envoy buffers the whole
body and sends it as one ext_proc message): a body at the limit is picked, one over it gets the
picker's 413, and a message gRPC refuses is logged rather than lost without a word."""

from __future__ import annotations

import logging
from typing import Any

import grpc
import orjson
import pytest

from tests.test_epp_stream import body, error_of, exchange, fleet_config, headers, picker

DEFAULT_LIMIT = 4 * 1024 * 1024  # gateway.max_body_bytes's default, and gRPC's own
RECEIVE_LIMIT = DEFAULT_LIMIT + 64 * 1024  # envoy_config.buffer_bytes: Envoy's buffer too


def padded(size: int) -> bytes:
    """A small valid chat request padded with JSON whitespace to exactly ``size`` bytes."""
    head = orjson.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}],
                         "max_tokens": 4})
    return head[:-1] + b" " * (size - len(head)) + b"}"


def routed(answers: list[Any]) -> bool:
    return answers[-1].WhichOneof("response") == "request_body"


async def test_a_body_at_the_default_limit_is_picked_despite_the_message_framing() -> None:
    # the ext_proc message is ~12 bytes longer than the body: gRPC's default 4 MiB limit
    # refused it (RESOURCE_EXHAUSTED, which Envoy answers as 503 picker_unavailable)
    async with picker() as (_, stub):
        assert routed(await exchange(stub, headers(), body(padded(DEFAULT_LIMIT))))
        status, err = error_of((await exchange(stub, headers(),
                                               body(padded(DEFAULT_LIMIT + 1))))[-1])
        assert status == 413 and err["type"] == "invalid_request_error"


async def test_a_raised_body_limit_raises_the_receive_limit() -> None:
    limit = 6 * 1024 * 1024
    async with picker(fleet_config(gateway={"max_body_bytes": limit})) as (_, stub):
        assert routed(await exchange(stub, headers(), body(padded(5_000_000))))
        assert routed(await exchange(stub, headers(), body(padded(limit))))
        status, _ = error_of((await exchange(stub, headers(), body(padded(limit + 1))))[-1])
        assert status == 413


async def test_a_message_over_the_receive_limit_is_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, "inferplane.epp")
    async with picker() as (_, stub):
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await exchange(stub, headers(), body(padded(RECEIVE_LIMIT + 1)))
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        # the next stream is served as usual
        assert routed(await exchange(stub, headers(), body()))
    logged = [r.getMessage() for r in caplog.records if r.name == "inferplane.epp"]
    assert any(f"gRPC receive limit ({RECEIVE_LIMIT} bytes)" in m for m in logged), logged


@pytest.mark.parametrize("aborted", [False, True])
async def test_a_stream_reset_after_its_headers_does_not_blame_the_receive_limit(
    aborted: bool, caplog: pytest.LogCaptureFixture,
) -> None:
    # review28 N1: a reset or cancelled stream (or one the picker broke off) logged the
    # warning that suggests the gRPC receive limit
    from multidict import CIMultiDict

    from inferplane.epp.server import Exchange

    caplog.set_level(logging.WARNING, "inferplane.epp")
    async with picker() as (p, _):
        ex = Exchange(p)
        ex.headers = CIMultiDict()  # the request headers came, then nothing was answered
        ex.aborted = aborted
        ex.closed()
    logged = [r.getMessage() for r in caplog.records if r.name == "inferplane.epp"]
    assert any("receive limit" in m for m in logged) is not aborted, logged
