"""Child processes of the peer benchmark: started in their own process group, always stopped.

Every process the harness starts is a :class:`Proc`: its own session (so its whole tree is one
process group), stdout and stderr in a log file, and a module-level registry so that
:func:`stop_all` (called from ``finally``, ``atexit`` and the SIGINT/SIGTERM handler) ends every
one of them by process group, never by name.

Resource use of a router is read from ``/proc``: :func:`tree_pids` walks the children of a PID,
:class:`TreeSampler` adds up user+system CPU time and RSS over the tree and keeps the peak, and
the time its threads were ready to run but waited for a CPU (``schedstat``'s run-queue wait).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

PEER_ENV: dict[str, str] = {
    "HF_HUB_OFFLINE": "1",
    "HF_ENDPOINT": "http://127.0.0.1:9",
    "LITELLM_LOCAL_MODEL_COST_MAP": "True",
    "TRANSFORMERS_OFFLINE": "1",
    "NO_PROXY": "127.0.0.1,localhost",
    "no_proxy": "127.0.0.1,localhost",
}
"""Set for every process the harness starts: nothing may reach beyond loopback."""

_CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
_RUNNING: list[Proc] = []


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def free_ports(n: int) -> list[int]:
    """``n`` distinct free ports (all held open at once while they are picked)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()


def child_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of a peer process: ours, loopback-only settings, then ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
    env.update(PEER_ENV)
    env.update(extra or {})
    return env


def log_tail(path: Path, n: int = 2000) -> str:
    """The last ``n`` bytes of the file ``path`` as text; "" when it cannot be read."""
    with contextlib.suppress(OSError):
        return path.read_bytes()[-n:].decode("utf-8", "replace")
    return ""


def wait_up(url: str, p: subprocess.Popen[bytes] | None, what: str, *, path: str = "/health",
            timeout_s: float = 60.0, interval_s: float = 0.2, log: Path | None = None,
            ok: Collection[int] = (200,), started_at: float | None = None,
            timeout_error: type[Exception] = RuntimeError) -> None:
    """Poll ``url + path`` until it answers one of ``ok`` (at least once, however short
    ``timeout_s``). Raises a RuntimeError naming ``what``, with the tail of ``log`` when given,
    when the process ``p`` exits first; ``timeout_error`` (the same text) when ``timeout_s`` has
    passed since ``started_at`` (a `time.monotonic` reading; now when None), so that waits on
    several processes can share one deadline and still report the whole wait."""

    def tail() -> str:
        text = log_tail(log, 3000) if log is not None else ""
        return f":\n{text}" if text else ""

    start = time.monotonic() if started_at is None else started_at
    deadline = start + timeout_s
    while True:
        if p is not None and p.poll() is not None:
            raise RuntimeError(f"{what} exited with {p.returncode}{tail()}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url + path, timeout=1).status_code in ok:
                return
        if time.monotonic() > deadline:
            raise timeout_error(f"{what} not up after {time.monotonic() - start:.0f}s{tail()}")
        time.sleep(interval_s)


def _start_priority(nice: int, rt: int, cpus: Sequence[int] = ()) -> None:
    """In a child before exec: niceness ``nice``; with ``rt`` > 0, the real-time round-robin
    policy at that priority; with ``cpus``, only those CPUs (every thread and process the
    child starts inherits all three)."""
    if nice:
        os.nice(nice)
    if rt:
        os.sched_setscheduler(0, os.SCHED_RR, os.sched_param(rt))
    if cpus:
        os.sched_setaffinity(0, cpus)


# -- CPU affinity --------------------------------------------------------------------------

ROUTER_CPUS_ENV = "PEERS_ROUTER_CPUS"
"""A CPU list (``0``, ``0,2``, ``0-1``): every :class:`Proc` starts on those CPUs only
(real_engines.py's and run.py's ``--router-cpus``)."""


def cpu_ns(pid: int) -> int:
    """Nanoseconds every thread of process ``pid`` has run on a CPU (schedstat's first field)."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):  # a thread that ended meanwhile
            total += int((task / "schedstat").read_text().split()[0])
    return total

ANY_CPU = range(1 << 16)
"""`parse_cpu_list`'s ``allowed`` for a list of the host's CPUs or of a recorded run's, not
necessarily ones this process may run on (``/sys/devices/system/cpu/online``, a thread's
``Cpus_allowed_list``, a results file's layout)."""


def parse_cpu_list(spec: str, allowed: Sequence[int] | set[int] | None = None) -> list[int]:
    """The CPUs of a list like ``1``, ``0,2`` or ``0-1,3`` (sorted, without repeats); a
    ValueError that says why when it is malformed, empty, or names a CPU outside ``allowed``
    (default: the CPUs this process may run on, ``os.sched_getaffinity(0)``; `ANY_CPU`: any)."""
    ok = set(os.sched_getaffinity(0) if allowed is None else allowed)
    top = max(ok, default=-1)
    out: set[int] = set()
    for part in spec.replace(" ", "").split(","):
        lo, sep, hi = part.partition("-")
        try:
            first = int(lo)
            last = int(hi) if sep else first
        except ValueError:
            raise ValueError(f"{spec!r} is not a CPU list (like 1, 0,2 or 0-1)") from None
        if first < 0 or last < first:
            raise ValueError(f"{spec!r}: {part!r} is not a CPU or an increasing range")
        if last > top:  # before expanding: a typo like 0-4000000000 is an error, not a hang
            raise ValueError(f"{spec!r}: CPU {last} is not one this process may run on "
                             f"({format_cpu_list(sorted(ok))})")
        out.update(range(first, last + 1))
    outside = sorted(out - ok)
    if outside:
        raise ValueError(f"{spec!r}: CPU {format_cpu_list(outside)} is not one this process "
                         f"may run on ({format_cpu_list(sorted(ok))})")
    return sorted(out)


def format_cpu_list(cpus: Sequence[int]) -> str:
    """``[0, 1, 2, 5]`` as ``0-2,5`` (the kernel's ``Cpus_allowed_list`` form)."""
    parts: list[str] = []
    xs = sorted(set(cpus))
    i = 0
    while i < len(xs):
        j = i
        while j + 1 < len(xs) and xs[j + 1] == xs[j] + 1:
            j += 1
        parts.append(str(xs[i]) if i == j else f"{xs[i]}-{xs[j]}")
        i = j + 1
    return ",".join(parts)


def router_cpus() -> list[int]:
    """The CPUs `ROUTER_CPUS_ENV` names (empty: not set)."""
    spec = os.environ.get(ROUTER_CPUS_ENV, "").strip()
    return parse_cpu_list(spec) if spec else []


def pin_router_cpus(cpus: Sequence[int]) -> None:
    """This process on ``cpus`` from now on, and every `Proc` started from it or its children
    (`ROUTER_CPUS_ENV`); nothing when ``cpus`` is empty."""
    if cpus:
        os.sched_setaffinity(0, cpus)
        os.environ[ROUTER_CPUS_ENV] = format_cpu_list(cpus)


def pin_preexec(cpus: Sequence[int]) -> Callable[[], None] | None:
    """A ``preexec_fn`` that puts the child on ``cpus`` before exec (None: no list)."""
    if not cpus:
        return None
    chosen = list(cpus)
    return lambda: os.sched_setaffinity(0, chosen)


def threads_cpus(pids: Sequence[int]) -> dict[str, Any]:
    """Where the threads of ``pids`` may run, read from ``/proc/PID/task/TID/status``'s
    ``Cpus_allowed_list``: ``{"processes": n, "threads": n, "cpus": {list: threads}}`` (a
    process or thread that ended meanwhile is left out)."""
    lists: dict[str, int] = {}
    procs_seen = threads = 0
    for pid in dict.fromkeys(pids):
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        procs_seen += 1
        for tid in tids:
            try:
                status = Path(f"/proc/{pid}/task/{tid}/status").read_text()
            except OSError:
                continue
            for line in status.splitlines():
                if line.startswith("Cpus_allowed_list:"):
                    key = line.split(":", 1)[1].strip()
                    lists[key] = lists.get(key, 0) + 1
                    threads += 1
                    break
    return {"processes": procs_seen, "threads": threads, "cpus": lists}


def tree_threads_cpus(roots: Sequence[int]) -> dict[str, Any]:
    """`threads_cpus` over ``roots`` and every descendant of them."""
    return threads_cpus([p for r in roots for p in tree_pids(r)])


class Proc:
    """A child process in its own process group, logging to ``log``; ``stop()`` ends the group."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        log: Path,
        *,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.log = log
        log.parent.mkdir(parents=True, exist_ok=True)
        self._fh = log.open("wb")
        nice = int(os.environ.get("PEERS_ROUTER_NICE") or 0)
        rt = int(os.environ.get("PEERS_ROUTER_RT") or 0)
        cpus = router_cpus()
        self.popen = subprocess.Popen(
            self.argv,
            stdout=self._fh,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=child_env(env),
            cwd=cwd,
            start_new_session=True,
            # every process started here gets the same niceness, scheduling policy and CPUs
            # (real_engines.py's --router-nice, --router-rt and --router-cpus, which start the
            # engines themselves, without Proc, at 0, SCHED_OTHER and on --engine-cpus;
            # run.py's emulated engines are Procs too, which is why run.py refuses
            # --router-cpus unless the engines are outside it: --fleet and --no-overhead)
            preexec_fn=((lambda: _start_priority(nice, rt, cpus)) if nice or rt or cpus
                        else None),
        )
        self.pid = self.popen.pid
        _RUNNING.append(self)

    @property
    def pids(self) -> list[int]:
        """The roots of the process trees that make up this router (`TreeSampler` adds them)."""
        return [self.pid]

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_tail(self, n: int = 2000) -> str:
        return log_tail(self.log, n)

    def wait_http(self, url: str, timeout_s: float = 60.0, ok: Sequence[int] = (200,)) -> None:
        """Poll ``url`` until it answers one of ``ok``: a RuntimeError with the log tail when
        the process exits first, a TimeoutError after ``timeout_s``."""
        wait_up(url, self.popen, self.name, path="", timeout_s=timeout_s, ok=ok, log=self.log,
                timeout_error=TimeoutError)

    def stop(self, grace_s: float = 5.0) -> None:
        """SIGTERM the process group, SIGKILL it after ``grace_s``; idempotent."""
        if self.popen.poll() is None:
            _signal_group(self.pid, signal.SIGTERM)
            try:
                self.popen.wait(grace_s)
            except subprocess.TimeoutExpired:
                _signal_group(self.pid, signal.SIGKILL)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.popen.wait(grace_s)
        # Leftovers of the group (a child that outlived its parent) go too.
        _signal_group(self.pid, signal.SIGKILL)
        if not self._fh.closed:
            self._fh.close()
        if self in _RUNNING:
            _RUNNING.remove(self)


class Joined(Proc):
    """Several :class:`Proc` carried as one router (Envoy and its endpoint picker): alive while
    every one is, stopped together (the last, the front that clients talk to, first), its CPU,
    RSS and run-queue wait the sum over every one's tree (`pids`). ``popen`` is the first one
    that exited, else the front's."""

    def __init__(self, name: str, parts: Sequence[Proc]) -> None:
        if not parts:
            raise ValueError("Joined needs at least one process")
        self.name = name
        self.parts = list(parts)
        self.argv = self.parts[-1].argv
        self.log = self.parts[-1].log
        self.pid = self.parts[-1].pid

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.parts]

    @property  # type: ignore[override]
    def popen(self) -> subprocess.Popen[bytes]:
        return next((p.popen for p in self.parts if not p.alive()), self.parts[-1].popen)

    def alive(self) -> bool:
        return all(p.alive() for p in self.parts)

    def log_tail(self, n: int = 2000) -> str:
        return "\n".join(f"[{p.name}] {p.log_tail(n)}" for p in self.parts)

    def stop(self, grace_s: float = 5.0) -> None:
        for p in reversed(self.parts):
            p.stop(grace_s)


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def stop_all() -> None:
    """Stop every process this harness started and has not stopped yet (newest first)."""
    for p in reversed(list(_RUNNING)):
        p.stop()


def running() -> list[Proc]:
    return list(_RUNNING)


# -- /proc accounting ----------------------------------------------------------------------


def _children_map() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
        kids.setdefault(ppid, []).append(int(entry))
    return kids


def tree_pids(root: int) -> list[int]:
    """``root`` and all its descendants that exist right now."""
    kids, out, todo = _children_map(), [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(kids.get(pid, []))
    return out


@dataclass(frozen=True)
class Usage:
    """CPU seconds (user + system) and resident memory of a set of processes."""

    cpu_s: float
    rss_bytes: int


def parse_stat(stat: str) -> tuple[float, float]:
    """(utime + stime seconds, rss pages) from the text of ``/proc/PID/stat``."""
    fields = stat[stat.rindex(")") + 2 :].split()
    # fields[0] is field 3 (state): utime = field 14, stime = 15, rss = 24
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK, float(fields[21])


def usage(pids: Sequence[int]) -> Usage:
    cpu, rss = 0.0, 0
    for pid in pids:
        try:
            c, pages = parse_stat(Path(f"/proc/{pid}/stat").read_text())
        except (OSError, ValueError, IndexError):
            continue
        cpu += c
        rss += int(pages) * _PAGE
    return Usage(cpu, rss)


class TreeSampler:
    """Samples a process tree every ``interval_s`` in a thread: CPU time and peak RSS.

    ``root`` is one PID or several (a :class:`Joined` router's `pids`): the trees are added up.
    CPU time of a child that exits between samples is lost; routers here are long-lived, so the
    tree is stable while it is measured. ``cpu_s`` is the delta since :meth:`start`.
    """

    def __init__(self, root: int | Sequence[int], interval_s: float = 0.5) -> None:
        self.roots = [root] if isinstance(root, int) else list(root)
        self.root, self.interval_s = self.roots[0], interval_s
        self.peak_rss = 0
        self._cpu0 = 0.0
        self._last: dict[int, float] = {}
        self._wait0 = 0
        self._last_wait: dict[int, int] = {}  # by thread id: ns waited on a run queue
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        rss = 0
        for pid in dict.fromkeys(p for r in self.roots for p in tree_pids(r)):
            try:
                cpu, pages = parse_stat(Path(f"/proc/{pid}/stat").read_text())
            except (OSError, ValueError, IndexError):
                continue
            self._last[pid] = cpu
            rss += int(pages) * _PAGE
            for tid, waited in run_queue_wait_ns(pid).items():
                self._last_wait[tid] = waited
        self.peak_rss = max(self.peak_rss, rss)

    def start(self) -> TreeSampler:
        self._sample()
        self._cpu0 = sum(self._last.values())
        self._wait0 = sum(self._last_wait.values())
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._sample()

    def stop(self) -> tuple[float, int]:
        """Stop sampling; return (CPU seconds since start, peak RSS bytes)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(5)
        self._sample()
        return max(0.0, sum(self._last.values()) - self._cpu0), self.peak_rss

    @property
    def wait_s(self) -> float:
        """Seconds the tree's threads were runnable but waited for a CPU since :meth:`start`
        (as of the last sample: read it after :meth:`stop`)."""
        return max(0, sum(self._last_wait.values()) - self._wait0) / 1e9


def run_queue_wait_ns(pid: int) -> dict[int, int]:
    """Nanoseconds each thread of ``pid`` has spent runnable on a run queue, not running
    (``/proc/PID/task/TID/schedstat``'s second field); empty where the kernel has no schedstat."""
    out: dict[int, int] = {}
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tasks:
        with contextlib.suppress(OSError, ValueError, IndexError):  # a thread that ended
            out[int(tid)] = int(Path(f"/proc/{pid}/task/{tid}/schedstat").read_text().split()[1])
    return out
