"""``gateway.gc_freeze``: a served process moves its start-up heap out of the collector's reach,
and gives it back after a reload so that the replaced fleet's reference cycles are reclaimed."""

from __future__ import annotations

import gc
import weakref

from inferplane.config.loader import parse_config
from inferplane.core.reload import freeze_heap, refreeze_after_reload, unfreeze_heap
from tests.builders import MINIMAL_YAML


class _Node:
    def __init__(self) -> None:
        self.me = self  # a reference cycle: only the cyclic collector frees it


# CPython 3.12 starts a process with a few hundred objects already frozen (375 on 3.12.1; none on
# 3.11 and 3.13), so the counts below are taken relative to what the process held at the start.


def test_freeze_moves_the_live_heap_out_of_the_collectors_reach_and_can_be_switched_off() -> None:
    start = gc.get_freeze_count()
    try:
        freeze_heap(False)
        assert gc.get_freeze_count() == start
        freeze_heap(True)
        assert gc.get_freeze_count() > start + 1000  # modules, classes, functions: all of it
    finally:
        unfreeze_heap()  # this process runs many gateways: give them back to the collector
    assert gc.get_freeze_count() == 0


def test_a_reload_gives_the_frozen_cycles_back_to_the_collector() -> None:
    start = gc.get_freeze_count()
    old_fleet = [_Node()]
    gone = weakref.ref(old_fleet[0])
    try:
        freeze_heap(True)
        del old_fleet  # what a reload replaces: unreachable, but frozen
        gc.collect()
        assert gone() is not None  # a frozen cycle is never reclaimed while frozen
        refreeze_after_reload(True)
        assert gone() is None
        assert gc.get_freeze_count() > start + 1000  # and what is alive is frozen again
        refreeze_after_reload(False)  # a reload that switched gc_freeze off
        assert gc.get_freeze_count() == 0
    finally:
        unfreeze_heap()


def test_a_process_that_never_froze_its_heap_is_left_alone() -> None:
    """Tests and the simulator reload gateways without freezing: a reload must not freeze (or
    collect) their heap, also on an interpreter that starts with frozen objects of its own."""
    keep = _Node()
    gc.freeze()  # objects frozen by someone else than freeze_heap (CPython 3.12 at start-up)
    try:
        before = gc.get_freeze_count()
        assert before > 0
        refreeze_after_reload(True)
        assert gc.get_freeze_count() == before
    finally:
        gc.unfreeze()
    del keep


def test_the_default_is_on() -> None:
    assert parse_config(MINIMAL_YAML).gateway.gc_freeze is True
