"""The decision ledger: every placement decision and its measured outcome, as evidence.

`Ledger` is the protocol the gateway writes to: ``record()`` returns a `Receipt` (the record's
hash, and a wait for its commit). `MemoryLedger` keeps recent records in memory; `SqliteLedger`
(the embedded default) and `PostgresLedger` (shared by replicas) hash-chain them with signed
checkpoints (`inferplane.ledger.chain`), which `inferplane.ledger.verify` checks.
`render_decision` (in `inferplane.ledger.explain`) turns one record into a readable explanation.
"""

from inferplane.ledger.memory import MemoryLedger
from inferplane.ledger.record import Ledger, Outcome, Receipt, decision_to_dict
from inferplane.ledger.sqlite import LedgerFileError, SqliteLedger, read_decision

__all__ = [
    "Ledger",
    "LedgerFileError",
    "MemoryLedger",
    "Outcome",
    "Receipt",
    "SqliteLedger",
    "decision_to_dict",
    "read_decision",
]
