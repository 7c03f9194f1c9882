"""The engine's speed from one stretch of time to the next (a calibrated profile's
``speed_spread``; :class:`~inferplane.physics.hardware.HardwareProfile`).

A CPU engine on a shared host does not run every step at one speed: for a while another
process or the hypervisor takes part of its core (or all of it) and every step is slower, then
it runs at its usual speed again. A stream that falls in a slow stretch comes out slower per
token than the others — the real engine's tail of time per output token — while a model whose
steps always take the same time has none. The probe samples the spread: short windows of a few
decode steps of every probe stream against their typical time (``physics.calibration.
speed_spread``). :class:`SpeedSpread` plays it back: engine time is cut into windows, each
window gets one factor drawn from the sampled ones, and a step that starts in it takes that
factor times its modelled time. A window of factor ``f`` lasts ``f × window_s``: it holds a
typical window's work (``window_s`` is the sampled windows' typical span), done ``f`` times
slower, as the sampled window did — so a window sampled with a stall in it delays the work it
holds by as much as the stall did, instead of by at most a fixed window's length (session 20:
docs/benchmarks.md).

The draws are a function of the window's index and a seed alone (no clock, no global state):
the same seed gives the same factor and the same span for the same window on every run,
whatever the order of the calls. Only the emulator uses it; the simulator and the placement
predictor keep the typical speed.
"""

from __future__ import annotations

import bisect
import random
from collections.abc import Sequence

from inferplane.physics.roofline import Roofline

#: Every this many windows, where the window starts is kept, so that a lookup of an earlier
#: time replays from the nearest one instead of from window 0.
_MARK_EVERY = 4096
#: Mixes a window's index into its generator's seed (an odd 64-bit constant: distinct windows
#: get distinct seeds).
_MIX = 0x9E3779B97F4A7C15


class SpeedSpread:
    """Factor of the step time for each window of engine time; 1.0 everywhere without
    ``factors``. Window ``k`` gets the factor ``f_k`` its seed draws and lasts
    ``f_k × window_s``; it starts where window ``k - 1`` ended (window 0 at engine time 0)."""

    __slots__ = ("_end", "_factor", "_marks", "_start", "_window", "factors", "seed",
                 "window_s")

    def __init__(self, factors: Sequence[float], window_s: float, seed: int = 0) -> None:
        if factors and (not min(factors) > 0 or not window_s > 0):
            raise ValueError("speed spread factors must be > 0, with a window > 0")
        self.factors = tuple(factors)
        self.window_s = window_s
        self.seed = seed
        self._marks = [0.0]  # the start of window i × _MARK_EVERY
        self._go_to(0)

    @property
    def enabled(self) -> bool:
        return bool(self.factors)

    def _draw(self, k: int) -> float:
        return random.Random((k * _MIX + self.seed) & ((1 << 64) - 1)).choice(self.factors)

    def _go_to(self, mark: int) -> None:
        """Back to the window of mark ``mark`` (the window last looked up: index, start, end)."""
        self._window, self._start = mark * _MARK_EVERY, self._marks[mark]
        self._factor = self._draw(self._window) if self.factors else 1.0
        self._end = self._start + self._factor * self.window_s

    def window(self, t: float) -> tuple[int, float, float]:
        """The window that engine time ``t`` falls in: (index, start, factor); times before 0
        fall in window 0. Found from the last window looked up, forward (the emulator asks in
        the order of its steps); an earlier time replays the windows from the last kept start
        before it, the same sums in the same order, so the answer does not depend on what was
        asked before."""
        if not self.factors:
            return 0, 0.0, 1.0
        if t < self._start:
            self._go_to(max(0, bisect.bisect_right(self._marks, t) - 1))
        while t >= self._end:
            self._window += 1
            self._start = self._end
            if self._window == len(self._marks) * _MARK_EVERY:
                self._marks.append(self._start)
            self._factor = self._draw(self._window)
            self._end = self._start + self._factor * self.window_s
        return self._window, self._start, self._factor

    def factor_at(self, t: float) -> float:
        """The factor for a step starting at engine time ``t``."""
        return self.window(t)[2] if self.factors else 1.0


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
