"""The KV-event subscriber survives what the wire and the config can throw at it: malformed
frames and batches are skipped, a failing receive loop clears the endpoint's entries, logs (at
most once a minute) and reconnects, and `stop` never raises."""

from __future__ import annotations

import asyncio
import dataclasses
import logging

import msgpack
import pytest
import zmq
import zmq.asyncio

from inferplane.fleet.kv_events import BlockStored, encode_event_batch, seq_frame
from inferplane.fleet.kv_subscriber import KVEventSubscriber
from inferplane.fleet.model import Endpoint
from inferplane.fleet.prefix_index import PrefixIndex
from tests.builders import MINIMAL_YAML, fleet
from tests.support.procs import free_port


def endpoint(address: str) -> Endpoint:
    ep = fleet(MINIMAL_YAML).endpoints[0]
    return dataclasses.replace(ep, spec=ep.spec.model_copy(update={"kv_events": address}))


def stored(*hashes: int) -> bytes:
    ev = BlockStored(list(hashes), None, [1] * 16 * len(hashes), 16)
    return encode_event_batch(1.0, [ev], 0)


def test_handle_skips_garbage_frames() -> None:
    index = PrefixIndex()
    sub = KVEventSubscriber(index, [])
    garbage: list[list[bytes]] = [
        [],
        [b""],
        [b"", b"short", b"x"],
        [b"", seq_frame(0), b""],
        [b"", seq_frame(1), b"\xc1"],
        [b"", seq_frame(2), b"\x93\x01"],
        [b"", seq_frame(3), msgpack.packb({"a": 1})],  # KeyError: no "ts"
        [b"", seq_frame(4), msgpack.packb([1.0, [{"type": "BlockStored"}], 0])],  # KeyError
        [b"", seq_frame(5), msgpack.packb([1.0, [["BlockStored"]], 0])],  # IndexError
        [b"", seq_frame(6), msgpack.packb([1.0, 7, 0])],  # TypeError: events not a list
    ]
    last: int | None = None
    for frames in garbage:
        last = sub.handle("e", frames, last)
    assert last == 6 and sub.events_applied == 0 and index.size("e") == 0
    assert sub.handle("e", [b"", seq_frame(7), stored(11, 12)], last) == 7
    assert index.size("e") == 2 and sub.events_applied == 1


async def test_stop_swallows_a_failed_task() -> None:
    sub = KVEventSubscriber(PrefixIndex(), [])

    async def broken() -> None:
        raise RuntimeError("boom")

    task = asyncio.create_task(broken())
    await asyncio.sleep(0)
    sub._tasks.append(task)
    await sub.stop()  # must not raise
    assert sub._tasks == []


async def test_bad_address_clears_logs_once_and_keeps_retrying(
    caplog: pytest.LogCaptureFixture,
) -> None:
    index = PrefixIndex()
    ep = endpoint("tcp://127.0.0.1:noport")  # passes the schema; zmq rejects it (EINVAL)
    index.block_stored(ep.name, [1, 2, 3])
    sub = KVEventSubscriber(index, [ep])
    sub.RETRY_S = 0.01
    with caplog.at_level(logging.WARNING, logger="inferplane.kv_events"):
        sub.start()
        for _ in range(200):
            if sub.failures >= 3:
                break
            await asyncio.sleep(0.01)
        assert sub.failures >= 3
        assert not sub._tasks[0].done()  # still retrying
        assert index.size(ep.name) == 0
        await sub.stop()
    logged = [r for r in caplog.records if "KV events" in r.getMessage()]
    assert len(logged) == 1 and "noport" in logged[0].getMessage()


async def test_reconnects_after_a_failure_while_handling() -> None:
    """A bug in handling one message (here: the index raising) does not end the subscription:
    the loop reconnects and later messages are applied."""
    port = free_port()
    ctx = zmq.asyncio.Context.instance()
    pub = ctx.socket(zmq.PUB)
    pub.setsockopt(zmq.LINGER, 0)
    pub.bind(f"tcp://127.0.0.1:{port}")

    class Flaky(PrefixIndex):
        fail = True

        def apply(self, endpoint: str, event: object) -> None:
            if self.fail:
                self.fail = False
                raise RuntimeError("index bug")
            super().apply(endpoint, event)

    index = Flaky()
    ep = endpoint(f"tcp://127.0.0.1:{port}")
    sub = KVEventSubscriber(index, [ep])
    sub.RETRY_S = 0.01
    sub.start()
    try:
        for seq in range(500):
            await pub.send_multipart([b"", seq_frame(seq), stored(100 + seq)])
            if sub.failures == 1 and sub.events_applied > 0:
                break
            await asyncio.sleep(0.01)
        assert sub.failures == 1
        assert sub.events_applied > 0 and index.size(ep.name) > 0
        assert not sub._tasks[0].done()
    finally:
        await sub.stop()
        pub.close()


# -- the gateway's shutdown: every step runs ------------------------------------------------------


class _Failing:
    async def stop(self) -> None:
        raise RuntimeError("scraper stop failed")


async def test_gateway_stop_runs_every_step_after_a_failure(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from inferplane.api.pipeline import Gateway
    from tests.builders import config

    gw = Gateway(config(MINIMAL_YAML))
    closed: list[str] = []

    async def ledger_close() -> None:
        closed.append("ledger")

    async def admission_close() -> None:
        closed.append("admission")
        raise ConnectionError("store gone")

    async def dispatcher_close() -> None:
        closed.append("dispatcher")

    gw.scraper = _Failing()  # type: ignore[assignment]
    gw.ledger.close = ledger_close  # type: ignore[method-assign]
    gw.admission.close = admission_close  # type: ignore[method-assign]
    gw.dispatcher.close = dispatcher_close  # type: ignore[method-assign]
    with caplog.at_level(logging.ERROR, logger="inferplane"):
        await gw.stop()  # logged, not raised
    assert closed == ["ledger", "admission", "dispatcher"]
    messages = [r.getMessage() for r in caplog.records]
    assert any("scraper" in m for m in messages) and any("admission" in m for m in messages)


async def test_gateway_stop_cancelled_midway_still_closes_the_ledger() -> None:
    from inferplane.api.pipeline import Gateway
    from tests.builders import config

    gw = Gateway(config(MINIMAL_YAML))
    closed: list[str] = []

    class Cancelled:
        async def stop(self) -> None:
            raise asyncio.CancelledError

    async def ledger_close() -> None:
        closed.append("ledger")

    gw.scraper = Cancelled()  # type: ignore[assignment]
    gw.ledger.close = ledger_close  # type: ignore[method-assign]
    with pytest.raises(asyncio.CancelledError):
        await gw.stop()
    assert closed == ["ledger"]
