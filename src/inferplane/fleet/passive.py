"""Ejection from the gateway's own outcomes: 429s with Retry-After, and passive health.

A hosted API has no ``/health`` to probe and no ``/metrics`` to scrape; what the gateway sees of
it is the answers to its own requests. `PassiveHealth` turns those into ejections through the
outlier detector (`OutlierDetector.eject_now`), whose sweeps return the endpoint half-open
(back in service on probation) when the ejection ends:

- **429** from any endpoint: ejected at once for its ``Retry-After`` (or its
  ``limits.retry_after_s`` when it sent none), kind ``rate_limited``;
- **passive health** (`Endpoint.health_check` ``passive``, the default for provider APIs): after
  ``health.outlier.passive_failures`` consecutive failures before the first byte (connect,
  timeout, 5xx, refused credentials), ejected for ``base_ejection_s`` × its ejection count, kind
  ``passive``; any success resets the count.

Ejections need the outlier sweeps to end them, so nothing is ejected here when
``health.outlier.enabled`` is false.
"""

from __future__ import annotations

from inferplane.config.schema import OutlierSpec
from inferplane.fleet.health import Action, OutlierDetector
from inferplane.fleet.live import LiveFleet
from inferplane.fleet.model import Endpoint


class PassiveHealth:
    """Failure and success callbacks of the request path, ejecting as described above."""

    def __init__(self, live: LiveFleet, outliers: OutlierDetector, spec: OutlierSpec) -> None:
        self.live = live
        self.outliers = outliers
        self.spec = spec
        self.failures: dict[str, int] = {}

    def failed(
        self,
        endpoint: Endpoint,
        *,
        reason: str,
        status: int | None,
        retry_after_s: float | None,
    ) -> Action | None:
        """An attempt failed before its first byte; return the ejection it caused, if any."""
        if not self.spec.enabled:
            return None
        now = self.live.clock()
        name = endpoint.name
        if status == 429:
            seconds = (
                retry_after_s if retry_after_s is not None else endpoint.spec.limits.retry_after_s
            )
            action = self.outliers.eject_now(
                name, now, "rate_limited", f"rate limited: HTTP 429, retry after {seconds:g} s",
                seconds=seconds,
            )
        elif endpoint.health_check == "passive":
            n = self.failures[name] = self.failures.get(name, 0) + 1
            if n < self.spec.passive_failures:
                return None
            self.failures[name] = 0
            action = self.outliers.eject_now(
                name, now, "passive", f"{n} consecutive failures (last: {reason})"
            )
        else:
            return None
        self.live.set_ejected(name, True, action.reason)
        return action

    def succeeded(self, name: str) -> None:
        """An answer came back: a passive endpoint's failure count starts again."""
        if self.failures.get(name):
            self.failures[name] = 0
