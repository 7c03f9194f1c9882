"""The batch worker: drives every active batch, and runs lines on spare capacity only.

Each round (on a wake-up, or every ``batch.poll_interval_s`` while a batch is active or a line
runs here, every ``batch.idle_poll_interval_s`` otherwise):

- ``validating`` → the input file is re-read and checked against the batch's ``endpoint``; the
  lines are stored and the batch moves to ``in_progress`` in one transaction (or to ``failed``
  with ``errors``);
- ``in_progress`` → lines not yet done are fed, oldest batch first, up to
  ``batch.max_concurrency`` in flight over all batches. A line is dispatched only while
  **(a)** no interactive request waits in the admission queue (any band above ``batch``) and
  **(b)** its pool's utilisation — gateway in-flight (plus lines about to be placed) ÷ Σ
  ``max_concurrency`` of the usable endpoints that serve its model — is below
  ``batch.max_utilisation``. Otherwise the worker waits for the next round: batch work never
  displaces interactive work; placement of a line uses the batch class's placement profile;
- all lines done → output and error files are written and the batch is ``completed``;
- ``cancelling`` (or past ``expires_at``) → nothing new is fed; once its lines in flight have
  ended, the files are written from the lines done and the batch is ``cancelled`` (``expired``,
  whose never-run lines go to the error file with code ``batch_expired``).

Several processes may drive the same batches (replicas sharing PostgreSQL, the workers of
`serve --workers N` sharing one SQLite file): a line is run only by the process that claimed it
(`BatchStore.claim_lines`, with a lease of ``batch.lease_s`` renewed every third of it while the
line runs), and its result and ``done`` mark are written together, once, while the claim holds
(`BatchStore.finish_line`). A line claimed but not started (no spare capacity, refused for
capacity) is given back at once; the lines a process holds when it stops are given back; those
of a process killed with -9 are taken over by another once their leases expire. A cancelled or
expired batch is finished once no line of it holds a live claim.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable
from typing import Any

from inferplane.admission.queue import PoolKey
from inferplane.batch import runner
from inferplane.batch.jsonl import parse_input
from inferplane.batch.store import BatchStore, Line
from inferplane.config.schema import BatchSpec, TenantSpec
from inferplane.core.plane import Core
from inferplane.dispatch.upstream import Dispatcher
from inferplane.errors import GatewayError
from inferplane.waits import wait_woken

log = logging.getLogger("inferplane.batch")


def new_id(prefix: str) -> str:
    return prefix + os.urandom(12).hex()


class BatchWorker:
    """One per gateway process; `start` resumes every batch the store still holds as active."""

    def __init__(self, gw: Core, dispatcher: Dispatcher, store: BatchStore, spec: BatchSpec,
                 clock: Callable[[], float] = time.time) -> None:
        self.gw = gw
        self.dispatcher = dispatcher  # the batch lane calls the engines itself
        self.store = store
        self.spec = spec
        self.clock = clock
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._lines: dict[asyncio.Task[None], Line] = {}
        self._inflight: dict[str, set[int]] = {}  # batch id → line numbers in flight
        self._launching: dict[PoolKey, int] = {}  # passed the gate, not yet placed
        self._not_before: dict[tuple[str, int], float] = {}  # lines refused for capacity
        self._renewer: asyncio.Task[None] | None = None
        self.gated = 0  # rounds in which a line waited for spare capacity (tests, metrics)
        self.dropped = 0  # results not written: the line was taken over (its lease expired)

    # -- lifecycle ------------------------------------------------------------------------
    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="inferplane-batch-worker")
        self._renewer = asyncio.create_task(self._renew(), name="inferplane-batch-leases")

    async def stop(self) -> None:
        """Stop feeding and running lines, and give back every claim this process holds (the
        other processes take them over at once)."""
        started = self._task is not None
        tasks = [*self._lines, *(t for t in (self._task, self._renewer) if t is not None)]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if started:
            try:
                await self.store.release()
            except Exception as exc:  # the leases then expire on their own
                log.warning("could not give back this process's batch line claims: %s", exc)

    async def _renew(self) -> None:
        """Renew the leases of the lines in flight every ``batch.lease_s / 3``."""
        while True:
            await asyncio.sleep(self.spec.lease_s / 3.0)
            if not self._lines:
                continue
            try:
                await self.store.renew(self.spec.lease_s)
            except Exception as exc:  # retried next period; past the lease others take over
                log.warning("renewing batch line leases failed: %s", exc)

    def wake(self) -> None:
        self._wake.set()

    async def _run(self) -> None:
        try:
            for owner in await self.store.release_dead():
                log.info("batch lines claimed by %s (a process of this host that is gone) "
                         "given back", owner)
        except Exception as exc:  # their leases expire on their own
            log.warning("could not check for dead batch line owners: %s", exc)
        while True:
            active = True
            try:
                active = await self.round()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("batch worker round failed")
            wait = self.spec.poll_interval_s
            if not active and not self._lines:
                wait = max(wait, self.spec.idle_poll_interval_s)
            await wait_woken(self._wake, wait)
            self._wake.clear()

    # -- one round ------------------------------------------------------------------------
    async def round(self) -> bool:
        """Drive every active batch once; return whether there was any."""
        now = int(self.clock())
        batches = await self.store.active_batches()
        for b in batches:
            bid, status = b["id"], b["status"]
            if status == "validating":
                await self._validate(b, now)
            elif status == "in_progress" and now >= b["expires_at"]:
                await self._settle(bid, "expired", now)
            elif status in ("cancelling", "finalizing"):
                await self._settle(bid, "cancelled" if status == "cancelling" else "completed",
                                   now)
            elif status == "in_progress":
                waiting = await self._feed(b)
                if not waiting and not self._inflight.get(bid) and not (
                    await self.store.open_lines(bid)
                ):
                    await self.store.set_status(bid, "finalizing", now, only_from=("in_progress",))
                    await self._settle(bid, "completed", now)
        return bool(batches)

    async def _validate(self, b: dict[str, Any], now: int) -> None:
        content = await self.store.file_content(b["input_file_id"], b["_tenant"])
        errors: list[dict[str, Any]] = []
        lines = []
        if content is None:
            errors.append({"code": "file_not_found", "message": "the input file is gone",
                           "param": "input_file_id", "line": None})
        else:
            try:
                lines = parse_input(content, 1 << 62)
            except GatewayError as exc:
                errors.append({"code": "invalid_file", "message": exc.message,
                               "param": "input_file_id", "line": None})
            for ln in lines:
                if ln.url != b["endpoint"]:
                    errors.append({
                        "code": "mismatched_endpoint",
                        "message": f"line {ln.line_no}: url {ln.url!r} differs from the "
                        f"batch's endpoint {b['endpoint']!r}",
                        "param": "url", "line": ln.line_no,
                    })
        if errors:
            await self.store.fail_batch(b["id"], errors[:100], now)
            return
        await self.store.start_batch(
            b["id"], [(ln.line_no, ln.custom_id, ln.url, ln.body) for ln in lines], now
        )

    async def _settle(self, bid: str, status: str, now: int) -> None:
        """Finish a batch once none of its lines is in flight here or claimed elsewhere."""
        if self._inflight.get(bid) or await self.store.live_claims(bid):
            return
        leftover = None
        if status == "expired":
            def leftover(n: int, cid: str) -> bytes:
                return runner.result_line(
                    cid, error=("batch_expired", "the batch expired before this request ran")
                )
        await self.store.finalize(bid, status, now, (new_id("file-"), new_id("file-")),
                                  leftover)

    async def _feed(self, b: dict[str, Any]) -> bool:
        """Start lines of one batch while capacity allows; True when some line waits."""
        bid = b["id"]
        room = self.spec.max_concurrency - len(self._lines)
        if room <= 0:
            return True
        inflight = self._inflight.setdefault(bid, set())
        claimed = await self.store.claim_lines(bid, room, self.spec.lease_s)
        unused = [ln for ln in claimed if ln.line_no not in inflight]
        try:
            return await self._start_lines(b, unused, inflight)
        finally:
            if unused:  # claimed, not started: given back for any process to take
                await self.store.release(unused)

    async def _start_lines(self, b: dict[str, Any], lines: list[Line], inflight: set[int]
                           ) -> bool:
        """Start the claimed ``lines`` while capacity allows, removing each started (or
        recorded) one from ``lines``; True when some line waits."""
        bid = b["id"]
        # read at each round: a fleet reload may change the tenants
        tenant = next((t for t in self.gw.config.tenants if t.name == b["_tenant"]), None)
        now = time.monotonic()
        waiting = bool(lines)
        for line in list(lines):
            if self._not_before.get((bid, line.line_no), 0.0) > now:
                continue
            lines.remove(line)
            if tenant is None:
                await self._record(line, False, runner.result_line(
                    line.custom_id, error=("tenant_not_found",
                                           f"tenant {b['_tenant']!r} is no longer configured")))
                continue
            try:
                prepared = runner.prepare(self.gw, tenant, self.spec.workload_class, line.url,
                                          line.body)
            except GatewayError as exc:
                await self._record(line, False, runner.result_line(
                    line.custom_id, error=(exc.code or exc.error_type, exc.message)))
                continue
            if not self.spare(prepared.pool):
                self.gated += 1
                lines.append(line)
                return True
            self._launching[prepared.pool] = self._launching.get(prepared.pool, 0) + 1
            inflight.add(line.line_no)
            task = asyncio.create_task(self._line(b, tenant, line, prepared))
            self._lines[task] = line
            task.add_done_callback(self._line_done)
        return waiting

    def spare(self, pool: PoolKey) -> bool:
        """Spare capacity for one more batch line on ``pool``: no interactive request queued,
        and the pool's utilisation with the line at most ``batch.max_utilisation`` (or the pool
        idle, so that a small pool still makes progress): `Admission.batch_spare`."""
        return self.gw.admission.batch_spare(
            pool, self._launching.get(pool, 0), self.spec.max_utilisation
        )

    async def _line(self, b: dict[str, Any], tenant: TenantSpec, line: Line,
                    p: runner.Prepared) -> None:
        launching = True

        def admitted() -> None:  # from here on the line counts in the pool's in-flight
            nonlocal launching
            if launching:
                launching = False
                self._launching[p.pool] -= 1

        try:
            try:
                ok, result = await runner.execute(
                    self.gw, self.dispatcher, tenant, b["_key_hash"], self.spec.workload_class,
                    line.url, line.custom_id, p, self.spec.retry_after_s, admitted)
            except runner.Retry as r:
                self._not_before[(line.batch_id, line.line_no)] = time.monotonic() + r.after_s
                await self.store.release([line])  # any process may run it when there is room
                return
            self._not_before.pop((line.batch_id, line.line_no), None)
            await self._record(line, ok, result)  # before the line stops counting in flight
        finally:
            admitted()
            self._inflight.get(line.batch_id, set()).discard(line.line_no)
            self.wake()

    async def _record(self, line: Line, ok: bool, result: bytes) -> None:
        if not await self.store.finish_line(line.batch_id, line.line_no, ok, result):
            self.dropped += 1
            log.warning("batch %s line %d is no longer claimed by this process (its lease "
                        "expired and another took it over, or the batch ended); result dropped",
                        line.batch_id, line.line_no)

    def _line_done(self, task: asyncio.Task[None]) -> None:
        self._lines.pop(task, None)
        if not task.cancelled() and task.exception() is not None:
            log.error("batch line failed: %s", task.exception())

