"""The emulator server: every endpoint of a fleet file as an emulated vLLM server, in one process.

``inferplane emulate --config FLEET.yaml`` (or :func:`start_emulator` in-process) starts one
aiohttp server (:func:`~inferplane.twin.emulator.ops.build_app`) per endpoint on the loopback
port of the endpoint's ``url``, each backed by one
:class:`~inferplane.twin.emulator.endpoint.EmulatedEndpoint` (see there for the engine, its
timing, rate limits and KV events).
"""

from __future__ import annotations

import asyncio
import logging
import statistics
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

import aiohttp
from aiohttp import web

from inferplane.config.schema import FleetConfig
from inferplane.dispatch.credentials import load_credentials
from inferplane.errors import ConfigError
from inferplane.fleet.model import Endpoint, Fleet
from inferplane.twin.emulator.endpoint import EmulatedEndpoint, EmulatorError
from inferplane.twin.emulator.ops import build_app

__all__ = ["EmulatorError", "EmulatorHandle", "serve_emulator", "start_emulator"]

log = logging.getLogger("inferplane.emulator")


def _port_of(ep: Endpoint) -> int:
    parts = urlsplit(ep.url)
    if parts.port is not None:
        return parts.port
    return 443 if parts.scheme == "https" else 80


ROUND_TRIP_SAMPLES = 15
"""Streamed requests :func:`measure_http_round_trip_s` times (after 3 that warm it up)."""
ROUND_TRIP_WAIT_S = 0.0015
"""How long its handler sleeps before answering (not a whole number of ms: epoll's rounding)."""


async def measure_http_round_trip_s(
    host: str = "127.0.0.1", samples: int = ROUND_TRIP_SAMPLES
) -> float:
    """The median time, in real seconds, from an aiohttp client posting a small JSON request to
    an aiohttp server in this event loop until it reads the first event of the server's
    streamed answer, less the :data:`ROUND_TRIP_WAIT_S` the handler sleeps before sending it:
    what being an HTTP server that answers at a time it sleeps until adds to every answer the
    emulator sends (the client's send, the server's parsing up to the handler, the event loop
    waking up to a millisecond late from the sleep — ``epoll`` rounds up to whole ms —,
    writing the first chunk and the client reading it), on this machine and this event loop
    as they are now.

    A calibrated profile's per-request time was measured by a client of the real engine, so it
    already holds one such round trip; the emulator takes its own out of the wait
    (:meth:`EmulatedEndpoint.network_delay`) instead of adding a second one — at a few ms of
    TTFT, 1-2 ms of loopback HTTP is +10-25 % (the fidelity vLLM at concurrency 1)."""
    if samples < 1:
        raise ValueError("samples must be >= 1")

    async def answer(request: web.Request) -> web.StreamResponse:
        await request.read()
        await asyncio.sleep(ROUND_TRIP_WAIT_S)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream; charset=utf-8"})
        await resp.prepare(request)
        await resp.write(b'data: {"choices": [{"index": 0, "text": " the"}]}\n\n')
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp

    app = web.Application()
    app.router.add_post("/round-trip", answer)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, 0)
        await site.start()
        url = f"http://{host}:{int(runner.addresses[-1][1])}/round-trip"
        body = b'{"model": "m", "prompt": "' + b"the " * 64 + b'", "stream": true}'
        times: list[float] = []
        async with aiohttp.ClientSession() as session:
            for i in range(samples + 3):
                t0 = time.perf_counter()
                first = None
                async with session.post(url, data=body,
                                        headers={"Content-Type": "application/json"}) as r:
                    async for line in r.content:
                        if first is None and line.startswith(b"data:"):
                            first = time.perf_counter() - t0 - ROUND_TRIP_WAIT_S
                if i >= 3 and first is not None:
                    times.append(first)
        return statistics.median(times)
    finally:
        await runner.cleanup()


@dataclass
class EmulatorHandle:
    """Running emulated endpoints: ``urls`` by endpoint name; ``await stop()`` ends them."""

    endpoints: dict[str, EmulatedEndpoint]
    urls: dict[str, str]

    async def stop(self) -> None:
        """Stop every server and engine (idempotent)."""
        eps, self.endpoints = list(self.endpoints.values()), {}
        for e in eps:
            if e.runner is not None:
                await e.runner.cleanup()
                e.runner = None
            await e.stop()


async def start_emulator(
    config: FleetConfig,
    *,
    time_scale: float = 1.0,
    host: str = "127.0.0.1",
    port_override: Mapping[str, int] | None = None,
    only: Sequence[str] | None = None,
    rate_limit_override: Mapping[str, int] | None = None,
) -> EmulatorHandle:
    """Start the emulated endpoints of ``config`` in the running event loop.

    ``port_override`` maps endpoint names to ports (0 picks a free one); ``only`` restricts
    to some endpoints; ``rate_limit_override`` replaces a provider's requests per minute.
    Raises :class:`EmulatorError` (with everything already started stopped again) when an
    endpoint cannot start, e.g. its port is in use.
    """
    fleet = Fleet.from_config(config)
    chosen = list(fleet.endpoints)
    if only:
        unknown = sorted(set(only) - set(fleet.by_name))
        if unknown:
            raise EmulatorError(f"unknown endpoint(s) {unknown}; known: {sorted(fleet.by_name)}")
        chosen = [e for e in chosen if e.name in set(only)]
    overrides, rpm = dict(port_override or {}), dict(rate_limit_override or {})
    try:  # an emulated provider expects the key the gateway will send it
        keys = load_credentials(config, "the fleet file")
    except ConfigError as exc:
        raise EmulatorError(str(exc)) from None
    handle = EmulatorHandle({}, {})
    try:
        for ep in chosen:
            emu = EmulatedEndpoint(ep, time_scale, rpm.get(ep.name), keys.get(ep.name))
            port = overrides.get(ep.name, _port_of(ep))
            emu.start()
            handle.endpoints[ep.name] = emu
            runner = web.AppRunner(build_app(emu), handler_cancellation=True, access_log=None)
            await runner.setup()
            emu.runner = runner
            site = web.TCPSite(runner, host, port, reuse_address=True)
            try:
                await site.start()
            except OSError as exc:
                raise EmulatorError(
                    f"endpoint {ep.name!r}: cannot listen on {host}:{port}: {exc.strerror or exc}"
                ) from None
            bound = int(runner.addresses[-1][1]) if runner.addresses else port  # port 0
            handle.urls[ep.name] = f"http://{host}:{bound}"
            log.info(
                "%s: %s on http://%s:%d (%d KV blocks)",
                ep.name,
                emu.model.name,
                host,
                bound,
                emu.engine.config.num_gpu_blocks,
            )
        if any(e.request_overhead_s > 0 or e.frontend.request_s + e.frontend.handoff_s > 0
               for e in handle.endpoints.values()):
            # a calibrated profile's per-request time holds the real engine's HTTP round trip
            rt = await measure_http_round_trip_s(host)
            for e in handle.endpoints.values():
                e.http_round_trip_s = rt
            log.info("HTTP round trip %.3f ms: taken out of calibrated per-request times",
                     rt * 1e3)
    except BaseException:
        await handle.stop()
        raise
    return handle


async def serve_emulator(
    config: FleetConfig,
    *,
    time_scale: float = 1.0,
    only: Sequence[str] | None = None,
    stop: asyncio.Future[None] | asyncio.Event | None = None,
) -> None:
    """Run the emulator until ``stop`` is set (the CLI passes a signal-driven event)."""
    handle = await start_emulator(config, time_scale=time_scale, only=only)
    try:
        for name, url in handle.urls.items():
            emu = handle.endpoints[name]
            print(
                f"{name:<24} {url:<28} {emu.model.name} on {emu.roofline.hardware.name}"
                f" x{emu.roofline.tp}",
                flush=True,
            )
        if isinstance(stop, asyncio.Event):
            await stop.wait()
        elif stop is not None:
            await stop
        else:
            await asyncio.Event().wait()
    finally:
        await handle.stop()
