"""The engine's speed from one stretch of time to the next (a calibrated profile's
``speed_spread``; :class:`~inferplane.physics.hardware.HardwareProfile`).

A CPU engine on a shared host does not run every step at one speed: for a while another
process or the hypervisor takes part of its core and every step is slower, then it runs at
its usual speed again. A stream that falls in a slow stretch comes out slower per token than
the others — the real engine's tail of time per output token — while a model whose steps
always take the same time has none. The probe samples the spread (every decode point of every
round against its typical time, ``physics.calibration.speed_spread``); :class:`SpeedSpread`
plays it back: engine time is cut into windows of ``window_s``, each window gets one factor
drawn from the sampled ones, and a step that starts in it takes that factor times its modelled
time.

The draws are a function of the window's index and a seed alone (no clock, no global state):
the same seed gives the same factor for the same window on every run, whatever the order of
the calls. Only the emulator uses it; the simulator and the placement predictor keep the
typical speed.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

from inferplane.physics.roofline import Roofline

#: Mixes a window's index into its generator's seed (an odd 64-bit constant: distinct windows
#: get distinct seeds).
_MIX = 0x9E3779B97F4A7C15


class SpeedSpread:
    """Factor of the step time for each window of engine time; 1.0 everywhere without
    ``factors``."""

    __slots__ = ("_factor", "_window", "factors", "seed", "window_s")

    def __init__(self, factors: Sequence[float], window_s: float, seed: int = 0) -> None:
        if factors and (not min(factors) > 0 or not window_s > 0):
            raise ValueError("speed spread factors must be > 0, with a window > 0")
        self.factors = tuple(factors)
        self.window_s = window_s
        self.seed = seed
        self._window = -1 << 62  # the last window drawn, and its factor
        self._factor = 1.0

    @property
    def enabled(self) -> bool:
        return bool(self.factors)

    def window(self, t: float) -> int:
        """The index of the window that engine time ``t`` falls in."""
        return math.floor(t / self.window_s)

    def factor_at(self, t: float) -> float:
        """The factor for a step starting at engine time ``t``."""
        if not self.factors:
            return 1.0
        k = self.window(t)
        if k != self._window:
            rng = random.Random((k * _MIX + self.seed) & ((1 << 64) - 1))
            self._window, self._factor = k, rng.choice(self.factors)
        return self._factor


class SpreadCost:
    """A step cost model (``twin.engine.model.StepCostModel``) whose times are another's times
    :attr:`factor`; the caller sets the factor before each step (the emulator's driver:
    ``SpeedSpread.factor_at`` of the step's start)."""

    __slots__ = ("base", "factor")

    def __init__(self, base: Roofline) -> None:
        self.base = base
        self.factor = 1.0

    def step_time_s(
        self,
        prefill_tokens: int,
        prefill_context_tokens: int,
        decode_seqs: int,
        decode_context_tokens: int,
        prefill_pairs: float | None = None,
    ) -> float:
        return self.factor * self.base.step_time_s(
            prefill_tokens, prefill_context_tokens, decode_seqs, decode_context_tokens,
            prefill_pairs,
        )
