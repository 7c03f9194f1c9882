"""One emulated vLLM endpoint: an :class:`~inferplane.twin.engine.model.Engine` in real time.

:mod:`inferplane.twin.emulator.server` (``inferplane emulate --config FLEET.yaml``, or
``start_emulator`` in-process) starts one aiohttp server per endpoint on the loopback port of the
endpoint's ``url``, each backed by one :class:`EmulatedEndpoint`:

- the cost model is the physics roofline of the endpoint's first generate model (else its
  first model) on the substrate's hardware, ``tp`` devices;
- KV capacity is ``emulation.num_gpu_blocks``, else ``roofline.kv_blocks(block_size,
  gpu_memory_utilization)`` capped at :data:`MAX_DERIVED_BLOCKS` (an elastic provider API
  would otherwise get a billion blocks);
- a driver task runs the engine in real time: ``out = engine.step(start)``, sleep until
  ``start + out.duration_s`` (scaled), then hand the step's tokens to the waiting HTTP handlers
  (one asyncio queue per request); the next step starts where this one ended (within
  :data:`MAX_LAG_S`), so the event loop's own work does not stretch every step; idle, it waits
  on an event. Engine time is real elapsed time × ``time_scale``, so every latency shrinks by
  the time scale. A calibrated profile with a ``speed_spread`` stretches every step by the
  factor drawn for the window of engine time it starts in (:mod:`inferplane.physics.spread`:
  the engine's speed varying as the probe sampled it on the real one);
- a calibrated profile's front end (:class:`~inferplane.physics.frontend.FrontEnd`):
  every request queues for ``frontend_request_s`` of the front end's time (one at a time, first
  come first served), waits ``request_overhead_s``, then queues again for
  ``frontend_handoff_s`` behind whatever arrived meanwhile before it reaches the engine; every
  step's tokens queue for ``frontend_token_s`` per stream before their handlers get them,
  joining the previous step's if those are still queued (the engine does not wait for them: it
  is another process in vLLM); ``provider-api`` substrates add a
  network round trip too (``emulation.network_rtt_ms``, else the hardware's ``network_rtt_s``),
  and every endpoint with a quota (``emulation.rate_limit_rpm``, else its declared
  ``limits.requests_per_min``, else a provider hardware profile's) answers 429 with
  ``Retry-After`` past it in a sliding one-minute window (both in engine time, so scaled);
- an endpoint with an upstream key (``api_key_env``/``api_key_file``) checks it on the API
  routes (401 without it), serves them under the URL's base path, and an ``anthropic``-dialect
  endpoint serves the Messages API (:mod:`inferplane.twin.emulator.messages`);
- with ``emulation.kv_events_port`` the engine's KV events are published as vLLM does: ZMQ
  PUB on ``tcp://127.0.0.1:PORT``, multipart ``[topic, 8-byte big-endian seq, msgpack]``.

The HTTP routes live in :mod:`inferplane.twin.emulator.app` (generation) and
:mod:`inferplane.twin.emulator.ops` (the rest), the ``/metrics`` page in
:mod:`inferplane.twin.emulator.metrics`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
import uuid
import zlib
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import zmq
from aiohttp import web

from inferplane.config.schema import ServedModel
from inferplane.fleet.kv_events import KVEvent, encode_event_batch, seq_frame
from inferplane.fleet.model import Endpoint
from inferplane.physics.frontend import FrontEnd
from inferplane.physics.spread import SpeedSpread, SpreadCost
from inferplane.twin.emulator.metrics import EngineMetricsPage
from inferplane.twin.engine.model import (
    MAX_DERIVED_BLOCKS,
    Engine,
    EngineConfig,
    EngineRequest,
)

log = logging.getLogger("inferplane.emulator")

IDLE_POWER_FRACTION = 0.25
"""Share of its rated power an idle accelerator still draws (the emulator's power model)."""
MAX_LAG_S = 0.02
"""Engine seconds the driver may run behind its own step timeline and still catch up (steps
start where the previous one ended); further behind, the next step starts now."""

FINISHED = -1
"""Queue item telling a handler its request is over (finished, aborted or shut down)."""


class EmulatorError(Exception):
    """The emulator cannot start: a port in use, an endpoint without a usable model, …"""


class EmulatedRequestError(Exception):
    """A request the emulated server rejects, rendered in vLLM's error shape."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param = status, message, param
        self.headers = dict(headers or {})

    @property
    def error_type(self) -> str:
        return {
            400: "BadRequestError",
            401: "AuthenticationError",
            404: "NotFoundError",
            429: "RateLimitError",
            503: "ServiceUnavailableError",
        }.get(self.status, "InternalServerError")

    def to_anthropic_body(self) -> dict[str, object]:
        """The error in the Anthropic Messages API's shape."""
        kind = {
            400: "invalid_request_error",
            401: "authentication_error",
            403: "permission_error",
            404: "not_found_error",
            413: "request_too_large",
            429: "rate_limit_error",
            529: "overloaded_error",
        }.get(self.status, "api_error")
        return {"type": "error", "error": {"type": kind, "message": self.message}}

    def to_body(self) -> dict[str, object]:
        return {
            "error": {
                "message": self.message,
                "type": self.error_type,
                "param": self.param,
                "code": self.status,
            }
        }


@dataclass(eq=False)
class Submission:
    """One request inside the engine, as its HTTP handler follows it."""

    request: EngineRequest
    queue: asyncio.Queue[int] = field(default_factory=asyncio.Queue)


def _pick_model(ep: Endpoint) -> ServedModel:
    for m in ep.spec.models:
        if m.kind == "generate" and ep.roofline(m.name) is not None:
            return m
    for m in ep.spec.models:
        if ep.roofline(m.name) is not None:
            return m
    raise EmulatorError(
        f"endpoint {ep.name!r}: none of its models fits {ep.substrate.hardware} x{ep.spec.tp}"
    )


class EmulatedEndpoint:
    """One endpoint: its engine, the real-time driver, rate limit, RTT and KV publisher."""

    def __init__(
        self,
        endpoint: Endpoint,
        time_scale: float = 1.0,
        rate_limit_rpm: int | None = None,
        api_key: str | None = None,
    ) -> None:
        if not time_scale > 0:
            raise ValueError("time_scale must be > 0")
        self.endpoint = endpoint
        self.time_scale = time_scale
        self.model = _pick_model(endpoint)
        roofline = endpoint.roofline(self.model.name)
        assert roofline is not None
        self.roofline = roofline
        emu = endpoint.spec.emulation
        blocks = emu.num_gpu_blocks
        if blocks is None:
            blocks = min(
                roofline.kv_blocks(emu.block_size, emu.gpu_memory_utilization), MAX_DERIVED_BLOCKS
            )
            if blocks <= 0:
                raise EmulatorError(f"endpoint {endpoint.name!r}: no memory left for KV cache")
        hw = roofline.hardware
        # a calibrated profile's speed from one stretch of engine time to the next: every step
        # takes its window's factor times the roofline's time (`physics.spread`)
        # seeded by the endpoint's name: replicas of one profile slow down in different
        # windows, as engines on different hosts would
        self.speed = SpeedSpread(hw.speed_spread, hw.speed_spread_window_s,
                                 seed=zlib.crc32(endpoint.name.encode()))
        self._cost = SpreadCost(roofline) if self.speed.enabled else None
        self.engine = Engine(
            EngineConfig(
                num_gpu_blocks=blocks,
                max_num_seqs=emu.max_num_seqs,
                max_num_batched_tokens=emu.max_num_batched_tokens,
                block_size=emu.block_size,
            ),
            roofline if self._cost is None else self._cost,
            self._on_kv_event if emu.kv_events_port is not None else None,
            idle_wake_s=hw.idle_wake_s,
            after_stream_s=hw.after_stream_s,
            after_stream_factor=hw.after_stream_factor,
        )
        self.metrics = EngineMetricsPage(self.engine, self.model.name, emu.gpu_memory_utilization)
        self._device_watts = (
            roofline.hardware.power_watts if not roofline.hardware.elastic else None
        )
        self._devices = endpoint.spec.tp
        self._busy: deque[tuple[float, float]] = deque()  # (step end, duration), last second
        if self._device_watts is not None:
            self.metrics.device_power = self.device_power
        self.is_provider = endpoint.substrate.kind == "provider-api"
        self.api_key = api_key  # checked on the API routes when set
        self.network_rtt_s = (
            emu.network_rtt_ms / 1000.0
            if emu.network_rtt_ms is not None
            else (hw.network_rtt_s if self.is_provider else 0.0)
        )
        self.request_overhead_s = hw.request_overhead_s  # calibrated profiles only (else 0)
        # real seconds of the emulator's own HTTP round trip (``start_emulator`` measures it
        # when a calibrated profile needs it; see `network_delay`)
        self.http_round_trip_s = 0.0
        self.frontend = FrontEnd(hw.frontend_request_s, hw.frontend_token_s, hw.frontend_handoff_s)
        # (deliver at engine time, tokens per request, finished requests): steps whose tokens
        # wait for the front end; the delivery task hands them out in order
        self._outbox: deque[tuple[float, list[tuple[Submission, int]]]] = deque()
        self._outbox_ready = asyncio.Event()
        self._deliverer: asyncio.Task[None] | None = None
        quota = next(
            (
                q
                for q in (
                    rate_limit_rpm,
                    emu.rate_limit_rpm,
                    endpoint.spec.limits.requests_per_min,
                    hw.rate_limit_rpm if self.is_provider else None,
                )
                if q is not None
            ),
            None,
        )
        self.rate_limit_rpm = quota
        self.max_model_len = max(m.max_context for m in endpoint.spec.models)
        self._t0 = time.monotonic()
        self._subs: dict[str, Submission] = {}
        self._wake = asyncio.Event()
        self._woken_by: float | None = None  # arrival of the request that woke the idle engine
        self._driver: asyncio.Task[None] | None = None
        self._arrivals: deque[float] = deque()
        self._kv_pending: list[KVEvent] = []
        self._kv_seq = 0
        self._zmq_ctx: zmq.Context[zmq.Socket[bytes]] | None = None
        self._pub: zmq.Socket[bytes] | None = None
        self.runner: web.AppRunner | None = None

    @property
    def name(self) -> str:
        return self.endpoint.name

    def now(self) -> float:
        """Engine time: real seconds since start × time scale."""
        return (time.monotonic() - self._t0) * self.time_scale

    def served(self, model: str | None) -> ServedModel:
        """The served model a request names (the first one when it names none), or 404."""
        if model is None:
            return self.endpoint.spec.models[0]
        for m in self.endpoint.spec.models:
            if model in (m.upstream, m.name):  # a provider knows its models by upstream name
                return m
        names = ", ".join(m.upstream for m in self.endpoint.spec.models)
        raise EmulatedRequestError(  # vLLM 0.32's words
            404, f"The model `{model}` does not exist. Valid aliases: {names}.", param="model"
        )

    # -- lifecycle -------------------------------------------------------------------------
    def start(self) -> None:
        """Bind the KV-event publisher (if any) and start the driver task."""
        port = self.endpoint.spec.emulation.kv_events_port
        if port is not None:
            self._zmq_ctx = zmq.Context()
            sock = self._zmq_ctx.socket(zmq.PUB)
            sock.setsockopt(zmq.LINGER, 0)
            try:
                sock.bind(f"tcp://127.0.0.1:{port}")
            except zmq.ZMQError as exc:
                sock.close()
                raise EmulatorError(
                    f"endpoint {self.name!r}: cannot publish KV events on 127.0.0.1:{port}: {exc}"
                ) from None
            self._pub = sock
        loop = asyncio.get_running_loop()
        self._driver = loop.create_task(self._drive(), name=self.name)
        if self.frontend.token_s > 0:
            self._deliverer = loop.create_task(self._deliver(), name=f"{self.name}-frontend")

    async def stop(self) -> None:
        """Stop the driver, release every waiting handler, close the publisher."""
        for task in (self._driver, self._deliverer):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._driver = self._deliverer = None
        self._outbox.clear()
        for sub in self._subs.values():
            sub.queue.put_nowait(FINISHED)
        self._subs.clear()
        if self._pub is not None:
            self._pub.close(0)
            self._pub = None
        if self._zmq_ctx is not None:
            self._zmq_ctx.term()
            self._zmq_ctx = None

    # -- requests --------------------------------------------------------------------------
    def admit(self) -> None:
        """Apply the provider rate limit (sliding window of 60 engine seconds): 429 past it."""
        rpm = self.rate_limit_rpm
        if rpm is None:
            return
        now, arrivals = self.now(), self._arrivals
        while arrivals and arrivals[0] <= now - 60.0:
            arrivals.popleft()
        if len(arrivals) >= rpm:
            wait_s = (arrivals[0] + 60.0 - now) / self.time_scale
            raise EmulatedRequestError(
                429,
                f"Rate limit reached: {rpm} requests per minute.",
                headers={
                    "Retry-After": str(max(1, math.ceil(wait_s))),
                    "retry-after-ms": str(max(1, math.ceil(wait_s * 1000))),
                },
            )
        arrivals.append(now)

    async def network_delay(
        self, arrived: float | None = None, *, take_round_trip: bool = False
    ) -> float:
        """Before the request reaches the engine: the provider API's network round trip, the
        front end's queue and intake (``frontend_request_s``, one request at a time), the
        hardware's calibrated per-request overhead (``request_overhead_s``) and then, with a
        ``frontend_handoff_s``, the intake's second piece queued behind what arrived until
        then, counted from ``arrived`` (engine time at which the handler got the request;
        default now).

        A calibrated profile's overheads were measured from the client's side, so they already
        hold the time a server needs to parse and tokenise a request: the emulator's own
        parsing and tokenising since ``arrived`` is taken out of the wait rather than added to
        it (at a few ms of TTFT, an emulator's own ~1 ms would otherwise show as +10-20 %).
        They hold one HTTP round trip too (the client's send to the server's handler, the first
        chunk's way back), which a client of the emulator pays again on top: ``take_round_trip``
        (every HTTP handler passes it) takes the emulator's own round trip
        (``http_round_trip_s``, real seconds) out as well — first out of
        ``request_overhead_s``, the rest by counting the front end's intake from that much
        before ``arrived`` (:func:`client_lead_s`). With a ``frontend_handoff_s`` the part taken
        out of ``request_overhead_s`` comes out after the hand-off, not out of the wait between
        the two pieces: the hand-off queues at the end of the fitted wait, so a request whose
        handler got it before then gets its first piece in ahead of it, as in the fitted model
        and the simulator (a closed loop's successors reach the handlers a round trip after
        the streams before them left the engine). The request then reaches the engine that
        much before its hand-off is done (``at``): an idle engine's step starts there, but no
        earlier than its previous step's end; a busy one takes it at its next step — a step
        later than the model when a step started within that much before the hand-off was
        done. Limit: the rest of the round trip (the part above ``request_overhead_s``, only
        when the round trip is longer than the fitted wait) still comes out as an earlier
        intake start, so it moves the hand-off that much earlier too, and a request sent
        later can lose its place ahead of it by up to that much.

        Returns the engine time at which the request reaches the engine by the model, for
        :meth:`submit` (``at``): the event loop wakes from a sleep up to a millisecond late
        (``epoll`` rounds its timeout up to whole ms), and counting the request's arrival, and
        the first step of an idle engine, from when the sleep should have ended keeps that
        lateness out of its TTFT instead of adding it (+1-2 ms on a lone request before)."""
        now = self.now()
        start = now if arrived is None or arrived > now else arrived
        overhead = self.request_overhead_s
        fe = self.frontend
        if take_round_trip and self.http_round_trip_s > 0:
            overhead, shift = client_lead_s(
                self.http_round_trip_s * self.time_scale, overhead,
                fe.request_s + fe.handoff_s,
            )
            start -= shift
        reached = start + self.network_rtt_s
        if fe.enabled:
            reached = fe.intake(reached)
            if fe.handoff_s > 0:
                # its second piece queues after the parallel wait, behind what arrived by then
                # (requests sent after this one included: `physics.frontend`) at the end of the
                # fitted wait, whole; the round trip's part of the overhead (`cut`) comes out
                # after the hand-off: the request reaches the engine `cut` before its hand-off
                # is done, possibly before this call (an idle engine's step then starts no
                # earlier than the end of its previous step: `_drive`)
                cut = self.request_overhead_s - overhead
                reached += self.request_overhead_s
                overhead = 0.0
                if reached > now:
                    await asyncio.sleep((reached - now) / self.time_scale)
                    now = self.now()
                reached = fe.handoff(reached) - cut
        ready = reached + overhead
        if ready > now:
            await asyncio.sleep((ready - now) / self.time_scale)
        return ready

    def submit(
        self,
        request_id: str,
        prompt: Sequence[int],
        max_tokens: int,
        cache_salt: str | None = None,
        at: float | None = None,
    ) -> Submission:
        """Queue a request in the engine; 400 if it can never run. ``cache_salt`` isolates its
        prefix cache as vLLM's does. ``at``: the engine time at which it arrived by the model
        (:meth:`network_delay`'s answer), if earlier than now; an idle engine starts its first
        step from there (within :data:`MAX_LAG_S`)."""
        if not prompt:
            raise EmulatedRequestError(400, "The prompt must not be empty.", param="prompt")
        now = self.now()
        arrival = now if at is None or at > now else at
        req = EngineRequest(
            request_id, prompt, max_tokens, arrival_time=arrival, cache_salt=cache_salt
        )
        try:
            self.engine.add_request(req, req.arrival_time)
        except ValueError as exc:
            raise EmulatedRequestError(400, str(exc)) from None
        sub = Submission(req)
        self._subs[request_id] = sub
        if self._woken_by is None:
            self._woken_by = arrival
        self._wake.set()
        return sub

    def abort(self, request_id: str) -> None:
        """Forget a request (client gone): free its KV blocks if it is still in the engine."""
        self._subs.pop(request_id, None)
        if self.engine.abort(request_id):
            log.debug("%s: aborted %s", self.name, request_id)
            self._flush_kv_events()

    def tokens_in_flight(self) -> int:
        """Prompt plus generated tokens of every unfinished request (running or waiting)."""
        return sum(sub.request.num_tokens for sub in self._subs.values())

    def reset_prefix_cache(self) -> bool:
        done = self.engine.reset_prefix_cache()
        self._flush_kv_events()
        return done

    # -- the driver ------------------------------------------------------------------------
    async def _drive(self) -> None:
        engine, subs = self.engine, self._subs
        step_end: float | None = None  # engine time at which the previous step ended
        while True:
            if not engine.has_unfinished():
                self._wake.clear()
                self._woken_by = None
                await self._wake.wait()
                # the first step starts when the request that woke the engine arrived (by the
                # model), not when this task got to run: the sleeps before it ended late; but
                # never before the previous step ended (an arrival ``at`` back-dated by the
                # round trip can fall inside it: two steps would overlap)
                woken = self._woken_by
                if woken is not None and step_end is not None:
                    woken = max(woken, step_end)
                step_end = woken
                continue
            now = self.now()
            # Steps follow each other on the engine's own timeline: the time this event loop
            # spent handing out the previous step's tokens (HTTP handlers, other endpoints) is
            # not added to every step, unless the loop has fallen too far behind to catch up.
            start = now if step_end is None or now - step_end > MAX_LAG_S else step_end
            if not engine.num_running and (first := engine.first_arrival()) is not None:
                # an idle engine's step starts when its first waiting request arrived by the
                # model (never after now); requests that arrived later wait for the next step,
                # even when their handlers added them before this task got to run
                start = max(start, first)
            if self._cost is not None:
                self._cost.factor = self.speed.factor_at(start)
            out = engine.step(start)
            step_end = start + out.duration_s
            if out.duration_s > 0:
                self._busy.append((step_end, out.duration_s))
            if out.duration_s > 0:
                # Sleep until the step's end, less the time already spent since it started.
                await asyncio.sleep(max((step_end - self.now()) / self.time_scale, 0.0))
            elif not out.new_tokens:
                await asyncio.sleep(0.001)  # nothing schedulable (cannot happen; never spin)
            items = [(sub, n) for rid, n in out.new_tokens.items() if (sub := subs.get(rid))]
            items += [(sub, FINISHED) for rid in out.finished if (sub := subs.pop(rid, None))]
            if self._deliverer is None:
                for sub, n in items:
                    sub.queue.put_nowait(n)
            elif items:  # the front end sends them when the work queued ahead of them is done
                at = self.frontend.emit(step_end, len(out.new_tokens))
                self._outbox.append((at, items))  # same time as the chunks it joins, if any
                self._outbox_ready.set()
            self.metrics.observe(engine.drain_samples())
            self._flush_kv_events()

    async def _deliver(self) -> None:
        """Hand each step's tokens to their handlers when the front end has sent them."""
        outbox = self._outbox
        while True:
            if not outbox:
                self._outbox_ready.clear()
                await self._outbox_ready.wait()
                continue
            at, items = outbox[0]
            wait_s = (at - self.now()) / self.time_scale
            if wait_s > 0:
                await asyncio.sleep(wait_s)
            outbox.popleft()
            for sub, n in items:
                sub.queue.put_nowait(n)

    def device_power(self) -> list[float]:
        """Modelled draw of each device: ``TDP × (IDLE_POWER_FRACTION + (1 − IDLE_POWER_FRACTION)
        × busy)``, ``busy`` the share of the last engine second spent in steps."""
        now, busy = self.now(), self._busy
        while busy and busy[0][0] < now - 1.0:
            busy.popleft()
        share = min(1.0, sum(d for _, d in busy))
        watts = self._device_watts or 0.0
        return [watts * (IDLE_POWER_FRACTION + (1 - IDLE_POWER_FRACTION) * share)] * self._devices

    # -- KV events -------------------------------------------------------------------------
    def _on_kv_event(self, event: KVEvent) -> None:
        self._kv_pending.append(event)

    def _flush_kv_events(self) -> None:
        if not self._kv_pending:
            return
        events, self._kv_pending = self._kv_pending, []
        if self._pub is None:
            return
        payload = encode_event_batch(time.time(), events, dp_rank=0)
        with contextlib.suppress(zmq.Again):  # a PUB socket drops at its high-water mark
            self._pub.send_multipart([b"", seq_frame(self._kv_seq), payload], flags=zmq.NOBLOCK)
        self._kv_seq += 1


def client_lead_s(round_trip_s: float, overhead_s: float, intake_s: float
                  ) -> tuple[float, float]:
    """Take an HTTP round trip (``round_trip_s``) out of a calibrated request's time before
    the engine: ``(overhead left, shift)`` — first out of the parallel ``overhead_s``
    (``request_overhead_s``), then what is left, up to the front end's intake (``intake_s``),
    as a ``shift`` of the time from which the intake is counted (it only shortens a request
    that finds the front end idle: one queued behind others waits for them either way).
    Never more than the profile's own time before the engine (a provider's network round
    trip is not the client's)."""
    cut = min(round_trip_s, overhead_s)
    return overhead_s - cut, min(round_trip_s - cut, intake_s)


def new_request_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"
