"""Retry governance: recognise client retries, and budget the gateway's own re-placements.

A request is a **client retry** when its ``Idempotency-Key`` (from the same tenant), or
(without one) the same body bytes from the same API key, was last seen failing within
``retry.window_s``: refused by admission (a shed included), an error answer, a timeout, its
client gone. A twin sent while the first is in flight (best-of-N) or after it succeeded
(Regenerate) is not one. `Admission.finish` keeps the marker (`retry_key`) per outcome. Retries
are counted per tenant and class, and are the first requests shed when the fleet is degraded.

`RetryBudget` is Finagle's retry budget (and Envoy's ``retry_budget``): re-placements are allowed
while ``retries < budget_min_per_s × window + budget_ratio × requests`` over the last
``budget_window_s`` seconds, so a failing fleet sees at most ~10 % extra load from the gateway
rather than a retry storm.
"""

from __future__ import annotations

import hashlib
import time
from collections import deque
from collections.abc import Callable

from inferplane.config.schema import RetryPolicy


def retry_key(tenant: str, key_hash: str, idempotency_key: str | None, raw: bytes) -> str:
    if idempotency_key is not None:
        digest = hashlib.sha256(idempotency_key.encode()).hexdigest()[:32]
        return f"retry:{tenant}:idem:{digest}"
    return f"retry:{tenant}:{key_hash[7:23]}:body:{hashlib.sha256(raw).hexdigest()[:32]}"


class RetryBudget:
    """Sliding-window budget for re-placements (per gateway process)."""

    def __init__(self, policy: RetryPolicy, clock: Callable[[], float] = time.monotonic) -> None:
        self.policy = policy
        self.clock = clock
        self._requests: deque[float] = deque()
        self._retries: deque[float] = deque()

    def _trim(self, now: float) -> None:
        edge = now - self.policy.budget_window_s
        for d in (self._requests, self._retries):
            while d and d[0] <= edge:
                d.popleft()

    def record_request(self) -> None:
        now = self.clock()
        self._requests.append(now)
        if len(self._requests) > 4096:
            self._trim(now)

    def allowance(self) -> float:
        self._trim(self.clock())
        p = self.policy
        return p.budget_min_per_s * p.budget_window_s + p.budget_ratio * len(self._requests)

    def try_acquire(self) -> bool:
        """Spend one re-placement if the budget allows it."""
        now = self.clock()
        if len(self._retries) >= self.allowance():
            return False
        self._retries.append(now)
        return True
