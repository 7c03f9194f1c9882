"""Batch-lane state: uploaded files, batches and per-line progress, behind one interface.

`SqliteBatchStore` (`batch.sqlite_store`, the embedded default: one file, or memory) and
`PostgresBatchStore` (`batch.postgres_store`, ``batch.postgres_dsn``: shared by replicas) keep
the same three kinds of rows — files, batches, lines — and give the same guarantees:

**Lines are claimed with leases, so two processes never run the same line.** A process claims
lines it is about to run (`claim_lines`): each claimed line gets the process's ``owner`` id and
a lease expiry; a line is claimable while it is not done and unowned, or its lease has expired.
The claim is one atomic statement (PostgreSQL: ``UPDATE … WHERE (batch_id, line_no) IN (SELECT
… FOR UPDATE SKIP LOCKED) RETURNING …``; SQLite: inside ``BEGIN IMMEDIATE``, which every process
sharing the file serialises on). While a line runs its owner renews the lease (`renew`, every
``batch.lease_s / 3``); a line that is not run after all is given back (`release`). A process
killed with -9 stops renewing: its lines become claimable once their leases expire, and another
process takes them over.

**A line's result is written once.** `finish_line` writes the result and marks the line done in
one statement that also requires the line still to be claimed by the caller (``owner``) and its
batch still to be active: a process whose lease expired and whose line was taken over drops
its result (the line's upstream may then have run twice — at-least-once execution — but its
result is recorded exactly once). Finishing a batch writes its output and error files from the
done lines and its final status in one transaction (serialised with `finish_line` on the batch
row), so the output file holds every done line exactly once, and a restart either sees the
finished batch or re-runs the finish. A cancelled or expired batch is finished only once no
line of it holds a live claim (`live_claims`), so no result arrives after its files are written.
"""

from __future__ import annotations

import hashlib
import os
import socket
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, BinaryIO

import orjson

ACTIVE = ("validating", "in_progress", "finalizing", "cancelling")
"""Statuses the worker still has to drive; every other status is final."""

TIMESTAMPS = {
    "in_progress": "in_progress_at",
    "finalizing": "finalizing_at",
    "completed": "completed_at",
    "failed": "failed_at",
    "expired": "expired_at",
    "cancelling": "cancelling_at",
    "cancelled": "cancelled_at",
}


@dataclass(frozen=True, slots=True)
class Line:
    """One request of a batch, as stored."""

    batch_id: str
    line_no: int
    custom_id: str
    url: str
    body: bytes


@dataclass(frozen=True, slots=True)
class Counts:
    total: int
    completed: int
    failed: int


def pid_scope() -> str:
    """Where this process's pid means something: a digest of the kernel's boot id and this
    process's PID namespace ("" when either cannot be read: no pid can then be trusted). Two
    containers on one host — even with the same hostname (``hostNetwork``, a fixed compose
    ``hostname:``) — have different PID namespaces; a reboot changes the boot id."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as fh:
            boot = fh.read().strip()
        ns = os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""
    return hashlib.sha256(f"{boot}/{ns}".encode()).hexdigest()[:12]


def new_owner() -> str:
    """A claim owner id for this process: host, pid scope (`pid_scope`), pid and a random part
    (a restarted process, or a reused pid, is a new owner)."""
    return f"{socket.gethostname()}:{pid_scope()}:{os.getpid()}:{os.urandom(4).hex()}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # runs, as another user
        return True
    return True


class BatchStore(ABC):
    """Files, batches and lines (see the module docstring). ``owner`` is this process's claim
    id."""

    owner: str
    shared: bool
    """Whether other processes can reach the same rows (a file or a database, not memory)."""

    @abstractmethod
    async def start(self) -> None: ...

    @abstractmethod
    async def close(self) -> None: ...

    # -- files
    @abstractmethod
    async def add_file(
        self, fid: str, tenant: str, purpose: str, filename: str, content: bytes, now: int
    ) -> dict[str, Any]: ...

    @abstractmethod
    async def add_file_from(
        self, fid: str, tenant: str, purpose: str, filename: str, src: BinaryIO, size: int,
        now: int,
    ) -> dict[str, Any]:
        """`add_file` from an open file, copied in chunks (never whole in memory)."""

    @abstractmethod
    async def get_file(self, fid: str, tenant: str) -> dict[str, Any] | None: ...

    @abstractmethod
    async def file_content(self, fid: str, tenant: str) -> bytes | None: ...

    # -- batches
    @abstractmethod
    async def add_batch(self, b: dict[str, Any], key_hash: str, tenant: str) -> None: ...

    @abstractmethod
    async def get_batch(self, bid: str, tenant: str | None = None) -> dict[str, Any] | None:
        """The batch in OpenAI's shape (plus ``_tenant`` and ``_key_hash``), or None."""

    @abstractmethod
    async def list_batches(
        self, tenant: str, limit: int, after: str | None
    ) -> tuple[list[dict[str, Any]], bool]:
        """The tenant's batches, newest first, after the batch ``after``; and whether more."""

    @abstractmethod
    async def active_batches(self) -> list[dict[str, Any]]:
        """Batches the worker still drives, oldest first (request counts not read: zeros)."""

    @abstractmethod
    async def set_status(
        self, bid: str, status: str, now: int, *, only_from: Sequence[str] = ()
    ) -> bool:
        """Move a batch to ``status`` (stamping its timestamp); with ``only_from``, only from one
        of those statuses. True when it moved."""

    @abstractmethod
    async def start_batch(
        self, bid: str, lines: list[tuple[int, str, str, bytes]], now: int
    ) -> None:
        """validating → in_progress with its lines, in one transaction (a re-run, or another
        process doing the same, changes nothing once the batch is no longer validating)."""

    @abstractmethod
    async def fail_batch(self, bid: str, errors: list[dict[str, Any]], now: int) -> None: ...

    # -- lines
    @abstractmethod
    async def claim_lines(self, bid: str, limit: int, lease_s: float) -> list[Line]:
        """Claim up to ``limit`` claimable lines of the batch, lowest line numbers first, for
        ``lease_s`` seconds."""

    @abstractmethod
    async def renew(self, lease_s: float) -> int:
        """Extend the lease of every line this process still holds; how many."""

    @abstractmethod
    async def release(self, lines: Sequence[Line] = ()) -> None:
        """Give back claims of lines not run (every line this process holds when empty)."""

    @abstractmethod
    async def owners(self) -> list[str]:
        """Owners holding claims on lines not done (their leases live or expired)."""

    @abstractmethod
    async def release_owner(self, owner: str) -> int:
        """Give back every claim of ``owner`` on lines not done (a process known to be dead);
        how many."""

    async def release_dead(self) -> list[str]:
        """Give back the claims of predecessors that are provably gone — a process of this
        host killed with -9 and restarted: same host, same boot and PID namespace (`pid_scope`,
        in the owner id), and its pid no longer runs or is this process's own pid under another
        owner id — so their lines run again at once instead of after their leases. Every other
        owner keeps its claims until their leases expire: other hosts, another PID namespace
        under the same hostname (another replica, whose pid means nothing here; a container
        restarted into a new namespace), an owner id without a scope, a pid that runs."""
        host, scope = socket.gethostname(), pid_scope()
        gone = []
        for owner in await self.owners():
            parts = owner.split(":")
            if owner == self.owner or not scope or len(parts) != 4:
                continue
            o_host, o_scope, pid, _ = parts
            if o_host != host or o_scope != scope or not pid.isdigit():
                continue
            if int(pid) == os.getpid() or not _alive(int(pid)):
                await self.release_owner(owner)
                gone.append(owner)
        return gone

    @abstractmethod
    async def open_lines(self, bid: str) -> int:
        """Lines of the batch not done yet (claimed or not)."""

    @abstractmethod
    async def live_claims(self, bid: str) -> int:
        """Lines of the batch not done and claimed under a lease that has not expired."""

    @abstractmethod
    async def finish_line(self, bid: str, line_no: int, ok: bool, result: bytes) -> bool:
        """Record a line's result and mark it done, once, while this process's claim holds and
        the batch is active; False (nothing written) otherwise."""

    @abstractmethod
    async def finalize(
        self,
        bid: str,
        status: str,
        now: int,
        file_ids: tuple[str, str],
        leftover: Callable[[int, str], bytes] | None = None,
    ) -> None:
        """Write the output and error files from the done lines (plus ``leftover(line_no,
        custom_id)`` error lines for lines never done, when given) and set the final status, in
        one transaction. A file with no lines is not created (its id stays null)."""


def dumps(v: Any) -> str | None:
    return None if v is None else orjson.dumps(v).decode()


def file_object(fid: str, purpose: str, filename: str, size: int, created: int) -> dict[str, Any]:
    """A file in OpenAI's shape."""
    return {
        "id": fid,
        "object": "file",
        "bytes": size,
        "created_at": created,
        "filename": filename,
        "purpose": purpose,
        "status": "processed",
    }


def batch_object(r: Mapping[str, Any], n: Counts) -> dict[str, Any]:
    """A batch row (column name → value) in OpenAI's shape, with its request counts."""
    return {
        "id": r["id"],
        "object": "batch",
        "endpoint": r["endpoint"],
        "errors": orjson.loads(r["errors"]) if r["errors"] else None,
        "input_file_id": r["input_file_id"],
        "completion_window": r["completion_window"],
        "status": r["status"],
        "output_file_id": r["output_file_id"],
        "error_file_id": r["error_file_id"],
        "created_at": r["created_at"],
        "in_progress_at": r["in_progress_at"],
        "expires_at": r["expires_at"],
        "finalizing_at": r["finalizing_at"],
        "completed_at": r["completed_at"],
        "failed_at": r["failed_at"],
        "expired_at": r["expired_at"],
        "cancelling_at": r["cancelling_at"],
        "cancelled_at": r["cancelled_at"],
        "request_counts": {"total": n.total, "completed": n.completed, "failed": n.failed},
        "metadata": orjson.loads(r["metadata"]) if r["metadata"] else None,
        "_tenant": r["tenant"],
        "_key_hash": r["key_hash"],
    }


def public(batch: dict[str, Any]) -> dict[str, Any]:
    """The batch without the store's private fields."""
    return {k: v for k, v in batch.items() if not k.startswith("_")}
