"""How long this process's threads waited for a CPU, from Linux's scheduler statistics.

``/proc/self/task/TID/schedstat`` holds three numbers for one thread: nanoseconds it ran on a
CPU, nanoseconds it was ready to run but waited on a run queue, and how many times it was put on
a CPU (its time slices). On a host the gateway shares with engines, its event-loop thread can
spend as long waiting for a CPU as running (docs/benchmarks.md, "Waiting for a CPU"); these
readers let ``/metrics`` show it (`telemetry.metrics.GatewayMetrics.count_schedstat`).

`ThreadSchedstat` reads one thread's file when asked; `ProcessWait` adds up the wait of every
thread of the process, including threads that have exited (up to their last read). Both count
from when they were made (a counter's ``_created``) and only go up, as a Prometheus counter
must. Where the file is absent (not Linux, a kernel built
without ``CONFIG_SCHED_INFO``) or does not hold three non-negative integers, `read` gives
``None`` and the counters are not exported.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("inferplane.telemetry")

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
    fields, a field that is not a non-negative integer). Fields after the third are ignored."""
    fields = text.split()
    if len(fields) < 3:
        return None
    try:
        cpu, wait, slices = (int(f) for f in fields[:3])
    except ValueError:
        return None
    if min(cpu, wait, slices) < 0:
        return None
    return Schedstat(cpu, wait, slices)


def _read(path: str | Path) -> Schedstat | None:
    """`parse` of the file (raises OSError where it cannot be read). The os calls take a third
    of the time of ``open`` (5.5 µs against 15.6 a read here), which a scrape pays per thread."""
    fd = os.open(path, os.O_RDONLY)
    try:
        return parse(os.read(fd, 256).decode("ascii", "replace"))
    finally:
        os.close(fd)


def read(path: str | Path) -> Schedstat | None:
    """`parse` of the file at ``path``, or ``None`` where it cannot be read."""
    try:
        return _read(path)
    except OSError:
        return None


class ThreadSchedstat:
    """One thread's schedstat (``tasks/TID/schedstat``), read at each call of `sample`;
    `cpu_s`, `wait_s` and `slices` count from the first read (when it was made).

    A read that fails (the thread exited, the file went bad) or that goes down (the thread id
    was reused by a new thread) gives the last good sample again, so what is exported never goes
    down; the first such read is logged."""

    def __init__(self, tid: int, tasks: Path = TASKS) -> None:
        self.path = tasks / str(tid) / "schedstat"
        first = read(self.path)
        self.available = first is not None  # else nothing is to be exported
        self.first = self.last = first or Schedstat(0, 0, 0)
        self._warned = False
        self._lock = threading.Lock()

    def sample(self) -> Schedstat:
        """The thread's totals now (the last good ones where they cannot be read)."""
        now = read(self.path)
        with self._lock:
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
        return (self.sample().cpu_ns - self.first.cpu_ns) / 1e9

    def wait_s(self) -> float:
        return (self.sample().wait_ns - self.first.wait_ns) / 1e9

    def slices(self) -> float:
        return float(self.sample().slices - self.first.slices)


class ProcessWait:
    """The run-queue wait of every thread of this process, added up at each call of `wait_s`
    (counted from when it was made).

    Threads come and go (worker threads, the ledger's SQLite thread); one that has exited keeps
    counting what it had waited at the last read before it exited (what it waited after that
    read is lost: the kernel keeps an exited thread's wait nowhere this can read), so the total
    never goes down. A thread id reused by a new thread (its wait lower than the old thread's)
    is counted as a new thread."""

    def __init__(self, tasks: Path = TASKS) -> None:
        self.tasks = tasks
        self._prefix = os.fspath(tasks)  # joined as a str: a scrape reads every thread's file
        self._last: dict[str, int] = {}  # thread id -> wait ns at the last read
        self._gone_ns = 0  # Σ wait of threads that exited, as last read
        self._lock = threading.Lock()
        first = self._read_ns()
        self.available = first is not None
        self._base_ns = first or 0

    def _read_ns(self) -> int | None:
        """The total in ns, or ``None`` where no thread's schedstat could be read."""
        try:
            tids = os.listdir(self.tasks)
        except OSError:
            return None
        with self._lock:
            last = self._last
            seen: dict[str, int] = {}
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
            if not seen and not last:
                return None
            self._gone_ns += sum(ns for tid, ns in last.items() if tid not in seen)
            self._last = seen
            return self._gone_ns + sum(seen.values())

    def wait_s(self) -> float:
        """Seconds every thread of the process, live or exited, waited for a CPU."""
        ns = self._read_ns()
        if ns is None:  # /proc went away: the threads' totals as last read
            with self._lock:
                ns = self._gone_ns + sum(self._last.values())
        return (ns - self._base_ns) / 1e9
