"""The gateway's wait for a CPU on /metrics: Linux's schedstat read at scrape time
(`telemetry.schedstat`) and exported as counters (`GatewayMetrics.count_schedstat`): the event
loop's thread's CPU time, wait and time slices, and the whole process's wait. Fake ``/proc``
trees check the parser and the bookkeeping (bad content, threads that exit, reused ids); a
served gateway checks the real counters on Linux."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from pathlib import Path

import aiohttp
import pytest
from prometheus_client import generate_latest

from inferplane.api.app import serve
from inferplane.api.pipeline import Gateway
from inferplane.config.loader import parse_config
from inferplane.telemetry import schedstat
from inferplane.telemetry.metrics import GatewayMetrics
from inferplane.telemetry.schedstat import ProcessWait, Schedstat, ThreadSchedstat, parse
from tests import test_send_gate
from tests.support.procs import free_port
from tests.test_dispatch_gate import KEY, HeldUpstream, config
from tests.test_metric_counters import _families, _total, _types

LOOP = ("inferplane_event_loop_cpu_seconds_total",
        "inferplane_event_loop_cpu_wait_seconds_total",
        "inferplane_event_loop_timeslices_total")
PROCESS = "inferplane_process_cpu_wait_seconds_total"
ALL = (*LOOP, PROCESS)

LINUX_SCHEDSTAT = (schedstat.TASKS / str(threading.get_native_id()) / "schedstat").exists()


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
    ("\x00\x01\x02", None),
])
def test_parse(text: str, expected: Schedstat | None) -> None:
    assert parse(text) == expected


def _tasks(tmp_path: Path, threads: dict[int, str]) -> Path:
    """A fake ``/proc/self/task``: one directory per thread id, holding its schedstat text."""
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
    t = ThreadSchedstat(7, tasks)
    assert t.available
    assert (t.cpu_s(), t.wait_s(), t.slices()) == (0.0, 0.0, 0.0)
    _tasks(tmp_path, {7: "1250000000 600000000 14\n"})
    assert (t.cpu_s(), t.wait_s(), t.slices()) == (0.25, 0.1, 4.0)
    for bad in ("garbage", "1 2", "1000000000 500000000 9\n"):  # unreadable, or gone down
        _tasks(tmp_path, {7: bad})
        assert (t.cpu_s(), t.wait_s(), t.slices()) == (0.25, 0.1, 4.0)
    _gone(tasks, 7)  # the thread ended
    assert (t.cpu_s(), t.wait_s(), t.slices()) == (0.25, 0.1, 4.0)
    _tasks(tmp_path, {7: "2000000000 700000000 20\n"})
    assert (t.cpu_s(), t.wait_s(), t.slices()) == (1.0, 0.2, 10.0)


@pytest.mark.parametrize("content", [None, "", "1 2", "not a schedstat file"])
def test_no_readable_schedstat_exports_nothing_and_says_so_once(
    tmp_path: Path, content: str | None, caplog: pytest.LogCaptureFixture
) -> None:
    """Not Linux (no /proc), a kernel without schedstat, or a file that reads wrong: the four
    series are absent, nothing raises, one debug line says why."""
    tasks = _tasks(tmp_path, {} if content is None else {7: content})
    m = GatewayMetrics()
    with caplog.at_level(logging.DEBUG, logger="inferplane.telemetry"):
        assert m.count_schedstat(7, tasks) is False
    assert [r.levelno for r in caplog.records] == [logging.DEBUG]
    assert "schedstat" in caplog.records[0].getMessage()
    page = generate_latest(m.registry).decode()
    assert not any(name.removesuffix("_total") in page for name in ALL)
    assert m.count_schedstat(7, tmp_path / "no-such-dir") is False


def test_the_counters_read_the_loops_thread_and_every_thread_of_the_process(
    tmp_path: Path,
) -> None:
    tasks = _tasks(tmp_path, {7: "1000000000 500000000 10", 8: "0 300000000 3"})
    m = GatewayMetrics()
    assert m.count_schedstat(7, tasks) is True
    page = generate_latest(m.registry).decode()
    assert {name: _types(page)[name] for name in ALL} == dict.fromkeys(ALL, "counter")
    assert [_total(page, name) for name in ALL] == [0.0, 0.0, 0.0, 0.0]
    _tasks(tmp_path, {7: "3000000000 900000000 30", 8: "0 400000000 4"})
    page = generate_latest(m.registry).decode()
    assert [_total(page, name) for name in ALL] == [2.0, 0.4, 20.0, 0.5]
    # seconds, as the names say (OpenMetrics would carry the unit)
    assert _families(page)["inferplane_event_loop_cpu_seconds"].type == "counter"


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
    _tasks(tmp_path, {1: "0 1600 3", 2: "0 50 1"})  # id 2 again: a new thread (less wait)
    assert p.wait_s() == pytest.approx((1600 + 2500 + 50 + 100 - 3000) * 1e-9)
    _tasks(tmp_path, {3: "oops"})  # unreadable: as last read
    assert p.wait_s() == pytest.approx(1250e-9)
    seen = [p.wait_s()]
    for tid in (1, 2, 3):
        _gone(tasks, tid)
        seen.append(p.wait_s())
    assert seen == sorted(seen)  # never down
    assert seen[-1] == pytest.approx(1250e-9)


def test_no_thread_readable_means_no_process_wait(tmp_path: Path) -> None:
    assert ProcessWait(_tasks(tmp_path, {1: "x"})).available is False
    assert ProcessWait(tmp_path / "no-such-dir").available is False


@pytest.mark.skipif(not LINUX_SCHEDSTAT, reason="needs Linux's /proc/self/task/TID/schedstat")
def test_this_threads_cpu_time_moves_with_the_cpu_it_burns() -> None:
    t = ThreadSchedstat(threading.get_native_id())
    assert t.available
    before = time.thread_time()
    while time.thread_time() - before < 0.1:
        pass
    # schedstat's runtime of a running thread is brought up to date at the scheduler's tick
    # or when it stops running: a short sleep brings it level with time.thread_time
    time.sleep(0.001)
    assert t.cpu_s() >= 0.1 - 1e-6
    assert t.wait_s() >= 0.0


# -- served: GET /metrics of a running gateway --------------------------------------------------


upstream = test_send_gate.upstream  # the fixture: an upstream that answers at once


@pytest.mark.skipif(not LINUX_SCHEDSTAT, reason="needs Linux's /proc/self/task/TID/schedstat")
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
            assert all(v >= 0.0 for v in first.values())
            burn = time.thread_time()  # on the loop's thread: the test runs on it
            while time.thread_time() - burn < 0.1:
                pass
            await asyncio.sleep(0.05)  # the loop's thread sleeps, then runs again: a new slice
            second = await scrape()
            assert second[LOOP[0]] - first[LOOP[0]] >= 0.1 - 1e-6
            assert second[LOOP[2]] > first[LOOP[2]]
            await asyncio.sleep(0.05)
            third = await scrape()
            # the waits cannot be forced: they only never go down
            for name in ALL:
                assert first[name] <= second[name] <= third[name]
    finally:
        await runner.cleanup()
