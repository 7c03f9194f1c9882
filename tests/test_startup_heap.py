"""``gateway.gc_freeze``: a served process moves its start-up heap out of the collector's reach,
and gives it back after a reload so that the replaced fleet's reference cycles are reclaimed."""

from __future__ import annotations

import gc
import weakref

from inferplane.config.loader import parse_config
from inferplane.core.reload import freeze_heap, refreeze_after_reload
from tests.builders import MINIMAL_YAML


class _Node:
    def __init__(self) -> None:
        self.me = self  # a reference cycle: only the cyclic collector frees it


def test_freeze_moves_the_live_heap_out_of_the_collectors_reach_and_can_be_switched_off() -> None:
    assert gc.get_freeze_count() == 0
    try:
        freeze_heap(False)
        assert gc.get_freeze_count() == 0
        freeze_heap(True)
        assert gc.get_freeze_count() > 1000  # modules, classes, functions: all of it
    finally:
        gc.unfreeze()  # this process runs many gateways: give them back to the collector


def test_a_reload_gives_the_frozen_cycles_back_to_the_collector() -> None:
    assert gc.get_freeze_count() == 0
    old_fleet = [_Node()]
    gone = weakref.ref(old_fleet[0])
    try:
        freeze_heap(True)
        del old_fleet  # what a reload replaces: unreachable, but frozen
        gc.collect()
        assert gone() is not None  # a frozen cycle is never reclaimed while frozen
        refreeze_after_reload(True)
        assert gone() is None
        assert gc.get_freeze_count() > 1000  # and what is alive is frozen again
        refreeze_after_reload(False)  # a reload that switched gc_freeze off
        assert gc.get_freeze_count() == 0
    finally:
        gc.unfreeze()


def test_a_process_that_never_froze_its_heap_is_left_alone() -> None:
    assert gc.get_freeze_count() == 0
    refreeze_after_reload(True)  # tests and the simulator reload gateways without freezing
    assert gc.get_freeze_count() == 0


def test_the_default_is_on() -> None:
    assert parse_config(MINIMAL_YAML).gateway.gc_freeze is True
