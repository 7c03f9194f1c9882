"""The dispatch gate's prefix test in placement: a gated endpoint (``profile.gated``) stays a
candidate for a request whose cached prefix there saves more prompt tokens than the best open
candidate's by more than the prompt tokens queued there for prefill (`framework._gated_for`)."""

from __future__ import annotations

import pytest

from inferplane.fleet.model import Fleet
from inferplane.placement.framework import Policy, place
from tests.placement_helpers import config, policies, profile, snapshot, state, sub

HASHES = tuple(range(1, 21))  # 20 prompt blocks
PROMPT = 10_000


def _setup(profile_name: str = "default") -> tuple[Fleet, Policy, str]:
    """A 3-endpoint fleet and a fresh policy that has placed the prompt once: the endpoint it
    picked holds the prompt's blocks in the policy's prefix index."""
    cfg = config(sub("eu", n=3))
    fl = Fleet.from_config(cfg)
    pol = policies(cfg)[profile_name]
    first = place(profile(block_hashes=HASHES, prompt_tokens=PROMPT), snapshot(fl), pol)
    assert first.picked is not None
    return fl, pol, first.picked.name


@pytest.mark.parametrize(("pending", "kept"), [(0, True), (2_000, True), (9_999, True),
                                               (10_000, False), (30_000, False)])
def test_a_gated_holder_stays_a_candidate_while_its_queue_costs_less_than_the_hit(
    pending: int, kept: bool
) -> None:
    fl, pol, holder = _setup()
    busy = state(inflight=1, inflight_tokens=pending + 200, pending_prefill=1,
                 pending_prefill_tokens=pending)
    prof = profile(request_id="r2", block_hashes=HASHES, prompt_tokens=PROMPT,
                   gated=frozenset({holder}))
    d = place(prof, snapshot(fl, {holder: busy}), pol)
    rec = d.candidate(holder)
    if kept:
        assert rec.rejected_by is None
        assert any("dispatch gate: kept " + holder in n for n in d.notes)
        assert d.picked is not None and d.picked.name == holder  # the scorers prefer the hit
    else:
        assert rec.rejected_by == "capacity"
        assert d.removed_by.get("capacity") == 1
        assert d.picked is not None and d.picked.name != holder


def test_the_saving_is_counted_over_the_best_open_candidate() -> None:
    """When an open endpoint holds the same prefix, waiting at the gated holder saves nothing."""
    fl, pol, holder = _setup()
    second = place(profile(request_id="r2", block_hashes=HASHES, prompt_tokens=PROMPT,
                           excluded=frozenset({holder})), snapshot(fl), pol)
    assert second.picked is not None and second.picked.name != holder  # now holds it too
    busy = state(inflight=1, inflight_tokens=1200, pending_prefill=1, pending_prefill_tokens=1000)
    prof = profile(request_id="r3", block_hashes=HASHES, prompt_tokens=PROMPT,
                   gated=frozenset({holder}))
    d = place(prof, snapshot(fl, {holder: busy}), pol)
    assert d.candidate(holder).rejected_by == "capacity"
    assert d.picked is not None and d.picked.name == second.picked.name


def test_without_a_prefix_reading_plugin_gated_endpoints_are_always_skipped() -> None:
    fl, pol, holder = _setup("round-robin")
    assert pol.prefix_holder is None
    prof = profile(request_id="r2", block_hashes=HASHES, prompt_tokens=PROMPT,
                   gated=frozenset({holder}))
    d = place(prof, snapshot(fl), pol)
    assert d.candidate(holder).rejected_by == "capacity"


def test_a_prompt_without_blocks_is_gated_as_before() -> None:
    fl, pol, holder = _setup()
    prof = profile(request_id="r2", prompt_tokens=PROMPT, gated=frozenset({holder}))
    d = place(prof, snapshot(fl), pol)
    assert d.candidate(holder).rejected_by == "capacity"
