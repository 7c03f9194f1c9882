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
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

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
