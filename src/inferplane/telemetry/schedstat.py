"""How long this process's threads waited for a CPU, from Linux's scheduler statistics.

A thread's ``schedstat`` file (``/proc/thread-self/schedstat``, ``/proc/self/task/TID/schedstat``)
holds three numbers: nanoseconds it ran on a CPU, nanoseconds it was ready to run but waited on
a run queue (the kernel's ``run_delay``), and how many times it was put on a CPU (its time
slices). On a host the gateway shares with engines, its event-loop thread can spend as long
waiting for a CPU as running (docs/benchmarks.md, "Waiting for a CPU"); these readers let
``/metrics`` show it (`telemetry.metrics.GatewayMetrics.count_schedstat`).

`ThreadSchedstat` holds one thread's file open and re-reads it when asked; `ProcessWait` adds
up the wait of every thread of the process, including threads that have exited (up to their
last read). Both count from when they were made (a counter's ``_created``) and only go up, as a
Prometheus counter must. Where the file is absent (not Linux, a kernel built without
``CONFIG_SCHED_INFO``), does not hold three integers, or is a kernel's stub ``0 0 0`` (no
schedstat collected), they are not available and the counters are not exported.
"""

from __future__ import annotations

import logging
import os
import threading
import weakref
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("inferplane.telemetry")

THREAD_SELF = Path("/proc/thread-self/schedstat")
"""The schedstat of the thread that opens it (Linux 3.17 and later). An fd opened there stays
bound to that thread, not to its id: re-reading it from any thread gives that thread's totals,
and once the thread has exited the read fails (ESRCH)."""

TASKS = Path("/proc/self/task")
"""Where this process's threads are listed (one directory per thread id)."""


@dataclass(frozen=True, slots=True)
class Schedstat:
    """One thread's totals since it started."""

    cpu_ns: int  # on a CPU
    wait_ns: int  # ready to run, waiting on a run queue
    slices: int  # times put on a CPU


def parse(text: str) -> Schedstat | None:
    """The three leading numbers of a schedstat file; ``None`` for anything else (fewer
    fields, a field that is not an integer as the kernel prints one: ASCII digits only, so no
    sign, ``_`` or decimal point). Fields after the third are ignored."""
    fields = text.split()[:3]
    if len(fields) < 3 or not all(f.isascii() and f.isdigit() for f in fields):
        return None
    cpu, wait, slices = (int(f) for f in fields)
    return Schedstat(cpu, wait, slices)


def _read(path: str | Path) -> Schedstat | None:
    """`parse` of the file (raises OSError where it cannot be read). The os calls take a third
    of the time of ``open`` (5.5 µs against 15.6 a read here), which a scrape pays per thread."""
    fd = os.open(path, os.O_RDONLY)
    try:
        return parse(os.read(fd, 256).decode("ascii", "replace"))
    finally:
        os.close(fd)


class ThreadSchedstat:
    """One thread's schedstat, held open from when this is made and re-read (``pread``) at each
    `sample`; `cpu_s`, `wait_s` and `slices` give the last sample counted from the first read
    (when this was made), without reading.

    Made with the default path, on the thread to follow (`THREAD_SELF`), it follows that thread
    and no other, whatever becomes of its id. A read that fails (the thread exited: ESRCH; or
    after `close`), that does not parse, or that goes down gives the last good sample again, so
    what is exported never goes down; the first such read is logged. After the thread has
    exited, its counters stay at their last values (the gateway's loop thread outlives its
    ``/metrics``; an embedder's loop that ends leaves its totals as last read, not absent).

    Not available (nothing to export, the file closed at once) where the file cannot be opened
    or read, or where the first read shows no time slices: the thread reading its own file is
    running, so a kernel that collects schedstat shows at least one; older kernels without it
    print ``0 0 0``."""

    def __init__(self, path: str | Path = THREAD_SELF) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._warned = False
        self._fd: int | None = None
        first: Schedstat | None = None
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            fd = None
        if fd is not None:
            self._fd = fd
            self._close = weakref.finalize(self, os.close, fd)
            first = self._pread()
        self.available = first is not None and first.slices > 0  # else nothing to export
        if not self.available:
            self.close()
        self.first = self.last = first or Schedstat(0, 0, 0)

    def _pread(self) -> Schedstat | None:
        if self._fd is None:
            return None
        try:
            return parse(os.pread(self._fd, 256, 0).decode("ascii", "replace"))
        except OSError:
            return None

    def close(self) -> None:
        """Close the file; later samples give the last one."""
        with self._lock:
            if self._fd is not None:
                self._fd = None
                self._close()

    def sample(self) -> Schedstat:
        """Read the thread's totals now (the last good ones where they cannot be read)."""
        with self._lock:
            now = self._pread()
            last = self.last
            if now is None or now.cpu_ns < last.cpu_ns or now.wait_ns < last.wait_ns \
                    or now.slices < last.slices:
                if not self._warned:
                    self._warned = True
                    log.debug("%s no longer reads as it did (the thread ended?): its counters "
                              "stay at their last values", self.path)
                return last
            self.last = now
            return now

    def cpu_s(self) -> float:
        return (self.last.cpu_ns - self.first.cpu_ns) / 1e9

    def wait_s(self) -> float:
        return (self.last.wait_ns - self.first.wait_ns) / 1e9

    def slices(self) -> float:
        return float(self.last.slices - self.first.slices)


class ProcessWait:
    """The run-queue wait of every thread of this process, added up at each call of `wait_s`
    (counted from when it was made).

    Threads come and go (worker threads, the ledger's SQLite thread); one that has exited keeps
    counting what it had waited at the last read before it exited (what it waited after that
    read is lost: the kernel keeps an exited thread's wait nowhere this can read), so the total
    never goes down. A thread id reused by a new thread is counted as a new thread when its
    wait reads lower than the old thread's at the last read (one that has already waited more
    is taken for the old thread: this reads by id).

    Not available where no thread's file can be read, or where every one reads no time slices
    (the kernel's stub ``0 0 0``, as `ThreadSchedstat`)."""

    def __init__(self, tasks: Path = TASKS) -> None:
        self.tasks = tasks
        self._prefix = os.fspath(tasks)  # joined as a str: a scrape reads every thread's file
        self._last: dict[str, int] = {}  # thread id -> wait ns at the last read
        self._gone_ns = 0  # Σ wait of threads that exited, as last read
        self._lock = threading.Lock()
        first = self._read_ns()
        self.available = first is not None and first[1] > 0
        self._base_ns = first[0] if first is not None else 0

    def _read_ns(self) -> tuple[int, int] | None:
        """The total wait in ns, and the time slices of the threads read this time; ``None``
        where no thread's schedstat could be read."""
        try:
            tids = os.listdir(self.tasks)
        except OSError:
            return None
        with self._lock:
            last = self._last
            seen: dict[str, int] = {}
            slices = 0
            for tid in tids:
                try:
                    s = _read(f"{self._prefix}/{tid}/schedstat")
                except (FileNotFoundError, ProcessLookupError):  # it exited since listdir
                    continue
                except OSError:  # unreadable for another reason: as it was
                    s = None
                if s is None:
                    if tid in last:
                        seen[tid] = last[tid]
                    continue
                before = last.get(tid)
                if before is not None and s.wait_ns < before:  # a new thread, same id
                    self._gone_ns += before
                seen[tid] = s.wait_ns
                slices += s.slices
            if not seen and not last:
                return None
            self._gone_ns += sum(ns for tid, ns in last.items() if tid not in seen)
            self._last = seen
            return self._gone_ns + sum(seen.values()), slices

    def wait_s(self) -> float:
        """Seconds every thread of the process, live or exited, waited for a CPU."""
        read = self._read_ns()
        if read is None:  # /proc went away: the threads' totals as last read
            with self._lock:
                ns = self._gone_ns + sum(self._last.values())
        else:
            ns = read[0]
        return (ns - self._base_ns) / 1e9
