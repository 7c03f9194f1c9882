"""Which process of `inferplane serve --workers N` this is (see `api.workers`)."""

from __future__ import annotations

import os

WORKER_ENV = "INFERPLANE_WORKER"
"""Set in each worker to its index (0 … N-1)."""

WORKERS_ENV = "INFERPLANE_WORKERS"
"""Set in each worker to N, the number of workers its supervisor runs."""

WORKER_DIR_ENV = "INFERPLANE_WORKER_DIR"
"""Set in each worker to its supervisor's private directory (mode 0700), where every worker
serves its own metrics page on a Unix socket (`telemetry.gather`)."""


def worker_index() -> int | None:
    """This process's worker index under `serve --workers`, or None when not a worker."""
    v = os.environ.get(WORKER_ENV)
    return int(v) if v is not None and v.isdigit() else None


def worker_set() -> tuple[int, int, str] | None:
    """(this worker's index, N, the supervisor's directory) under `serve --workers N`, or None
    when this process is not such a worker (a single-process `serve`, an embedder, a test)."""
    index = worker_index()
    n = os.environ.get(WORKERS_ENV, "")
    directory = os.environ.get(WORKER_DIR_ENV)
    if index is None or not n.isdigit() or not directory or not 0 <= index < int(n):
        return None
    return index, int(n), directory
