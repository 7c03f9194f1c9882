"""``gateway.gc_freeze``: a served process moves its start-up heap out of the collector's reach."""

from __future__ import annotations

import gc

from inferplane.cli import freeze_startup_heap
from inferplane.config.loader import parse_config
from tests.builders import MINIMAL_YAML


def test_freeze_moves_the_live_heap_out_of_the_collectors_reach_and_can_be_switched_off() -> None:
    assert gc.get_freeze_count() == 0
    try:
        freeze_startup_heap(False)
        assert gc.get_freeze_count() == 0
        freeze_startup_heap(True)
        assert gc.get_freeze_count() > 1000  # modules, classes, functions: all of it
    finally:
        gc.unfreeze()  # this process runs many gateways: give them back to the collector


def test_the_default_is_on() -> None:
    assert parse_config(MINIMAL_YAML).gateway.gc_freeze is True
