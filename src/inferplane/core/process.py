"""Which process of `inferplane serve --workers N` this is (see `api.workers`)."""

from __future__ import annotations

import os

WORKER_ENV = "INFERPLANE_WORKER"
"""Set in each worker to its index (0 … N-1)."""


def worker_index() -> int | None:
    """This process's worker index under `serve --workers`, or None when not a worker."""
    v = os.environ.get(WORKER_ENV)
    return int(v) if v is not None and v.isdigit() else None
