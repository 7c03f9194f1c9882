"""The KV-event subscriber survives what the wire and the config can throw at it: malformed
frames and batches are skipped, a failing receive loop clears the endpoint's entries, logs (at
most once a minute) and reconnects, and `stop` never raises."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Iterable
from typing import Any

import msgpack
import pytest
import zmq
import zmq.asyncio

from inferplane.fleet.kv_events import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    encode_event_batch,
    seq_frame,
)
from inferplane.fleet.kv_subscriber import KVEventSubscriber
from inferplane.fleet.model import Endpoint
from inferplane.fleet.prefix_index import PrefixIndex
from inferplane.tokenization import block_hashes
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

    class Flaky:
        """The index, its first ``block_stored`` failing (a wrapper, not a subclass: where
        the prefix index is compiled (`inferplane.compiled`) it takes no Python subclasses)."""

        def __init__(self) -> None:
            self.index = PrefixIndex()
            self.fail = True

        def __getattr__(self, name: str) -> Any:
            return getattr(self.index, name)

        def block_stored(self, endpoint: str, hashes: Iterable[int]) -> None:
            if self.fail:
                self.fail = False
                raise RuntimeError("index bug")
            self.index.block_stored(endpoint, hashes)

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


# -- engine hashes become content keys --------------------------------------------------------


def vllm_like(
    parent: int | None, n_blocks: int, tokens: list[int], bs: int, salt: int
) -> BlockStored:
    """A BlockStored whose block hashes are opaque to the gateway (as vLLM's sha256 with a
    random seed are): arbitrary 64-bit numbers, unrelated to the tokens."""
    hashes = [(salt * 1_000_003 + i * 7919) & ((1 << 64) - 1) for i in range(n_blocks)]
    return BlockStored(hashes, parent, tokens[: n_blocks * bs], bs)


def test_engine_hashes_map_to_the_content_keys_classify_computes() -> None:
    bs = 4
    tokens = list(range(10, 30))  # 5 blocks
    index = PrefixIndex()
    sub = KVEventSubscriber(index, [])
    first = vllm_like(None, 2, tokens, bs, salt=1)
    # the next request extends the prefix: its event chains to the last stored block
    rest = BlockStored(
        [0xAAAA, 0xBBBB, 0xCCCC], first.block_hashes[-1], tokens[2 * bs : 5 * bs], bs
    )
    sub.apply("e", first)
    sub.apply("e", rest)
    expected = block_hashes(tokens, bs)
    assert index.match_length("e", expected) == 5
    assert index.match_length("e", block_hashes([99, *tokens[1:]], bs)) == 0  # first block differs
    # evicting the engine's third block breaks the chain there
    sub.apply("e", BlockRemoved([0xAAAA]))
    assert index.match_length("e", expected) == 2
    sub.apply("e", AllBlocksCleared())
    assert index.size("e") == 0 and len(sub.keys["e"]) == 0


def test_a_block_whose_parent_was_never_seen_is_skipped_and_counted() -> None:
    index = PrefixIndex()
    sub = KVEventSubscriber(index, [])
    sub.apply("e", BlockStored([5, 6], 12345, list(range(8)), 4))
    assert index.size("e") == 0 and sub.unkeyed == 2 and sub.events_applied == 1


def test_same_tokens_under_two_engine_hashes_stay_held_until_both_go() -> None:
    index = PrefixIndex()
    sub = KVEventSubscriber(index, [])
    tokens = list(range(8))
    sub.apply("e", BlockStored([1, 2], None, tokens, 4))
    sub.apply("e", BlockStored([3, 4], None, tokens, 4))  # e.g. another LoRA or cache salt
    keys = block_hashes(tokens, 4)
    assert index.size("e") == 2
    sub.apply("e", BlockRemoved([1, 2]))
    assert index.match_length("e", keys) == 2
    sub.apply("e", BlockRemoved([3, 4]))
    assert index.match_length("e", keys) == 0


def test_a_sequence_gap_forgets_the_mapping_too() -> None:
    index = PrefixIndex()
    sub = KVEventSubscriber(index, [])
    first = BlockStored([1], None, [1, 2, 3, 4], 4)
    sub.handle("e", [b"", seq_frame(0), encode_event_batch(1.0, [first], 0)], None)
    assert index.size("e") == 1
    # seq 2 after 0: the engine's state in between is unknown; its child cannot be keyed
    child = BlockStored([2], 1, [5, 6, 7, 8], 4)
    sub.handle("e", [b"", seq_frame(2), encode_event_batch(1.0, [child], 0)], 0)
    assert index.size("e") == 0 and sub.unkeyed == 1 and sub.gaps == 1
