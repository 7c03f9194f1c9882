"""`inferplane serve --workers N`: N gateway processes on one port (SO_REUSEPORT).

The parent forks N workers after the fleet file is checked; each builds its own gateway and
listens on the same address with ``SO_REUSEPORT``, so the kernel spreads connections over them.
They share state as replicas do, through the Redis admission store (budgets, rate limits,
retry markers, usage) and its per-endpoint in-flight slots (`admission.slots`): ``--workers`` > 1
therefore needs ``admission.store: redis``, and a batch store the workers share (a file or
PostgreSQL) unless the batch lane is off (``serve`` refuses otherwise). The SQLite ledger file
is shared (its writer chains records inside each transaction, so several processes can append
to one chain); so is the batch store's SQLite file, and every worker runs batch lines, each line
claimed by one worker under a lease (`batch.store`).

The parent supervises: SIGTERM / SIGINT are passed on to every worker, and so is SIGHUP (each
worker reloads the fleet file itself, `Core.reload_file`). The parent also validates the file on
SIGHUP (and, with ``--watch-config``, when it changes) as a worker's reload does, and keeps the
last configuration that passed — the one the workers run — so that a worker restarted later
starts from it, not from the parent's start-up file (it then reloads the current file when that
differs, and refuses it as the others did when it is invalid). A worker that dies is restarted
(after a second), unless it died in its first seconds (`startup_s`) — a start-up failure (port
taken, Redis unreachable) — which stops them all with its exit status. A worker whose supervisor
dies (even by SIGKILL) gets SIGTERM from the kernel and stops (Linux, `die_with_parent`).

Each worker also serves its own metrics page on a Unix socket in a directory the parent makes
for them (`pages_directory`, mode 0700, removed when the parent returns), so that ``/metrics``
on any worker shows every worker's series, each labelled with its ``worker``
(`telemetry.gather`).
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import math
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable

from inferplane.api.console_auth import ensure_shared_secret
from inferplane.core.process import WORKER_DIR_ENV, WORKER_ENV, WORKERS_ENV

log = logging.getLogger("inferplane.workers")

STARTUP_S = 5.0
"""A worker that exits within this many seconds of its start failed to start (unless
``INFERPLANE_WORKER_STARTUP_S`` says otherwise, `startup_s`)."""

STARTUP_ENV = "INFERPLANE_WORKER_STARTUP_S"


def startup_s() -> float:
    """The start-up window: ``INFERPLANE_WORKER_STARTUP_S`` (seconds, >= 0, finite) or
    `STARTUP_S`; any other value stops the supervisor with one line (``inf`` would make every
    worker's death a failed start, stopping them all)."""
    raw = os.environ.get(STARTUP_ENV)
    if raw is None:
        return STARTUP_S
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not (value >= 0 and math.isfinite(value)):
        raise SystemExit(
            f"inferplane: {STARTUP_ENV}={raw!r} is not a finite number of seconds >= 0"
        )
    return value


def _status(code: int) -> int:
    if os.WIFEXITED(code):
        return os.WEXITSTATUS(code)
    return 128 + os.WTERMSIG(code) if os.WIFSIGNALED(code) else 1


PR_SET_PDEATHSIG = 1


def die_with_parent(parent: int) -> bool:
    """Have the kernel send this process SIGTERM when ``parent`` (the supervisor that forked it)
    dies (Linux's ``PR_SET_PDEATHSIG``), so that a worker never outlives a supervisor killed with
    SIGKILL, serving on the shared port with nobody to restart, reload or stop it; it then stops
    as on any SIGTERM (within ``gateway.shutdown_timeout_s``). False where the platform has no
    such call. A parent already gone (between the fork and the call) gets the SIGTERM at once."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
            return False
    except (OSError, AttributeError):
        return False
    if os.getppid() != parent:
        os.kill(os.getpid(), signal.SIGTERM)
    return True


def pages_directory() -> str:
    """A new private directory (mode 0700) for the workers' metrics sockets: under ``$TMPDIR``,
    or ``/tmp`` where that path would be too long for a Unix socket's address (108 bytes)."""
    directory = tempfile.mkdtemp(prefix="inferplane-workers-")
    if len(os.path.join(directory, "worker-9999.sock").encode()) >= 100:
        os.rmdir(directory)
        directory = tempfile.mkdtemp(prefix="inferplane-workers-", dir="/tmp")
    return directory


def supervise(
    n: int,
    run_worker: Callable[[int], int],
    check_config: Callable[[], None] | None = None,
    watch_s: float | None = None,
) -> int:
    """Fork ``n`` workers running ``run_worker(index)`` (its return value is the worker's exit
    status) and supervise them until a signal stops them; returns the exit status.
    ``check_config()`` runs in the parent on SIGHUP before the workers get it, and every
    ``watch_s`` seconds when given (it validates the fleet file and keeps what passed, which
    ``run_worker`` of a later restart starts from)."""
    window = startup_s()
    ensure_shared_secret()  # a console session opened on one worker is valid on the others

    supervisor = os.getpid()
    try:
        pages = pages_directory()
    except OSError as exc:  # no usable temporary directory: say so, not a traceback
        raise SystemExit(
            f"inferplane: cannot make the workers' metrics directory in "
            f"{tempfile.gettempdir()}: {exc.strerror or exc} (TMPDIR names where it goes)"
        ) from None
    try:
        return _supervise(n, run_worker, check_config, watch_s, window, supervisor, pages)
    finally:
        shutil.rmtree(pages, ignore_errors=True)  # sockets of workers killed with SIGKILL


def _supervise(
    n: int,
    run_worker: Callable[[int], int],
    check_config: Callable[[], None] | None,
    watch_s: float | None,
    window: float,
    supervisor: int,
    pages: str,
) -> int:
    children: dict[int, tuple[int, float]] = {}  # pid -> (index, started)
    stopping = False
    checking = False

    def spawn(i: int) -> None:
        pid = os.fork()
        if pid == 0:  # the worker
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, signal.SIG_DFL)
            die_with_parent(supervisor)
            signal.signal(signal.SIGALRM, signal.SIG_IGN)  # the parent's watch (not inherited)
            # until the worker's own handler reloads (it then reloads a file that changed)
            signal.signal(signal.SIGHUP, signal.SIG_IGN)
            os.environ[WORKER_ENV] = str(i)
            os.environ[WORKERS_ENV] = str(n)
            os.environ[WORKER_DIR_ENV] = pages
            code = 1
            try:
                code = run_worker(i)
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else 1
            except BaseException:
                log.exception("worker %d failed", i)
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        children[pid] = (i, time.monotonic())

    def forward(sig: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        for pid in list(children):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)

    def check() -> None:
        nonlocal checking
        if check_config is None or checking:
            return
        checking = True
        try:
            check_config()
        except Exception:  # the workers' own reload reports the problem
            log.exception("checking the fleet file failed")
        finally:
            checking = False

    def reload(sig: int, _frame: object) -> None:
        check()  # what a worker restarted from now on starts from
        for pid in list(children):  # each worker validates and applies the file itself
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, forward)
    signal.signal(signal.SIGHUP, reload)
    if watch_s is not None and check_config is not None:
        signal.signal(signal.SIGALRM, lambda _s, _f: check())
        signal.setitimer(signal.ITIMER_REAL, watch_s, watch_s)
    for i in range(n):
        spawn(i)
    status = 0
    while children:
        try:
            pid, code = os.wait()
        except ChildProcessError:
            break
        if pid not in children:
            continue
        i, started = children.pop(pid)
        exit_status = _status(code)
        if stopping:
            status = max(status, exit_status if exit_status not in (0, 128 + 15, 128 + 2) else 0)
            continue
        if time.monotonic() - started < window:
            log.error("worker %d exited with status %d while starting; stopping", i, exit_status)
            forward(signal.SIGTERM, None)
            status = exit_status or 1
            continue
        log.error("worker %d exited with status %d; restarting it", i, exit_status)
        time.sleep(1.0)
        spawn(i)
    if watch_s is not None and check_config is not None:
        signal.setitimer(signal.ITIMER_REAL, 0)
    return status
