"""`/metrics` under `inferplane serve --workers N`: every worker's page on every scrape, each
sample labelled with its ``worker``.

The kernel hands a scrape's connection to any one of the workers (``SO_REUSEPORT``); a page
holding that worker's counters only would jump between workers' values from one scrape to the
next, which Prometheus reads as counter resets. So each worker also serves its own page (what a
single-process gateway serves at ``/metrics``) on a private Unix socket,
``<dir>/worker-<k>.sock`` in a directory its supervisor made (mode 0700, ``$TMPDIR``; removed
when the supervisor exits), and the worker a scrape reaches asks every other worker for its page
at once (`gather`), with a short timeout (`TIMEOUT_S`), and serves the merge (`merge`):

- each family once (one ``# HELP`` and ``# TYPE``), in the order the pages first name them,
  with the samples of worker 0, then 1, …, each with ``worker="<k>"`` as its first label;
- a worker that does not answer in time (stopped, restarting, busy past the timeout) is left
  out of that page, never waited for longer nor breaking it, and said so by two families only
  the gathering worker writes, once and without a worker label of their own:
  ``inferplane_worker_up{worker="k"}`` (1: its samples are on this page, 0: left out) and
  ``inferplane_workers_unreachable`` (how many were left out).

A worker's counters thus stay one series per worker, monotone whichever worker is scraped; a
restarted worker starts its series again from 0 under the same ``worker`` label (its index),
which Prometheus reads as the reset it is.

The socket speaks no HTTP: a connection is answered with the page's length (8 bytes, big-endian)
and the page, then closed; a page cut short is left out as a worker that did not answer.

Each end checks the other's user (`peer`: ``SO_PEERCRED``, Linux): a worker answers only a
process of its own (effective) user, and closes any other connection unanswered, counting it
(`PageServer.refused`, exported by the gateway as ``inferplane_worker_page_refused_total``) and
logging the first from each user; a connection whose credentials cannot be read is refused the
same way (logged once as "unknown"). A gathering worker leaves out a page served by another
user's process (or one it cannot identify) as one that did not answer. Where the platform gives
no peer credentials (not Linux, or the option not supported), the directory's mode alone keeps
other users out (said once in the log).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import math
import os
import socket
import struct
import sys
from collections.abc import Callable
from typing import Protocol

log = logging.getLogger("inferplane.telemetry.gather")

TIMEOUT_S = 1.0
"""How long a scrape waits for the other workers' pages (all asked at once), unless
``INFERPLANE_WORKER_GATHER_TIMEOUT_S`` says otherwise (`timeout_s`)."""

TIMEOUT_ENV = "INFERPLANE_WORKER_GATHER_TIMEOUT_S"


def timeout_s() -> float:
    """The gather timeout: ``INFERPLANE_WORKER_GATHER_TIMEOUT_S`` (seconds, > 0, finite) or
    `TIMEOUT_S`; a value that is not a finite positive number (``inf`` would hold every scrape
    on a hung worker) is ignored, with a warning."""
    raw = os.environ.get(TIMEOUT_ENV)
    if raw is None:
        return TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not (value > 0 and math.isfinite(value)):
        log.warning("%s=%r is not a finite number of seconds > 0: using %.1f", TIMEOUT_ENV, raw,
                    TIMEOUT_S)
        return TIMEOUT_S
    return value

MAX_PAGE = 64 << 20
"""A length above this is not a page (the socket's peer is not a worker): left out."""

_LENGTH = struct.Struct("!Q")

UP = "inferplane_worker_up"
UNREACHABLE = "inferplane_workers_unreachable"


def _peer_credentials_option(platform: str) -> int | None:
    """``SO_PEERCRED`` where it gives Linux's ``struct ucred`` (pid, uid, gid), else None: other
    systems that define the option lay its answer out otherwise (OpenBSD: uid, gid, pid)."""
    return getattr(socket, "SO_PEERCRED", None) if platform.startswith("linux") else None


_SO_PEERCRED = _peer_credentials_option(sys.platform)
_UCRED = struct.Struct("iII")  # struct ucred: pid_t pid, uid_t uid, gid_t gid
_NOT_SUPPORTED = frozenset({errno.ENOPROTOOPT, errno.EOPNOTSUPP})
_unchecked_said = False


class _Socket(Protocol):
    def getsockopt(self, level: int, optname: int, buflen: int, /) -> bytes: ...


Sock = _Socket | None
"""A connected Unix socket, as `asyncio` hands it out (``get_extra_info("socket")``)."""


def _say_unchecked() -> None:
    """Log, once in this process, that peers cannot be checked on this platform."""
    global _unchecked_said
    if not _unchecked_said:
        _unchecked_said = True
        log.warning("this platform gives no peer credentials (SO_PEERCRED): the workers' "
                    "metrics page sockets are protected by their directory's mode (0700) only, "
                    "not checked connection by connection")


def peer(sock: Sock) -> tuple[int, int] | None:
    """The (pid, effective uid) of the process at the other end of the Unix socket ``sock``
    (``SO_PEERCRED``, as of its ``connect`` or ``listen``), or None where the platform gives no
    peer credentials (not Linux, or a kernel that answers the option with ENOPROTOOPT or
    EOPNOTSUPP; said once in the log: then the directory's mode alone protects the page
    sockets). OSError when they cannot be read (a socket that is not there is one, an answer
    that is not a ``struct ucred`` another)."""
    if _SO_PEERCRED is None:
        _say_unchecked()
        return None
    if sock is None:
        raise OSError("no socket to read the peer's credentials from")
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, _SO_PEERCRED, _UCRED.size)
    except OSError as exc:
        if exc.errno in _NOT_SUPPORTED:
            _say_unchecked()
            return None
        raise
    if len(raw) != _UCRED.size:
        raise OSError(f"SO_PEERCRED gave {len(raw)} bytes, not {_UCRED.size}")
    pid, uid, _gid = _UCRED.unpack(raw)
    return pid, uid


def _stranger(sock: Sock) -> tuple[str, str] | None:
    """Who is at the other end of ``sock`` and why it may not be talked to (a process of another
    user, or one whose credentials cannot be read), or None when it runs as this process's user
    (or the platform cannot tell: `peer`)."""
    try:
        cred = peer(sock)
    except OSError as exc:
        return "unknown", f"the peer's credentials could not be read ({exc})"
    own = os.geteuid()
    if cred is None or cred[1] == own:
        return None
    uid = cred[1]
    return f"uid {uid}", f"the peer (process {cred[0]}) runs as uid {uid}, not {own}"


def socket_path(directory: str, index: int) -> str:
    """Where worker ``index`` serves its own page."""
    return os.path.join(directory, f"worker-{index}.sock")


class PageServer:
    """Worker ``index``'s own page (``render()``) on its Unix socket in ``directory``, for the
    other workers' scrapes; `close` stops it and removes the socket file (and the directory
    when the supervisor is gone and no worker is left in it). A connection from a process of
    another user is closed unanswered and counted in ``refused`` (the first from each user
    logged)."""

    def __init__(self, directory: str, index: int, render: Callable[[], bytes]) -> None:
        self.directory, self.index, self.render = directory, index, render
        self.path = socket_path(directory, index)
        self._server: asyncio.AbstractServer | None = None
        self._parent = os.getppid()
        self.refused = 0
        self._refused_said: set[str] = set()

    async def start(self) -> None:
        """Listen (a socket file left by a killed predecessor of this index is replaced)."""
        if _SO_PEERCRED is None:
            _say_unchecked()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        self._server = await asyncio.start_unix_server(self._answer, path=self.path)

    async def _answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        stranger = _stranger(writer.get_extra_info("socket"))
        if stranger is not None:
            self._refuse(*stranger)
            writer.close()
            return
        try:
            page = self.render()
            writer.write(_LENGTH.pack(len(page)) + page)
            await writer.drain()
        except (ConnectionError, OSError):
            pass  # the asker gave up (its timeout): its page goes without this one
        except Exception:
            log.exception("rendering worker %d's metrics page for another worker failed",
                          self.index)
        finally:
            writer.close()

    def _refuse(self, who: str, why: str) -> None:
        self.refused += 1
        if who not in self._refused_said:  # one line per user
            self._refused_said.add(who)
            log.warning("worker %d's metrics page socket refused a connection: %s (further "
                        "ones from it are counted in inferplane_worker_page_refused_total, not "
                        "logged)", self.index, why)

    async def close(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        with contextlib.suppress(Exception):
            await server.wait_closed()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        if os.getppid() != self._parent:  # the supervisor is gone (SIGKILL): nobody else will
            with contextlib.suppress(OSError):
                os.rmdir(self.directory)  # only once empty: the last worker to stop does it


_strangers_said: set[tuple[str, str]] = set()


async def fetch(path: str, timeout_s: float = TIMEOUT_S) -> bytes | None:
    """The page served at ``path``, or None when it does not come whole within ``timeout_s`` or
    its server is a process of another user (`peer`; logged once per socket and user)."""
    writer: asyncio.StreamWriter | None = None

    async def read() -> bytes | None:
        nonlocal writer
        reader, writer = await asyncio.open_unix_connection(path)
        stranger = _stranger(writer.get_extra_info("socket"))
        if stranger is not None:
            if (path, stranger[0]) not in _strangers_said:  # one line per socket and user
                _strangers_said.add((path, stranger[0]))
                log.warning("the metrics page at %s is left out: %s", path, stranger[1])
            return None
        (n,) = _LENGTH.unpack(await reader.readexactly(_LENGTH.size))
        return await reader.readexactly(n) if n <= MAX_PAGE else None

    try:
        return await asyncio.wait_for(read(), timeout_s)
    except (TimeoutError, OSError, EOFError):  # EOFError: IncompleteReadError
        return None
    finally:
        if writer is not None:
            writer.close()


async def gather(
    own: bytes, index: int, n: int, directory: str, timeout_s: float = TIMEOUT_S
) -> bytes:
    """The page of a scrape that reached worker ``index`` of ``n``: ``own`` (its page) merged
    with the pages of the others that answer within ``timeout_s``."""
    others = [k for k in range(n) if k != index]
    got = await asyncio.gather(*(fetch(socket_path(directory, k), timeout_s) for k in others))
    pages = {index: own}
    pages.update((k, page) for k, page in zip(others, got, strict=True) if page is not None)
    return merge(pages, n)


def _labelled(line: bytes, label: bytes) -> bytes:
    """A sample line of the text format with ``label`` (``worker="k",``) first in its labels.
    A metric name holds no ``{`` or space, so the first of them ends the name."""
    brace, space = line.find(b"{"), line.find(b" ")
    if brace != -1 and (space == -1 or brace < space):
        return line[: brace + 1] + label + line[brace + 1 :]
    return line[:space] + b"{" + label[:-1] + b"}" + line[space:]


def merge(pages: dict[int, bytes], n: int) -> bytes:
    """One page of the text format (0.0.4) from the pages of workers ``pages`` (index → page,
    as `prometheus_client.generate_latest` writes them: each family a ``# HELP`` line, a
    ``# TYPE`` line, then its samples) out of ``n``: each family once, its samples from every
    page labelled with their worker; then `UP` and `UNREACHABLE`."""
    headers: dict[bytes, list[bytes]] = {}
    samples: dict[bytes, list[bytes]] = {}
    for k in sorted(pages):
        label = b'worker="%d",' % k
        lines: list[bytes] | None = None
        name, fresh = b"", False
        for line in pages[k].split(b"\n"):
            if line.startswith(b"# HELP "):
                name = line.split(b" ", 3)[2]
                lines = samples.setdefault(name, [])
                fresh = name not in headers  # the first page's words for it stay
                if fresh:
                    headers[name] = [line]
            elif line.startswith(b"# TYPE "):
                if fresh:
                    headers[name].append(line)
            elif line and not line.startswith(b"#") and lines is not None:
                lines.append(_labelled(line, label))
    out: list[bytes] = []
    for name, head in headers.items():
        out.extend(head)
        out.extend(samples[name])
    out.append(b"# HELP " + UP.encode() + b" 1 when the worker's samples are on this page, 0 when "
               b"it did not answer the gathering worker in time (left out)")
    out.append(b"# TYPE " + UP.encode() + b" gauge")
    out.extend(b'%s{worker="%d"} %s' % (UP.encode(), k, b"1.0" if k in pages else b"0.0")
               for k in range(n))
    out.append(b"# HELP " + UNREACHABLE.encode() + b" Workers left out of this page: they did "
               b"not answer the gathering worker in time")
    out.append(b"# TYPE " + UNREACHABLE.encode() + b" gauge")
    out.append(b"%s %d.0" % (UNREACHABLE.encode(), sum(1 for k in range(n) if k not in pages)))
    out.append(b"")
    return b"\n".join(out)
