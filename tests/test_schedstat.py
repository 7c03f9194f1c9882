"""The gateway's wait for a CPU on /metrics: Linux's schedstat read at scrape time
(`telemetry.schedstat`) and exported as counters (`GatewayMetrics.count_schedstat`): the event
loop's thread's CPU time, run-queue wait and time slices, and the whole process's wait. Fake
``/proc`` trees check the parser and the bookkeeping (bad content, threads that exit, reused
ids); on Linux, a thread's held file and a served gateway check the real counters."""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import threading
import time
from pathlib import Path

import aiohttp
import pytest
from prometheus_client import generate_latest
from prometheus_client.openmetrics.exposition import generate_latest as generate_openmetrics

from inferplane.api.app import serve
from inferplane.api.pipeline import Gateway
from inferplane.config.loader import parse_config
from inferplane.telemetry.metrics import GatewayMetrics
from inferplane.telemetry.schedstat import ProcessWait, Schedstat, ThreadSchedstat, parse
from tests import test_send_gate
from tests.support.held_upstream import KEY, HeldUpstream, config
from tests.support.procs import free_port
from tests.test_metric_counters import _total, _types

LOOP = ("inferplane_event_loop_cpu_seconds_total",
        "inferplane_event_loop_runqueue_wait_seconds_total",
        "inferplane_event_loop_timeslices_total")
PROCESS = "inferplane_process_runqueue_wait_seconds_total"
ALL = (*LOOP, PROCESS)


def _linux_schedstat() -> bool:
    """Whether this kernel gives a thread its schedstat (not the stub ``0 0 0``)."""
    t = ThreadSchedstat()
    t.close()
    return t.available


LINUX_SCHEDSTAT = _linux_schedstat()
linux_only = pytest.mark.skipif(not LINUX_SCHEDSTAT,
                                reason="needs Linux's /proc/thread-self/schedstat")


@pytest.mark.parametrize(("text", "expected"), [
    ("681878343 42028631 155\n", Schedstat(681878343, 42028631, 155)),
    ("0 0 0", Schedstat(0, 0, 0)),
    ("1 2 3 4 5\n", Schedstat(1, 2, 3)),  # fields a later kernel might add are ignored
    ("", None),
    ("\n", None),
    ("1 2", None),  # short
    ("1 2 x", None),
    ("1.5 2 3", None),
    ("-1 2 3", None),
    ("+1 2 3", None),  # int() takes these three; the kernel prints digits only
    ("1_0 2 3", None),
    ("\u0661 2 3", None),  # ARABIC-INDIC DIGIT ONE
    ("\x00\x01\x02", None),
])
def test_parse(text: str, expected: Schedstat | None) -> None:
    assert parse(text) == expected


def _tasks(tmp_path: Path, threads: dict[int, str]) -> Path:
    """A fake ``/proc/self/task``: one directory per thread id, holding its schedstat text
    (rewritten in place: a file held open reads the new text)."""
    tasks = tmp_path / "task"
    tasks.mkdir(exist_ok=True)
    for tid, text in threads.items():
        (tasks / str(tid)).mkdir(exist_ok=True)
        (tasks / str(tid) / "schedstat").write_text(text)
    return tasks


def _gone(tasks: Path, tid: int) -> None:
    (tasks / str(tid) / "schedstat").unlink()
    (tasks / str(tid)).rmdir()


def test_a_thread_counts_from_its_first_read_and_never_goes_down(tmp_path: Path) -> None:
    tasks = _tasks(tmp_path, {7: "1000000000 500000000 10\n"})
    t = ThreadSchedstat(tasks / "7" / "schedstat")
    assert t.available

    def sampled() -> tuple[float, float, float]:
        t.sample()
        return t.cpu_s(), t.wait_s(), t.slices()

    assert sampled() == (0.0, 0.0, 0.0)
    _tasks(tmp_path, {7: "1250000000 600000000 14\n"})
    assert (t.cpu_s(), t.wait_s(), t.slices()) == (0.0, 0.0, 0.0)  # read only by sample
    assert sampled() == (0.25, 0.1, 4.0)
    for bad in ("garbage", "1 2", "1000000000 500000000 9\n"):  # unreadable, or gone down
        _tasks(tmp_path, {7: bad})
        assert sampled() == (0.25, 0.1, 4.0)
    _tasks(tmp_path, {7: "2000000000 700000000 20\n"})
    assert sampled() == (1.0, 0.2, 10.0)
    t.close()
    _tasks(tmp_path, {7: "3000000000 900000000 30\n"})
    assert sampled() == (1.0, 0.2, 10.0)  # closed: as last read


@pytest.mark.parametrize("content", [None, "", "1 2", "not a schedstat file", "0 0 0\n"])
def test_no_readable_schedstat_exports_nothing_and_says_so_once(
    tmp_path: Path, content: str | None, caplog: pytest.LogCaptureFixture
) -> None:
    """Not Linux (no /proc), a kernel without schedstat (no file, or the stub ``0 0 0`` of
    older kernels), or a file that reads wrong: the four series are absent, nothing raises,
    one debug line says why."""
    tasks = _tasks(tmp_path, {} if content is None else {7: content})
    m = GatewayMetrics()
    with caplog.at_level(logging.DEBUG, logger="inferplane.telemetry"):
        assert m.count_schedstat(tasks / "7" / "schedstat", tasks) is False
    assert [r.levelno for r in caplog.records] == [logging.DEBUG]
    assert "schedstat" in caplog.records[0].getMessage()
    page = generate_latest(m.registry).decode()
    assert not any(name.removesuffix("_total") in page for name in ALL)


def test_the_counters_read_the_loops_thread_and_every_thread_of_the_process(
    tmp_path: Path,
) -> None:
    tasks = _tasks(tmp_path, {7: "1000000000 500000000 10", 8: "0 300000000 3"})
    m = GatewayMetrics()
    assert m.count_schedstat(tasks / "7" / "schedstat", tasks) is True
    page = generate_latest(m.registry).decode()
    assert {name: _types(page)[name] for name in ALL} == dict.fromkeys(ALL, "counter")
    assert [_total(page, name) for name in ALL] == [0.0, 0.0, 0.0, 0.0]
    _tasks(tmp_path, {7: "3000000000 900000000 30", 8: "0 400000000 4"})
    page = generate_latest(m.registry).decode()
    assert [_total(page, name) for name in ALL] == [2.0, 0.4, 20.0, 0.5]
    # OpenMetrics carries the unit of the three in seconds
    om = generate_openmetrics(m.registry).decode()
    units = {line.split()[2]: line.split()[3] for line in om.splitlines()
             if line.startswith("# UNIT ")}
    assert {name.removesuffix("_total"): units.get(name.removesuffix("_total"))
            for name in ALL} == {
        "inferplane_event_loop_cpu_seconds": "seconds",
        "inferplane_event_loop_runqueue_wait_seconds": "seconds",
        "inferplane_event_loop_timeslices": None,
        "inferplane_process_runqueue_wait_seconds": "seconds",
    }


def test_a_collect_reads_the_loops_file_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One ``pread`` per scrape: the loop's three counters are one snapshot."""
    tasks = _tasks(tmp_path, {7: "1000000000 500000000 10"})
    m = GatewayMetrics()
    assert m.count_schedstat(tasks / "7" / "schedstat", tasks) is True
    preads: list[int] = []
    pread = os.pread

    def counting(fd: int, n: int, offset: int) -> bytes:
        preads.append(fd)
        return pread(fd, n, offset)

    monkeypatch.setattr(os, "pread", counting)
    generate_latest(m.registry)
    assert len(preads) == 1


def test_the_process_wait_keeps_threads_that_exited_and_new_threads_on_old_ids(
    tmp_path: Path,
) -> None:
    tasks = _tasks(tmp_path, {1: "0 1000 1", 2: "0 2000 1"})
    p = ProcessWait(tasks)
    assert p.available
    assert p.wait_s() == 0.0
    _tasks(tmp_path, {1: "0 1500 2", 2: "0 2500 2", 3: "0 100 1"})  # a thread started
    assert p.wait_s() == pytest.approx(1100e-9)
    _gone(tasks, 2)  # it keeps its 2500 as last read
    assert p.wait_s() == pytest.approx(1100e-9)
    _tasks(tmp_path, {1: "0 1600 3", 2: "0 50 1"})  # id 2 again, after a read without it
    assert p.wait_s() == pytest.approx((1600 + 2500 + 50 + 100 - 3000) * 1e-9)
    # id 1 reused between two reads, its directory never gone: the wait reads lower, so the
    # old thread's 1600 moves to the exited total and the new thread adds its 10
    _tasks(tmp_path, {1: "0 10 1"})
    assert p.wait_s() == pytest.approx(1260e-9)
    _tasks(tmp_path, {3: "oops"})  # unreadable: as last read
    assert p.wait_s() == pytest.approx(1260e-9)
    for tid in (1, 2, 3):  # every thread exits: each keeps what it had at its last read
        _gone(tasks, tid)
        assert p.wait_s() == pytest.approx(1260e-9)


def test_the_process_wait_stays_as_last_read_when_the_thread_list_goes(tmp_path: Path) -> None:
    tasks = _tasks(tmp_path, {1: "0 1000 1"})
    p = ProcessWait(tasks)
    _tasks(tmp_path, {1: "0 1500 2"})
    assert p.wait_s() == pytest.approx(500e-9)
    shutil.rmtree(tasks)
    assert p.wait_s() == pytest.approx(500e-9)


def test_no_thread_readable_means_no_process_wait(tmp_path: Path) -> None:
    assert ProcessWait(_tasks(tmp_path, {1: "x"})).available is False
    assert ProcessWait(tmp_path / "no-such-dir").available is False
    # older kernels without schedstat print 0 0 0 for every thread
    assert ProcessWait(_tasks(tmp_path, {1: "0 0 0", 2: "0 0 0\n"})).available is False


@linux_only
def test_this_threads_cpu_time_moves_with_the_cpu_it_burns() -> None:
    t = ThreadSchedstat()
    assert t.available
    before = time.thread_time()
    while time.thread_time() - before < 0.1:
        pass
    # schedstat's runtime of a running thread is brought up to date at the scheduler's tick
    # or when it stops running: a short sleep brings it level with time.thread_time
    time.sleep(0.001)
    t.sample()
    assert t.cpu_s() >= 0.1 - 1e-6
    t.close()


@linux_only
def test_a_held_file_reads_its_thread_from_another_and_stays_after_it_exits(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The file opened on a thread is that thread's, read from any thread; once the thread has
    exited the read fails (ESRCH) and the totals stay as last read."""
    made: list[ThreadSchedstat] = []
    burnt, leave = threading.Event(), threading.Event()

    def run() -> None:
        made.append(ThreadSchedstat())
        before = time.thread_time()
        while time.thread_time() - before < 0.1:
            pass
        time.sleep(0.001)  # brings its runtime up to date (above)
        burnt.set()
        leave.wait()

    thread = threading.Thread(target=run)
    thread.start()
    assert burnt.wait(60)
    [t] = made
    t.sample()  # from this thread, which burnt nothing meanwhile
    assert t.cpu_s() >= 0.1 - 1e-6
    leave.set()
    thread.join()
    for _ in range(1000):  # the OS thread ends just after join returns
        if not os.path.exists(f"/proc/self/task/{thread.native_id}"):
            break
        time.sleep(0.01)
    last = t.last
    with caplog.at_level(logging.DEBUG, logger="inferplane.telemetry"):
        assert t.sample() == last
    assert "no longer reads" in caplog.text
    t.close()


# -- served: GET /metrics of a running gateway --------------------------------------------------


upstream = test_send_gate.upstream  # the fixture: an upstream that answers at once


@linux_only
async def test_a_served_gateway_exports_its_loops_cpu_and_wait(upstream: HeldUpstream) -> None:
    gw = Gateway(parse_config(config(upstream.port, metrics={"public": True})))
    port = free_port()
    runner = await serve(gw, "127.0.0.1", port)
    try:
        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {KEY}"}) as http:

            async def scrape() -> dict[str, float]:
                async with http.get(f"http://127.0.0.1:{port}/metrics") as r:
                    assert r.status == 200
                    page = await r.text()
                assert {name: _types(page)[name] for name in ALL} == dict.fromkeys(
                    ALL, "counter")
                return {name: _total(page, name) for name in ALL}

            first = await scrape()
            burn = time.thread_time()  # on the loop's thread: the test runs on it
            while time.thread_time() - burn < 0.1:
                pass
            await asyncio.sleep(0.05)  # the loop's thread sleeps, then runs again: a new slice
            second = await scrape()
            assert second[LOOP[0]] - first[LOOP[0]] >= 0.1 - 1e-6
            assert second[LOOP[2]] > first[LOOP[2]]
            # the waits cannot be forced (they need another runnable thread on the CPU)
    finally:
        await runner.cleanup()
    loop_file = gw.metrics._loop_schedstat
    assert loop_file is not None and loop_file._fd is None  # closed when the gateway stopped
