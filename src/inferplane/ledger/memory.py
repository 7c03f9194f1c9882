"""An in-memory ledger: the most recent records, for tests and ledger-less gateways.

Records are encoded like every ledger's (so receipts are the same), kept in order, not chained
(nothing is stored to verify), and committed the moment they are recorded.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

from inferplane.ledger.query import ExportRow, Page, Query, page_of
from inferplane.ledger.record import Entry, Outcome, Receipt, encode_entry
from inferplane.ledger.sqlite import merge_records
from inferplane.placement.framework import Decision


class MemoryLedger:
    """Keeps the last ``capacity`` records."""

    def __init__(self, capacity: int = 10_000) -> None:
        self.capacity = capacity
        self._records: OrderedDict[int, Entry] = OrderedDict()
        self._seq = 0

    def record(self, decision: Decision, outcome: Outcome, at_unix: float) -> Receipt:
        entry = encode_entry(decision, outcome, at_unix)
        self._seq += 1
        self._records[self._seq] = entry
        if len(self._records) > self.capacity:
            self._records.popitem(last=False)
        return Receipt(entry.receipt)

    # committed as recorded: never down, nothing spooled
    store_down = False
    writes_failing = False
    spooled = 0

    def get(self, decision_id: str) -> dict[str, Any] | None:
        return merge_records(e.text for e in self._records.values()
                             if e.decision_id == decision_id)

    async def lookup(self, decision_id: str) -> dict[str, Any] | None:
        return self.get(decision_id)

    async def query(self, q: Query) -> Page:
        rows: list[ExportRow] = []
        for seq, e in self._records.items():
            if seq <= q.after or (q.tenant is not None and e.tenant != q.tenant):
                continue
            if q.since is not None and e.at_unix < q.since:
                continue
            if q.until is not None and e.at_unix >= q.until:
                continue
            if any(v is not None and v != have for v, have in (
                (q.workload_class, e.workload_class), (q.model, e.model),
                (q.substrate, e.substrate),
            )):
                continue
            rows.append(ExportRow(
                seq, "memory", seq, e.decision_id, e.at_unix, e.tenant, e.workload_class,
                e.model, e.substrate, e.endpoint, e.status, e.cost_usd, e.receipt, "", "", e.text,
                e.ttft_s,
            ))
            if len(rows) > q.limit:
                break
        return page_of(rows, q.limit)

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None
