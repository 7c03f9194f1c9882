"""Files a fleet file names for the gateway to write (the SQLite ledger, the batch store): what
`serve` checks before it opens one, and `inferplane check` without opening it."""

from __future__ import annotations

import os
from pathlib import Path


def writable_file_problem(path: str | Path) -> str | None:
    """Why the gateway could not create or write the file ``path`` (its directory missing, the
    path a directory, no write permission), or None. Nothing is created."""
    p = Path(path)
    parent = p.parent
    if not parent.is_dir():
        return f"the directory {str(parent)!r} does not exist"
    if p.exists() and not p.is_file():
        return "exists and is not a file"
    if not os.access(parent, os.W_OK) or (p.exists() and not os.access(p, os.W_OK)):
        return "not writable"
    return None
