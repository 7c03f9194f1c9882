"""The decision ledger: every placement decision and its measured outcome.

`Ledger` is the protocol the gateway writes to; `MemoryLedger` keeps recent records in memory and
`SqliteLedger` appends them to a SQLite file off the request path. `render_decision` (in
`inferplane.ledger.explain`) turns one record into a readable explanation.
"""

from inferplane.ledger.memory import MemoryLedger
from inferplane.ledger.record import Ledger, Outcome, decision_to_dict
from inferplane.ledger.sqlite import LedgerFileError, SqliteLedger, read_decision

__all__ = [
    "Ledger",
    "LedgerFileError",
    "MemoryLedger",
    "Outcome",
    "SqliteLedger",
    "decision_to_dict",
    "read_decision",
]
