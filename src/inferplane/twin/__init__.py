"""The twin: inferplane's model of a fleet, in four rooms.

- :mod:`~inferplane.twin.traces` — production traces (Mooncake, Azure) and the deterministic
  prompt text built from their block ids;
- :mod:`~inferplane.twin.engine` — the emulated vLLM engine: scheduler, KV block pool, timing
  by the physics roofline; clock-agnostic;
- :mod:`~inferplane.twin.emulator` — the engine served over real HTTP in real time
  (``inferplane emulate``);
- :mod:`~inferplane.twin.simulator` — trace replay through the gateway's own code on a virtual
  clock (``inferplane simulate``).

Imports point one way: ``emulator`` → ``engine``; ``simulator`` → ``engine`` and ``traces``;
``engine`` and ``traces`` import no other room. ``tests/test_twin_layout.py`` checks this and that
no module under ``twin`` takes part in an import cycle.
"""
