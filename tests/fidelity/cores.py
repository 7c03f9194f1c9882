"""Give the real vLLM's engine and its HTTP front end separate cores for latency measurements.

vLLM's CPU build runs three processes: the API server (HTTP, tokenising, turning outputs into
stream chunks), the ``VLLM::EngineCore`` (the scheduler) and the ``VLLM::Worker`` (the model,
its OpenMP threads bound by vLLM to the cores it picks, leaving the rest "reserved" for the
other processes). The engine core and the worker hand each step over through shared memory
and wait for each other by spinning (``sched_yield``) for a second after every message, so while
the engine runs, the engine core keeps a whole CPU busy even when it has nothing to do. Left to
float, it lands on the reserved core beside the API server and the client: on a 2-vCPU machine
the API server then falls behind and sends whole streams at once (67 of 108 streams at the end
of session 5, a "quiet" machine), which measures the scheduler, not the engine.

:func:`split_cores` moves the engine core onto the worker's cores (where its spinning only
yields to the worker) and the API server and the calling process (the client, and whatever it
starts afterwards, such as the emulator it compares against) onto the remaining ones, and puts
everything back on exit. It is what vLLM's CPU guide asks for (the model's threads on their
own cores, the serving processes on reserved ones), applied to the one process vLLM leaves
unbound. Where it cannot apply (no ``sched_setaffinity``, no worker found, or the worker bound
to every allowed CPU) it does nothing and says so.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from pathlib import Path

ENGINE_CORE = "VLLM::EngineCor"  # /proc/PID/comm keeps 15 characters
WORKER = "VLLM::Worker"


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def descendants(pid: int) -> list[int]:
    """Every live process below ``pid`` (from ``/proc/*/stat``)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(")") + 2:].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _threads(pid: int) -> list[int]:
    try:
        return [int(t) for t in os.listdir(f"/proc/{pid}/task")]
    except OSError:
        return []


def _named(pid: int, prefix: str) -> bool:
    """vLLM names its processes ``VLLM::EngineCore``, ``VLLM::Worker`` — or, in other
    versions, ``VLLM::Worker_TP0`` and the like (``comm`` keeps 15 characters)."""
    return _comm(pid).startswith(prefix)


def _pin(pid: int, cpus: set[int], saved: dict[int, tuple[set[int], dict[int, set[int]]]]) -> None:
    """Pin every thread of ``pid``; remember the process's mask and each thread's."""
    with contextlib.suppress(OSError):
        saved.setdefault(pid, (os.sched_getaffinity(pid), {}))
    if pid not in saved:
        return
    threads = saved[pid][1]
    for tid in _threads(pid):
        with contextlib.suppress(OSError):
            threads.setdefault(tid, os.sched_getaffinity(tid))
            os.sched_setaffinity(tid, cpus)


def _restore(saved: dict[int, tuple[set[int], dict[int, set[int]]]]) -> None:
    """Each thread back to its mask; a thread started while pinned (it inherited the pinned
    mask: an executor's, a tokenizer's) to its process's mask from before."""
    for pid, (mask, threads) in saved.items():
        for tid in _threads(pid):
            with contextlib.suppress(OSError):
                os.sched_setaffinity(tid, threads.get(tid, mask))


@contextlib.contextmanager
def split_cores(api_server_pid: int) -> Iterator[dict[str, list[int]]]:
    """Pin as the module docstring says; yields the layout (``{}`` when nothing was pinned)."""
    if not hasattr(os, "sched_setaffinity"):
        yield {}
        return
    below = descendants(api_server_pid)
    workers = [p for p in below if _named(p, WORKER)]
    cores = [p for p in below if _named(p, ENGINE_CORE)]
    allowed = os.sched_getaffinity(0)
    engine: set[int] = set()
    for p in workers:
        with contextlib.suppress(OSError):  # gone meanwhile
            engine |= os.sched_getaffinity(p)
    front = allowed - engine
    if not engine or not cores or not front:
        yield {}
        return
    saved: dict[int, tuple[set[int], dict[int, set[int]]]] = {}
    try:
        for p in cores:
            _pin(p, engine, saved)
        _pin(api_server_pid, front, saved)
        _pin(os.getpid(), front, saved)
        yield {"engine core + worker": sorted(engine),
               "API server + client": sorted(front)}
    finally:
        _restore(saved)


# -- whose CPU time: the test's own processes against everything else -------------------------


def _ticks_per_s() -> float:
    return float(os.sysconf("SC_CLK_TCK"))


def tree_cpu_s(pid: int) -> float:
    """CPU seconds (user + system) of ``pid`` and every live process below it, each with the
    children it has reaped (``cutime``/``cstime``), so that a process that ended during a
    measurement (an emulator, a tokenizer pool) is still counted through its parent."""
    total = 0
    for p in (pid, *descendants(pid)):
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # ended meanwhile: its parent's cutime/cstime count it once reaped
        total += sum(int(f) for f in fields[11:15])  # utime stime cutime cstime
    return total / _ticks_per_s()


def machine_cpu_s() -> float:
    """CPU seconds every CPU of the machine spent on work (user, nice, system, irq, softirq)
    or lost to the hypervisor (steal), from ``/proc/stat``."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(f) for f in fields[:8])
    return (user + nice + system + irq + softirq + steal) / _ticks_per_s()


class OtherCpu:
    """How many CPUs' worth of work ran on the machine beside ``pid``'s process tree (the
    test, the engines it started, their clients) between construction and :meth:`cpus`:
    other processes, and time the hypervisor stole. Unlike the load average it does not
    count the test's own work (the real vLLM's engine core alone keeps one runnable thread
    spinning), so it can be held to a limit far below the test's own load. ``None`` where
    ``/proc`` cannot be read."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self._start = self._read()

    def _read(self) -> tuple[float, float, float] | None:
        try:
            return time.monotonic(), machine_cpu_s(), tree_cpu_s(self.pid)
        except (OSError, ValueError, IndexError):
            return None

    def cpus(self) -> float | None:
        end = self._read()
        if end is None or self._start is None or end[0] <= self._start[0]:
            return None
        (t0, m0, own0), (t1, m1, own1) = self._start, end
        return max(0.0, (m1 - m0) - (own1 - own0)) / (t1 - t0)
