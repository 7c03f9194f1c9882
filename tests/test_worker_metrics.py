"""`/metrics` under `inferplane serve --workers N` (`telemetry.gather`): any scrape shows every
worker's series, each labelled with its ``worker``, so a counter never goes down between scrapes
that reach different workers; a worker that does not answer is left out (and counted), a
restarted one comes back under its index; nothing is left on disk after shutdown; a
single-process gateway's page is what prometheus_client renders, untouched.

Real processes (`serve --workers 2`, a private Redis, the fake upstream) and, in process, the
merge and the workers' page sockets.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import shutil
import signal
import socket
import struct
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import aiohttp
import httpx
import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from inferplane.api.app import serve
from inferplane.api.pipeline import Gateway
from inferplane.config.loader import parse_config
from inferplane.core import plane as plane_module
from inferplane.core.process import WORKER_DIR_ENV, WORKER_ENV, WORKERS_ENV
from inferplane.telemetry import gather
from inferplane.telemetry.metrics import GatewayMetrics
from tests import test_send_gate
from tests.support.held_upstream import KEY, HeldUpstream, config
from tests.support.procs import Proc, free_port
from tests.support.redis_server import RedisServer
from tests.test_redis_outage import KEYS, _config, slow_upstream

__all__ = ["slow_upstream", "upstream"]

upstream = test_send_gate.upstream  # the fixture: an upstream that answers at once

Series = dict[tuple[str, frozenset[tuple[str, str]]], float]

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}
GATHERED = {gather.UP, gather.UNREACHABLE}  # written once, by the worker a scrape reaches


# -- reading a page ---------------------------------------------------------------------------


def _series(text: str) -> Series:
    """Every sample of the page (parsed by prometheus_client: the page is valid text format)."""
    out: Series = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            key = (s.name, frozenset(s.labels.items()))
            assert key not in out, f"sample {key} twice"
            out[key] = s.value
    return out


def _check_page(text: str, n: int = 2) -> dict[str, float]:
    """The page's shape under ``--workers n``: each family's HELP and TYPE once, every sample
    labelled with a worker but the gathering worker's own two families, which are there once;
    returns ``inferplane_worker_up`` by worker."""
    types = [line.split()[2] for line in text.splitlines() if line.startswith("# TYPE ")]
    helps = [line.split()[2] for line in text.splitlines() if line.startswith("# HELP ")]
    assert len(types) == len(set(types)) and len(helps) == len(set(helps)), "a family twice"
    assert sorted(types) == sorted(helps)
    up: dict[str, float] = {}
    for (name, labels), value in _series(text).items():
        lab = dict(labels)
        if name == gather.UNREACHABLE:
            assert lab == {}
        elif name == gather.UP:
            up[lab["worker"]] = value
        else:
            assert lab.get("worker") in {str(k) for k in range(n)}, (name, lab)
    assert set(up) == {str(k) for k in range(n)}
    unreachable = _series(text)[(gather.UNREACHABLE, frozenset())]
    assert unreachable == sum(1 for v in up.values() if v == 0.0)
    return up


def _counters(text: str) -> Series:
    """The samples that must never go down within one process: counters' totals, histograms'
    buckets, counts and sums."""
    out: Series = {}
    for family in text_string_to_metric_families(text):
        if family.type not in ("counter", "histogram"):
            continue
        for s in family.samples:
            if s.name.endswith(("_total", "_bucket", "_count", "_sum")):
                out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def _of(series: Series, worker: str) -> Series:
    return {k: v for k, v in series.items() if ("worker", worker) in k[1]}


def _requests(text: str) -> dict[str, float]:
    """``inferplane_requests_total`` with code 200, summed by worker."""
    out: dict[str, float] = {}
    for (name, labels), value in _series(text).items():
        lab = dict(labels)
        if name == "inferplane_requests_total" and lab.get("code") == "200":
            out[lab["worker"]] = out.get(lab["worker"], 0.0) + value
    return out


def _monotone(before: Series, after: Series, workers: set[str] | None) -> None:
    """No counter of these workers (None: of any series) went down, and none vanished."""
    for key, value in before.items():
        if workers is None or any(("worker", w) in key[1] for w in workers):
            assert key in after, f"{key} vanished"
            assert after[key] >= value, f"{key} went down: {value} -> {after[key]}"


# -- real processes ---------------------------------------------------------------------------


def _serve(tmp_path: Path, upstream_port: int) -> tuple[RedisServer, Proc, str]:
    srv = RedisServer(tmp_path)
    port = free_port()
    cfg = tmp_path / "gw.yaml"
    cfg.write_text(_config(port, upstream_port, srv.url, metrics={"public": True}))
    gw = Proc(["-m", "inferplane.cli", "serve", "--config", str(cfg), "--workers", "2"],
              tmp_path / "gw.log")
    return srv, gw, f"http://127.0.0.1:{port}"


def _workers(gw: Proc, base: str) -> dict[str, int]:
    """Once both workers listen (their page sockets too): worker index -> pid (the socket's
    peer, ``SO_PEERCRED``)."""
    gw.wait_http(f"{base}/ready")
    deadline = time.monotonic() + 20
    while True:
        found: dict[str, int] = {}
        for d in _dirs(gw):
            for k in "01":
                with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX) as sock:
                    sock.connect(gather.socket_path(str(d), int(k)))
                    cred = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                           struct.calcsize("3i"))
                    found[k] = struct.unpack("3i", cred)[0]
        if len(found) == 2:
            return found
        assert time.monotonic() < deadline, gw.log.read_text()
        time.sleep(0.1)


def _dirs(gw: Proc) -> list[Path]:
    return sorted(Path(os.environ["TMPDIR"]).glob("inferplane-workers-*"))


def _post(base: str, i: int) -> None:
    """One request on a new connection (the kernel picks the worker)."""
    r = httpx.post(f"{base}/v1/chat/completions", json=CHAT, timeout=10,
                   headers={"Authorization": f"Bearer {KEYS['plain']}",
                            "Idempotency-Key": f"r{i}"})
    assert r.status_code == 200, r.text


def _scrape(base: str, timeout: float = 10.0) -> str:
    """``/metrics`` on a new connection."""
    r = httpx.get(f"{base}/metrics", timeout=timeout)
    assert r.status_code == 200, r.text
    return r.text


@pytest.fixture
def tmpdir_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """The gateway's ``$TMPDIR`` (where its supervisor makes the workers' socket directory):
    short, as pytest's own would be too long for a socket's address (the supervisor would
    fall back to /tmp, `api.workers.pages_directory`)."""
    d = Path(tempfile.mkdtemp(prefix="wm-", dir="/tmp"))
    monkeypatch.setenv("TMPDIR", str(d))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def test_every_scrape_shows_every_workers_counters(
    tmp_path: Path, slow_upstream: int, tmpdir_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """40 requests spread by the kernel over two workers, 16 scrapes on new connections (so
    reaching either worker): every page holds both workers' series, the per-worker request
    counts add up to the requests answered, no counter series ever goes down; after SIGTERM
    the sockets and their directory are gone."""
    # every page must hold both workers: a generous wait for the other's page, so that a loaded
    # machine's stall is not read as a worker left out
    monkeypatch.setenv(gather.TIMEOUT_ENV, "10")
    srv, gw, base = _serve(tmp_path, slow_upstream)
    try:
        gw.wait_http(f"{base}/ready")
        deadline = time.monotonic() + 20
        while gw.log.read_text().count("listening on") < 2:  # both workers serve
            assert time.monotonic() < deadline, gw.log.read_text()
            time.sleep(0.1)
        sent = 0
        last: Series = {}
        pages: list[tuple[str, int]] = []
        for _ in range(8):
            for _ in range(5):
                _post(base, sent)
                sent += 1
            for _ in range(2):
                page = _scrape(base)
                now = _counters(page)
                _monotone(last, now, None)  # whichever worker the scrape reached (the defect)
                last = now
                pages.append((page, sent))
        for page, by_then in pages:
            assert _check_page(page) == {"0": 1.0, "1": 1.0}
            assert sum(_requests(page).values()) <= by_then
        (d,) = _dirs(gw)  # the supervisor's, private
        assert sorted(p.name for p in d.iterdir()) == ["worker-0.sock", "worker-1.sock"]
        assert d.stat().st_mode & 0o777 == 0o700
        deadline = time.monotonic() + 10
        while sum((by := _requests(page)).values()) < sent:  # the last answers accounted
            assert time.monotonic() < deadline, by
            time.sleep(0.1)
            page = _scrape(base)
        assert sum(by.values()) == sent and set(by) == {"0", "1"}, by  # both served some
        gw.p.send_signal(signal.SIGTERM)
        assert gw.p.wait(30) == 0
    finally:
        gw.stop()
        srv.stop()
    assert list(tmpdir_env.iterdir()) == []  # no socket, no directory left
    assert "Traceback" not in gw.log.read_text()


def test_a_stopped_worker_is_left_out_and_a_restarted_one_counts_again(
    tmp_path: Path, slow_upstream: int, tmpdir_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Worker 1 stopped (SIGSTOP): scrapes that reach worker 0 come within the gather timeout
    and leave worker 1 out (``inferplane_worker_up{worker="1"} 0``, unreachable 1); killed
    (SIGKILL) and restarted by its supervisor: its series are back under ``worker="1"``,
    counted from 0 again, while worker 0's never went down."""
    monkeypatch.setenv("INFERPLANE_WORKER_STARTUP_S", "0.5")  # restart a worker killed early
    monkeypatch.setenv(gather.TIMEOUT_ENV, "2")  # the stopped worker is left out after 2 s
    srv, gw, base = _serve(tmp_path, slow_upstream)
    stopped = 0
    try:
        pids = _workers(gw, base)
        sent = 0
        while sent < 60 and min(_requests(_scrape(base)).get(w, 0.0) for w in "01") < 2:
            _post(base, sent)
            sent += 1
        before = _scrape(base)
        served_1 = _requests(before)["1"]
        assert served_1 >= 2
        stopped = pids["1"]
        os.kill(stopped, signal.SIGSTOP)
        page = ""
        for _ in range(20):  # a connection the kernel hands to the stopped worker times out
            t0 = time.monotonic()
            with contextlib.suppress(httpx.TransportError):
                page = _scrape(base, timeout=8.0)
                took = time.monotonic() - t0
                break
        assert page, "no scrape reached worker 0"
        assert took < 2 + 4.0, took  # left out after the 2-s timeout, not waited for
        assert _check_page(page) == {"0": 1.0, "1": 0.0}
        assert 'worker="1"' not in page.replace('inferplane_worker_up{worker="1"}', "")
        _monotone(_counters(before), _counters(page), {"0"})

        os.kill(stopped, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while True:  # restarted: its page is on the scrapes again
            assert time.monotonic() < deadline, gw.log.read_text()
            with contextlib.suppress(httpx.TransportError):
                page = _scrape(base, timeout=8.0)
                if _check_page(page) == {"0": 1.0, "1": 1.0}:
                    break
            time.sleep(0.2)
        assert _workers(gw, base)["1"] != stopped
        assert _requests(page).get("1", 0.0) < served_1  # counted from 0 again
        _monotone(_counters(before), _counters(page), {"0"})
        for _ in range(10):
            _post(base, sent)
            sent += 1
        after = _scrape(base)
        _check_page(after)
        _monotone(_counters(page), _counters(after), {"0", "1"})
        gw.p.send_signal(signal.SIGTERM)
        assert gw.p.wait(30) == 0
    finally:
        if stopped:
            with contextlib.suppress(ProcessLookupError):
                os.kill(stopped, signal.SIGKILL)
        gw.stop()
        srv.stop()
    assert list(tmpdir_env.iterdir()) == []
    assert "Traceback" not in gw.log.read_text()


# -- in process -------------------------------------------------------------------------------


def _page(requests: float, extra: bool = False) -> bytes:
    m = GatewayMetrics()
    m.requests.labels("chat", "up", "200").inc(requests)
    m.replacements.inc(requests)
    if extra:
        m.spillovers.labels("c", "a", "b", "full").inc()
    return generate_latest(m.registry)


def test_merge_labels_every_sample_and_names_each_family_once() -> None:
    merged = gather.merge({0: _page(3), 2: _page(5, extra=True)}, 3).decode()
    assert _check_page(merged, 3) == {"0": 1.0, "1": 0.0, "2": 1.0}
    s = _series(merged)
    req = "inferplane_requests_total"
    labels = {"api": "chat", "endpoint": "up", "code": "200"}
    assert s[(req, frozenset({**labels, "worker": "0"}.items()))] == 3.0
    assert s[(req, frozenset({**labels, "worker": "2"}.items()))] == 5.0
    assert s[("inferplane_replacements_total", frozenset({("worker", "2")}))] == 5.0  # no labels
    spill = [k for k in s if k[0] == "inferplane_spillovers_total"]  # one page only
    assert [dict(k[1])["worker"] for k in spill] == ["2"]
    assert s[(gather.UNREACHABLE, frozenset())] == 1.0
    # families keep the first page's order; the gathered two come last
    order = [f.name for f in text_string_to_metric_families(merged)]
    first = [f.name for f in text_string_to_metric_families(_page(0).decode())]
    assert order[: len(first)] == first and order[-2:] == [gather.UP, gather.UNREACHABLE]


def test_merge_keeps_label_values_holding_braces_and_spaces() -> None:
    page = (b'# HELP x_total a "b"\n# TYPE x_total counter\n'
            b'x_total{a="b {c} d",e="f"} 1.0\nx_total 2.0 1700000000000\n')
    s = _series(gather.merge({1: page}, 2).decode())
    assert s[("x_total", frozenset({("a", "b {c} d"), ("e", "f"), ("worker", "1")}))] == 1.0
    assert s[("x_total", frozenset({("worker", "1")}))] == 2.0


async def test_page_sockets_answer_time_out_and_clean_up(tmp_path: Path) -> None:
    d = str(tmp_path)
    server = gather.PageServer(d, 1, lambda: b"page of 1\n")
    await server.start()
    assert await gather.fetch(gather.socket_path(d, 1)) == b"page of 1\n"
    assert await gather.fetch(gather.socket_path(d, 5)) is None  # no such worker

    async def mute(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # accepts, never answers (a worker busy or stopped): until EOF
        writer.close()

    silent = await asyncio.start_unix_server(mute, path=gather.socket_path(d, 0))
    t0 = time.monotonic()
    got = await gather.gather(b"", 2, 3, d, timeout_s=1.0)
    assert time.monotonic() - t0 < 5.0  # left out after the timeout, not waited for
    up = {dict(k[1])["worker"]: v for k, v in _series(got.decode()).items() if k[0] == gather.UP}
    assert up == {"0": 0.0, "1": 1.0, "2": 1.0}
    silent.close()
    await silent.wait_closed()
    await server.close()
    assert "worker-1.sock" not in os.listdir(d)  # its own socket file removed
    stale = gather.socket_path(d, 0)  # a socket file nobody listens on (a killed worker's)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(stale)
    with socket.socket(socket.AF_UNIX) as dead:
        dead.bind(stale)
    assert await gather.fetch(stale) is None
    again = gather.PageServer(d, 0, lambda: b"restarted\n")  # over the stale socket file
    await again.start()
    assert await gather.fetch(gather.socket_path(d, 0)) == b"restarted\n"
    await again.close()
    assert os.listdir(d) == []


NOBODY = 65534
as_root = pytest.mark.skipif(
    os.geteuid() != 0 or gather._SO_PEERCRED is None,
    reason="a process of another user is made by switching a forked child's uid (needs root) "
    "and checked with SO_PEERCRED (Linux)",
)


@pytest.fixture
def open_directory() -> Iterator[str]:
    """A directory any user may enter and write (0777, under /tmp: pytest's own are 0700), so
    that only the peer check, not the directory's mode, keeps another user's process out;
    removed afterwards whatever happened."""
    d = tempfile.mkdtemp(prefix="inferplane-peer-", dir="/tmp")
    try:
        os.chmod(d, 0o777)
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


CANNOT_SWITCH = 77
"""The child's status when this root cannot become nobody (a user namespace that maps uid 0
only, SETUID/SETGID capabilities dropped, fakeroot): the test skips."""


def _as_nobody(child: Callable[[], int]) -> int:
    """Fork a child that switches to user nobody (no supplementary groups: root's would stay)
    and exits with ``child()``'s status (99 on an exception, `CANNOT_SWITCH` when it cannot
    switch); returns its pid."""
    with warnings.catch_warnings():  # Python >= 3.12 warns of fork in a threaded process
        warnings.simplefilter("ignore", DeprecationWarning)
        pid = os.fork()
    if pid == 0:  # the child: plain system calls only, never back into pytest or the loop
        status = 99
        try:
            try:
                os.setgroups([])
                os.setgid(NOBODY)
                os.setuid(NOBODY)
            except OSError:
                status = CANNOT_SWITCH
            else:
                status = child()
        finally:
            os._exit(status)
    return pid


async def _exit_status(pid: int) -> int:
    """The child's exit status; the test skips if it could not switch to nobody."""
    _, code = await asyncio.to_thread(os.waitpid, pid, 0)
    status = os.waitstatus_to_exitcode(code)
    if status == CANNOT_SWITCH:
        pytest.skip(f"this root cannot switch a forked child to uid {NOBODY}")
    return status


def _connect(path: str) -> int:
    """0: the connection to ``path`` was closed with nothing sent, 1: something was sent,
    2: no connection."""
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        try:
            s.connect(path)
        except OSError:
            return 2
        got = b""
        while chunk := s.recv(1 << 16):
            got += chunk
        return 1 if got else 0


@as_root
async def test_a_page_socket_refuses_another_users_process(
    open_directory: str, caplog: pytest.LogCaptureFixture,
) -> None:
    """A connection from a process of another user is closed without the page, counted and
    logged once per user, even where the directory's mode would let it in; the worker's own
    user is answered as before."""
    server = gather.PageServer(open_directory, 0, lambda: b"page of 0\n")
    path = gather.socket_path(open_directory, 0)
    try:
        await server.start()
        os.chmod(path, 0o777)
        with caplog.at_level(logging.WARNING, logger="inferplane.telemetry.gather"):
            assert await _exit_status(_as_nobody(lambda: _connect(path))) == 0
            assert await _exit_status(_as_nobody(lambda: _connect(path))) == 0
        assert server.refused == 2
        said = [m for m in caplog.messages if "refused a connection" in m]
        assert len(said) == 1 and f"uid {NOBODY}, not 0" in said[0], caplog.messages
        assert await gather.fetch(path) == b"page of 0\n"  # its own user's
        assert server.refused == 2
    finally:
        await server.close()


@as_root
async def test_a_page_served_by_another_users_process_is_left_out(
    open_directory: str, caplog: pytest.LogCaptureFixture,
) -> None:
    """A page socket that another user's process serves (it got into the directory) is not
    read: the gathering worker leaves it out as one that did not answer, and says why."""
    path = gather.socket_path(open_directory, 1)
    ready_r, ready_w = os.pipe()

    def serve_forged() -> int:
        os.close(ready_r)
        with socket.socket(socket.AF_UNIX) as s:
            s.bind(path)
            s.listen(1)
            s.settimeout(10)
            os.write(ready_w, b"x")
            for _ in range(2):  # the fetch, then the gather
                conn, _ = s.accept()
                page = b"# HELP forged_total x\n# TYPE forged_total counter\nforged_total 1.0\n"
                with contextlib.suppress(OSError), conn:
                    conn.sendall(struct.pack("!Q", len(page)) + page)
                    conn.recv(1)  # until the asker closes
        return 0

    pid = 0
    try:
        pid = _as_nobody(serve_forged)
        os.close(ready_w)
        ready_w = -1
        if await asyncio.to_thread(os.read, ready_r, 1) != b"x":  # it exited without serving
            child, pid = pid, 0  # reaped here
            pytest.fail(f"the child exited with status {await _exit_status(child)} unready")
        with caplog.at_level(logging.WARNING, logger="inferplane.telemetry.gather"):
            assert await gather.fetch(path, timeout_s=5.0) is None
            merged = (await gather.gather(b"", 0, 2, open_directory, timeout_s=0.5)).decode()
        assert "forged" not in merged and _check_page(merged) == {"0": 1.0, "1": 0.0}
        assert any(f"{path} is left out" in m and f"uid {NOBODY}" in m for m in caplog.messages)
        child, pid = pid, 0
        assert await _exit_status(child) == 0
    finally:
        os.close(ready_r)
        if ready_w != -1:
            os.close(ready_w)
        if pid:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)


async def test_without_peer_credentials_the_directory_alone_guards_said_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Where the platform has no SO_PEERCRED, pages are served and read as before (the 0700
    directory is the guard), and that is said once in the process's log."""
    monkeypatch.setattr(gather, "_SO_PEERCRED", None)
    monkeypatch.setattr(gather, "_unchecked_said", False)
    d = str(tmp_path)
    with caplog.at_level(logging.WARNING, logger="inferplane.telemetry.gather"):
        server = gather.PageServer(d, 0, lambda: b"page of 0\n")
        await server.start()
        try:
            for _ in range(2):
                assert await gather.fetch(gather.socket_path(d, 0)) == b"page of 0\n"
        finally:
            await server.close()
    said = [m for m in caplog.messages if "no peer credentials" in m]
    assert len(said) == 1 and "directory's mode (0700) only" in said[0]
    assert server.refused == 0


async def test_refusing_and_leaving_out_without_root(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The peer check's consequences on any host (no other user needed: `peer` is made to say
    another uid, then to fail): the page server closes such a connection with nothing sent,
    counts it and logs once per user ("unknown" for unreadable credentials); `fetch` reads
    nothing from such a server and warns once per socket and user."""
    monkeypatch.setattr(gather, "_strangers_said", set())
    other = os.geteuid() + 1
    monkeypatch.setattr(gather, "peer", lambda sock: (4242, other))
    server = gather.PageServer(str(tmp_path), 0, lambda: b"page of 0\n")
    path = gather.socket_path(str(tmp_path), 0)
    # fetched from: its own refusals (counted whenever its task runs) stay off worker 0's count
    asked = gather.PageServer(str(tmp_path), 1, lambda: b"page of 1\n")
    fetched = gather.socket_path(str(tmp_path), 1)
    try:
        await server.start()
        await asked.start()
        with caplog.at_level(logging.WARNING, logger="inferplane.telemetry.gather"):
            for _ in range(2):
                assert await asyncio.to_thread(_connect, path) == 0  # closed, nothing sent
            assert server.refused == 2
            for _ in range(2):
                assert await gather.fetch(fetched, timeout_s=5.0) is None
            refused = [m for m in caplog.messages if "worker 0's" in m]
            assert len(refused) == 1 and f"runs as uid {other}, not {os.geteuid()}" in refused[0]
            left = [m for m in caplog.messages if f"{fetched} is left out" in m]
            assert len(left) == 1 and f"uid {other}" in left[0], caplog.messages
            caplog.clear()

            def unreadable(sock: object) -> tuple[int, int]:
                raise OSError("boom")

            monkeypatch.setattr(gather, "peer", unreadable)
            before = server.refused
            for _ in range(2):
                assert await asyncio.to_thread(_connect, path) == 0
            assert server.refused == before + 2
            for _ in range(2):
                assert await gather.fetch(fetched, timeout_s=5.0) is None
        why = "the peer's credentials could not be read (boom)"
        refused = [m for m in caplog.messages if "worker 0's" in m]
        assert len(refused) == 1 and why in refused[0], caplog.messages
        left = [m for m in caplog.messages if f"{fetched} is left out" in m]
        assert len(left) == 1 and why in left[0], caplog.messages
    finally:
        await server.close()
        await asked.close()


class _FakeSocket:
    """A socket whose ``getsockopt`` answers ``answer`` (or raises it)."""

    def __init__(self, answer: bytes | OSError) -> None:
        self.answer = answer

    def getsockopt(self, level: int, optname: int, buflen: int, /) -> bytes:
        if isinstance(self.answer, OSError):
            raise self.answer
        return self.answer


def test_peer_reads_a_whole_ucred_and_falls_back_where_the_option_is_unsupported(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A short answer is unreadable credentials (OSError: refused), not a struct.error that
    nothing catches; ENOPROTOOPT / EOPNOTSUPP is a platform without peer credentials (the
    directory guards, said once); any other error stays unreadable credentials."""
    monkeypatch.setattr(gather, "_SO_PEERCRED", 17)  # any option number: the socket is fake
    monkeypatch.setattr(gather, "_unchecked_said", False)
    assert gather.peer(_FakeSocket(struct.pack("iII", 12, 34, 56))) == (12, 34)
    short = _FakeSocket(b"\0" * 4)
    with pytest.raises(OSError, match="SO_PEERCRED gave 4 bytes, not 12"):
        gather.peer(short)
    stranger = gather._stranger(short)
    assert stranger is not None and stranger[0] == "unknown"
    with caplog.at_level(logging.WARNING, logger="inferplane.telemetry.gather"):
        for code in (errno.ENOPROTOOPT, errno.EOPNOTSUPP):
            unsupported = _FakeSocket(OSError(code, os.strerror(code)))
            assert gather.peer(unsupported) is None
            assert gather._stranger(unsupported) is None
    assert sum("no peer credentials" in m for m in caplog.messages) == 1
    broken = _FakeSocket(OSError(errno.EBADF, os.strerror(errno.EBADF)))
    with pytest.raises(OSError):
        gather.peer(broken)
    stranger = gather._stranger(broken)
    assert stranger is not None and stranger[0] == "unknown"


def test_peer_credentials_are_read_on_linux_only() -> None:
    """Other systems that define SO_PEERCRED lay its answer out otherwise (OpenBSD: uid, gid,
    pid), which ``struct ucred``'s layout would misread: there the directory alone guards."""
    for platform in ("openbsd7", "darwin", "freebsd14", "win32"):
        assert gather._peer_credentials_option(platform) is None, platform
    assert gather._peer_credentials_option("linux") == getattr(socket, "SO_PEERCRED", None)


async def _gateway_page(upstream: HeldUpstream) -> bytes:
    """One ``/metrics`` of an in-process gateway in front of ``upstream`` (a worker of
    ``serve --workers`` where the environment says so), started and stopped around it."""
    gw = Gateway(parse_config(config(upstream.port, metrics={"public": True})))
    port = free_port()
    runner = await serve(gw, "127.0.0.1", port)
    try:
        auth = {"Authorization": f"Bearer {KEY}"}
        async with aiohttp.ClientSession(headers=auth) as s, s.get(
            f"http://127.0.0.1:{port}/metrics"
        ) as r:
            assert r.status == 200
            return await r.read()
    finally:
        await runner.cleanup()


async def test_single_process_page_is_prometheus_clients_bytes_and_a_workers_is_merged(
    upstream: HeldUpstream, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A single-process gateway serves the rendered registry's bytes (`telemetry.metrics.page`:
    `generate_latest` less the ``_created`` samples) as they are (no ``worker`` label, no
    gathered families); the same gateway as worker 0 of 2 (whose peer is not there) serves its
    page labelled, with worker 1 left out."""
    rendered = b'# HELP a_total A\n# TYPE a_total counter\na_total{x="y"} 7.0\n'
    monkeypatch.setattr(plane_module, "metrics_page", lambda _registry: rendered)

    assert await _gateway_page(upstream) == rendered
    monkeypatch.setenv(WORKER_ENV, "0")
    monkeypatch.setenv(WORKERS_ENV, "2")
    monkeypatch.setenv(WORKER_DIR_ENV, str(tmp_path))
    merged = (await _gateway_page(upstream)).decode()
    assert 'a_total{worker="0",x="y"} 7.0\n' in merged
    assert _check_page(merged) == {"0": 1.0, "1": 0.0}
    assert os.listdir(tmp_path) == []  # its socket removed when it stopped


async def test_a_worker_without_its_page_socket_serves_on(
    upstream: HeldUpstream, monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
    caplog: pytest.LogCaptureFixture
) -> None:
    """The page socket is a side channel: a worker that cannot bind it (here its directory is
    gone) starts and answers all the same, says why in a warning, and gathers the others."""
    monkeypatch.setenv(WORKER_ENV, "0")
    monkeypatch.setenv(WORKERS_ENV, "2")
    monkeypatch.setenv(WORKER_DIR_ENV, str(tmp_path / "gone"))
    with caplog.at_level(logging.WARNING, logger="inferplane.api"):
        page = (await _gateway_page(upstream)).decode()
    assert _check_page(page) == {"0": 1.0, "1": 0.0}
    assert any("cannot serve its metrics page" in m for m in caplog.messages)
    refused = ("inferplane_worker_page_refused_total", frozenset({("worker", "0")}))
    assert _series(page)[refused] == 0.0  # a worker's: counted from its start
    assert b"inferplane_worker_page_refused" not in generate_latest(GatewayMetrics().registry)


def test_the_gather_timeout_reads_its_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(gather.TIMEOUT_ENV, raising=False)
    assert gather.timeout_s() == gather.TIMEOUT_S
    monkeypatch.setenv(gather.TIMEOUT_ENV, "2.5")
    assert gather.timeout_s() == 2.5
    for bad in ("0", "-1", "soon", "nan", "inf", "Infinity", "1e999"):
        monkeypatch.setenv(gather.TIMEOUT_ENV, bad)
        assert gather.timeout_s() == gather.TIMEOUT_S, bad


def test_an_infinite_gather_timeout_is_refused_with_a_warning(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """``inf`` would hold every scrape on a hung worker: ignored like any other bad value."""
    monkeypatch.setenv(gather.TIMEOUT_ENV, "inf")
    with caplog.at_level(logging.WARNING, logger="inferplane.telemetry.gather"):
        assert gather.timeout_s() == gather.TIMEOUT_S
    assert caplog.messages == [
        f"{gather.TIMEOUT_ENV}='inf' is not a finite number of seconds > 0: using 1.0"
    ]
