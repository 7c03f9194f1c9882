"""`tests/fidelity/cores.py`: the engine core joins the worker's cores, the API server and the
caller get the rest, and everything is put back — on real processes named as vLLM's are."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fidelity.cores import ENGINE_CORE, WORKER, descendants, split_cores

pytestmark = pytest.mark.skipif(
    not hasattr(os, "sched_setaffinity") or len(os.sched_getaffinity(0)) < 2
    or not Path("/proc/self/comm").exists(),
    reason="needs Linux affinity and at least two CPUs",
)

# An "API server" that starts an engine core and a worker, each renaming itself as vLLM's do;
# the worker binds itself to the first allowed CPU, as vLLM binds its OpenMP threads.
SERVER = f"""
import os, subprocess, sys, time
child = '''
import os, sys, time
open("/proc/self/comm", "w").write(sys.argv[1])
if sys.argv[1] == {WORKER!r}:
    os.sched_setaffinity(0, {{min(os.sched_getaffinity(0))}})
print("ready", flush=True)
time.sleep(60)
'''
kids = [subprocess.Popen([sys.executable, "-c", child, name], stdout=subprocess.PIPE, text=True)
        for name in ({ENGINE_CORE!r}, {WORKER!r})]
for k in kids:
    k.stdout.readline()
print("ready", flush=True)
time.sleep(60)
"""


@pytest.fixture
def server() -> Iterator[subprocess.Popen[str]]:
    p = subprocess.Popen([sys.executable, "-c", SERVER], stdout=subprocess.PIPE, text=True,
                         start_new_session=True)
    try:
        assert p.stdout is not None and p.stdout.readline().strip() == "ready"
        yield p
    finally:
        os.killpg(p.pid, 9)
        p.wait(10)
        if p.stdout is not None:
            p.stdout.close()


def _named(pid: int, name: str) -> int:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        for child in descendants(pid):
            if Path(f"/proc/{child}/comm").read_text().strip() == name:
                return child
        time.sleep(0.05)
    raise AssertionError(f"no {name} below {pid}")


def test_engine_core_joins_the_worker_and_the_front_end_gets_the_rest(
    server: subprocess.Popen[str],
) -> None:
    allowed = os.sched_getaffinity(0)
    worker, core = _named(server.pid, WORKER), _named(server.pid, ENGINE_CORE)
    engine = {min(allowed)}
    assert os.sched_getaffinity(worker) == engine
    before = {p: os.sched_getaffinity(p) for p in (core, server.pid, os.getpid())}
    with split_cores(server.pid) as layout:
        assert layout == {"engine core + worker": sorted(engine),
                          "API server + client": sorted(allowed - engine)}
        assert os.sched_getaffinity(core) == engine
        assert os.sched_getaffinity(server.pid) == allowed - engine
        assert os.sched_getaffinity(0) == allowed - engine
        assert os.sched_getaffinity(worker) == engine  # left as vLLM bound it
    assert {p: os.sched_getaffinity(p) for p in before} == before


def test_a_thread_started_while_pinned_is_put_back_too(server: subprocess.Popen[str]) -> None:
    """A thread inherits its creator's mask: one started inside the block (an executor's, a
    tokenizer's) must not stay pinned after it."""
    allowed = os.sched_getaffinity(0)
    stop = threading.Event()
    started: list[int] = []

    def run() -> None:
        started.append(threading.get_native_id())
        stop.wait(30)

    thread = threading.Thread(target=run)
    try:
        with split_cores(server.pid) as layout:
            assert layout
            thread.start()
            while not started:
                time.sleep(0.01)
            assert os.sched_getaffinity(started[0]) == allowed - {min(allowed)}
        assert os.sched_getaffinity(started[0]) == allowed
        assert os.sched_getaffinity(0) == allowed
    finally:
        stop.set()
        thread.join(10)


def test_nothing_is_pinned_without_a_vllm_below() -> None:
    p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        before = os.sched_getaffinity(0)
        with split_cores(p.pid) as layout:
            assert layout == {}
            assert os.sched_getaffinity(0) == before
    finally:
        p.kill()
        p.wait(10)
