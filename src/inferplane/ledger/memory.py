"""An in-memory ledger: the most recent records, for tests and ledger-less gateways."""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

from inferplane.ledger.record import Outcome, decision_to_dict
from inferplane.placement.framework import Decision


class MemoryLedger:
    """Keeps the last ``capacity`` records."""

    def __init__(self, capacity: int = 10_000) -> None:
        self.capacity = capacity
        self._records: OrderedDict[str, tuple[Decision, Outcome, float]] = OrderedDict()

    def record(self, decision: Decision, outcome: Outcome, at_unix: float) -> None:
        """O(1): keeps the objects; they are turned into JSON only when read."""
        self._records[decision.decision_id] = (decision, outcome, at_unix)
        if len(self._records) > self.capacity:
            self._records.popitem(last=False)

    def get(self, decision_id: str) -> dict[str, Any] | None:
        entry = self._records.get(decision_id)
        if entry is None:
            return None
        decision, outcome, at_unix = entry
        rec = decision_to_dict(decision, outcome)
        rec["at_unix"] = at_unix
        return rec

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None
