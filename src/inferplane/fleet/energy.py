"""Energy of a request: the power its endpoint drew while serving it, shared with the requests
served beside it.

``energy_j = power_w × e2e_s ÷ sharing``, where

* ``power_w`` is the endpoint's **live** draw where its ``/metrics`` page reports one (the DCGM
  exporter's ``DCGM_FI_DEV_POWER_USAGE``, summed over the endpoint's devices, when a sidecar or
  node agent merges it into the page, as the emulator does), else the pool's configured envelope
  (``substrates[].power_watts``) split evenly over its endpoints, else the hardware profile's
  power × the endpoint's devices (``tp``); provider APIs report none and get none;
* ``sharing`` is the requests in flight on the endpoint when this one ends, itself included, so
  that concurrent requests split the draw instead of each being charged all of it.

The source (``live``, ``envelope`` or ``tdp``) is recorded beside the joules: evidence says
whether energy was measured or estimated.
"""

from __future__ import annotations

from typing import Literal

from inferplane.fleet.model import Endpoint

PowerSource = Literal["live", "envelope", "tdp"]


def endpoint_power_w(
    endpoint: Endpoint, live_w: float | None
) -> tuple[float, PowerSource] | None:
    """The endpoint's power now and where the figure comes from; None for provider APIs."""
    if live_w is not None and live_w > 0:
        return live_w, "live"
    sub = endpoint.substrate
    if sub.kind == "provider-api":
        return None
    if sub.power_watts is not None:
        return sub.power_watts / len(sub.endpoints), "envelope"
    hw = endpoint.hardware
    if hw is None:
        roof = next((r for m in endpoint.spec.models if (r := endpoint.roofline(m.name))), None)
        hw = roof.hardware if roof is not None else None
    if hw is None:
        return None
    return hw.power_watts * endpoint.spec.tp, "tdp"


def request_energy_j(power_w: float, e2e_s: float, sharing: int) -> float:
    """Joules of one request (see the module docstring)."""
    return power_w * max(0.0, e2e_s) / max(1, sharing)
