"""Subscribe to the engines' KV-cache events (vLLM's ZMQ publisher) and mirror them in a
precise `PrefixIndex`.

vLLM publishes on a ZMQ PUB socket multipart messages ``[topic, seq (8-byte big-endian),
payload]`` where the payload is a msgpack ``[ts, [event, ...], dp_rank]`` batch (see
`inferplane.fleet.kv_events`). One SUB socket per endpoint whose config names ``kv_events``; every
event is applied to the index under that endpoint's name, so placement sees exactly which blocks
each engine holds. A gap in sequence numbers (dropped messages, engine restart) clears that
endpoint's entries: stale "held" blocks would attract traffic to a cold cache, while a missing
block only costs one affinity miss until the engine reports it again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

import zmq
import zmq.asyncio

from inferplane.fleet.kv_events import decode_event_batch
from inferplane.fleet.model import Endpoint
from inferplane.fleet.prefix_index import PrefixIndex

log = logging.getLogger("inferplane.kv_events")


class KVEventSubscriber:
    """Feeds ``index`` from every endpoint with a ``kv_events`` address, until `stop`."""

    RETRY_S = 1.0  # back-off before reconnecting after a failure
    LOG_EVERY_S = 60.0  # at most one failure log per endpoint this often

    def __init__(self, index: PrefixIndex, endpoints: list[Endpoint]) -> None:
        self.index = index
        self.endpoints = [e for e in endpoints if e.spec.kv_events]
        self.ctx = zmq.asyncio.Context.instance()
        self._tasks: list[asyncio.Task[None]] = []
        self.events_applied = 0
        self.gaps = 0
        self.failures = 0  # receive loops that failed and reconnected
        self._logged_at: dict[str, float] = {}  # endpoint -> when its last failure was logged

    def start(self) -> None:
        for e in self.endpoints:
            self._tasks.append(asyncio.create_task(self._run(e)))

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        self._tasks.clear()

    def handle(self, endpoint: str, frames: list[bytes], last_seq: int | None) -> int | None:
        """Apply one multipart message; returns its sequence number (None if malformed)."""
        if len(frames) < 3 or len(frames[-2]) != 8:
            return last_seq
        seq = int.from_bytes(frames[-2], "big")
        if last_seq is not None and seq != last_seq + 1:
            self.gaps += 1
            self.index.all_cleared(endpoint)
        try:
            _, events, _ = decode_event_batch(frames[-1])
        except (ValueError, TypeError, LookupError) as exc:  # LookupError: KeyError, IndexError
            log.warning("%s: undecodable KV event batch: %s", endpoint, exc)
            return seq
        for ev in events:
            try:
                self.index.apply(endpoint, ev)
                self.events_applied += 1
            except ValueError:
                continue
        return seq

    async def _run(self, endpoint: Endpoint) -> None:
        """Subscribe until cancelled. Any failure (a bad address, a socket error, a bug in
        decoding) clears the endpoint's entries — what it holds is unknown from then on — and
        reconnects after `RETRY_S`, logged at most once per endpoint per `LOG_EVERY_S`."""
        while True:
            try:
                await self._subscribe(endpoint)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.failures += 1
                self.index.all_cleared(endpoint.name)
                now = time.monotonic()
                last_log = self._logged_at.get(endpoint.name)
                if last_log is None or now - last_log >= self.LOG_EVERY_S:
                    self._logged_at[endpoint.name] = now
                    log.warning(
                        "%s: KV events from %s failed (%s: %s); reconnecting every %g s",
                        endpoint.name, endpoint.spec.kv_events, type(exc).__name__, exc,
                        self.RETRY_S,
                    )
            await asyncio.sleep(self.RETRY_S)

    async def _subscribe(self, endpoint: Endpoint) -> None:
        sock = self.ctx.socket(zmq.SUB)
        try:
            sock.setsockopt(zmq.SUBSCRIBE, b"")
            sock.setsockopt(zmq.LINGER, 0)
            assert endpoint.spec.kv_events is not None
            sock.connect(endpoint.spec.kv_events)
            last: int | None = None
            while True:
                frames = await sock.recv_multipart()
                last = self.handle(endpoint.name, frames, last)
        finally:
            sock.close()
