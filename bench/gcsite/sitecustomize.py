"""bench/otel.py ``--gc``: count each process's garbage collections and the CPU time in them.

On the ``PYTHONPATH`` of the processes the bench starts (this directory is put first only with
``--gc``), Python imports this module at start-up. When ``INFERPLANE_BENCH_GC`` names a
directory, a `gc.callbacks` hook keeps, per generation, the collections so far and the CPU
seconds of the thread that ran them (``time.thread_time``: the collection's own CPU, not a
preempted wall time) in a small file ``<dir>/<pid>.gc`` mapped into memory, rewritten after each
collection (``<3q3d``: the counts, then the seconds, generations 0-2); the bench reads it before
and after each round. Every gateway process loads it, and so does its exporter process: the same
hook, so the same cost, in every variant.
"""

from __future__ import annotations

import gc
import mmap
import os
import struct
import time

LAYOUT = "<3q3d"
SIZE = struct.calcsize(LAYOUT)


def _install(folder: str) -> None:
    fd = os.open(os.path.join(folder, f"{os.getpid()}.gc"), os.O_RDWR | os.O_CREAT, 0o644)
    os.ftruncate(fd, SIZE)
    area = mmap.mmap(fd, SIZE)
    os.close(fd)
    counts = [0, 0, 0]
    seconds = [0.0, 0.0, 0.0]
    started = [0.0]
    clock = time.thread_time
    pack = struct.pack_into

    def hook(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            started[0] = clock()
            return
        gen = info["generation"]
        seconds[gen] += clock() - started[0]
        counts[gen] += 1
        pack(LAYOUT, area, 0, counts[0], counts[1], counts[2], seconds[0], seconds[1],
             seconds[2])

    gc.callbacks.append(hook)

    def forked() -> None:  # a forked child counts its own, in its own file
        gc.callbacks.remove(hook)
        _install(folder)

    os.register_at_fork(after_in_child=forked)


if os.environ.get("INFERPLANE_BENCH_GC"):
    _install(os.environ["INFERPLANE_BENCH_GC"])
