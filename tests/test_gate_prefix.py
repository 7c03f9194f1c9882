"""The dispatch gate's prefix test in placement: a gated endpoint (``profile.gated``) stays a
candidate for a request whose cached prefix there saves more prompt tokens than the best open
candidate's by more than the prompt tokens queued there for prefill (`framework._gated_for`)."""

from __future__ import annotations

import pytest

from inferplane.fleet.model import Fleet
from inferplane.placement.framework import Policy, place
from tests.placement_helpers import MODEL, config, policies, profile, snapshot, state, sub

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


def test_an_open_endpoint_a_filter_removes_does_not_block_keeping_an_allowed_holder() -> None:
    """The keep test runs after the filters: ``us-0`` holds the prefix too but is outside the
    request's jurisdictions, so it does not count as the best open candidate."""
    cfg = config(sub("eu", n=2), sub("us", n=1, region="us-east", jurisdiction="us"))
    fl = Fleet.from_config(cfg)
    pol = policies(cfg)["default"]
    for i, allowed in ((1, "eu-1"), (2, "us-0")):
        d = place(profile(request_id=f"w{i}", block_hashes=HASHES, prompt_tokens=PROMPT,
                          excluded=frozenset({"eu-0", "eu-1", "us-0"} - {allowed})),
                  snapshot(fl), pol)
        assert d.picked is not None and d.picked.name == allowed
    busy = state(inflight=1, inflight_tokens=1200, pending_prefill=1, pending_prefill_tokens=1000)
    prof = profile(request_id="r", block_hashes=HASHES, prompt_tokens=PROMPT,
                   allowed_jurisdictions=frozenset({"eu"}), gated=frozenset({"eu-1"}))
    d = place(prof, snapshot(fl, {"eu-1": busy}), pol)
    assert d.candidate("us-0").rejected_by == "jurisdiction"
    assert d.candidate("eu-1").rejected_by is None
    assert any("dispatch gate: kept eu-1" in n for n in d.notes)
    assert d.picked is not None and d.picked.name == "eu-1"


def test_a_gated_holder_a_filter_removes_stays_removed_by_that_filter() -> None:
    cfg = config(sub("eu", n=1), sub("us", n=1, region="us-east", jurisdiction="us"))
    fl = Fleet.from_config(cfg)
    pol = policies(cfg)["default"]
    d = place(profile(request_id="w", block_hashes=HASHES, prompt_tokens=PROMPT,
                      excluded=frozenset({"eu-0"})), snapshot(fl), pol)
    assert d.picked is not None and d.picked.name == "us-0"
    prof = profile(request_id="r", block_hashes=HASHES, prompt_tokens=PROMPT,
                   allowed_jurisdictions=frozenset({"eu"}), gated=frozenset({"us-0"}))
    d = place(prof, snapshot(fl), pol)
    assert d.candidate("us-0").rejected_by == "jurisdiction"
    assert d.picked is not None and d.picked.name == "eu-0"
    assert not any("dispatch gate: kept" in n for n in d.notes)


def _mixed(gated_hw: str, open_hw: str, open_blocks: int) -> tuple[Fleet, Policy, float, float]:
    """A gated endpoint ``g-0`` on ``gated_hw`` holding the whole prompt and an open ``o-0`` on
    ``open_hw`` holding its first ``open_blocks`` blocks; their prefill seconds per token."""
    cfg = config(sub("g", hardware=gated_hw), sub("o", hardware=open_hw))
    fl = Fleet.from_config(cfg)
    pol = policies(cfg)["default"]
    d = place(profile(request_id="w1", block_hashes=HASHES, prompt_tokens=PROMPT,
                      excluded=frozenset({"o-0"})), snapshot(fl), pol)
    assert d.picked is not None and d.picked.name == "g-0"
    if open_blocks:
        part = HASHES[:open_blocks]
        d = place(profile(request_id="w2", block_hashes=part,
                          prompt_tokens=PROMPT * open_blocks // len(HASHES),
                          excluded=frozenset({"g-0"})), snapshot(fl), pol)
        assert d.picked is not None and d.picked.name == "o-0"
    t_g = fl.by_name["g-0"].prefill_s_per_token(MODEL)
    t_o = fl.by_name["o-0"].prefill_s_per_token(MODEL)
    assert t_g is not None and t_o is not None
    return fl, pol, t_g, t_o


def _kept(fl: Fleet, pol: Policy, pending: int) -> bool:
    busy = state(inflight=1, inflight_tokens=pending + 200, pending_prefill=1,
                 pending_prefill_tokens=pending)
    prof = profile(request_id=f"r{pending}", block_hashes=HASHES, prompt_tokens=PROMPT,
                   gated=frozenset({"g-0"}))
    return place(prof, snapshot(fl, {"g-0": busy}), pol).candidate("g-0").rejected_by is None


def test_on_mixed_hardware_a_slow_gated_holder_is_kept_while_its_queue_is_shorter_in_seconds(
) -> None:
    """Gated on an A100, open on an H100 holding nothing: the queue there is compared in
    seconds (pending × t_A100 against the whole prompt × t_H100), not in tokens."""
    fl, pol, t_g, t_o = _mixed("a100", "h100", 0)
    assert t_g > 2 * t_o
    limit = PROMPT * t_o / t_g  # the queue at which waiting costs what prefilling on H100 does
    assert _kept(fl, pol, int(limit * 0.9))
    assert not _kept(fl, pol, int(limit * 1.1))  # in tokens (< 10,000) it would be kept


def test_on_mixed_hardware_a_fast_gated_holder_is_kept_past_the_token_saving() -> None:
    """Gated on an H100 holding the prompt, open on an A100 holding half of it: a queue longer
    than the 5,000 tokens saved is still shorter than prefilling them on the A100, up to the
    prompt tokens the holder has cached (a queue longer than that is never worth waiting on)."""
    fl, pol, t_g, t_o = _mixed("h100", "a100", 10)
    half = PROMPT // 2
    assert half * t_o / t_g > PROMPT  # in seconds the A100's 5,000 cost more than 10,000 here
    assert _kept(fl, pol, int(half * 1.2))  # in tokens (> 5,000 saved) it would be skipped
    assert _kept(fl, pol, PROMPT - 1)
    assert not _kept(fl, pol, PROMPT)


@pytest.mark.parametrize(("pending", "left_s", "kept"), [
    (30_000, 0.0, True),  # a long prefill nearly done: only what is left of it counts
    (30_000, None, False),  # no prediction: all of its pending tokens count, as before
    (2_000, None, True),
])
def test_a_gated_holder_counts_what_is_left_of_its_queued_prefill(
    pending: int, left_s: float | None, kept: bool
) -> None:
    """With the first tokens predicted for the requests pending there
    (`EndpointState.prefill_done_at`), the wait at a gated holder is the time until then, not
    its pending prompt tokens' whole prefill: a prefill that has been running for a while
    costs only what is left of it."""
    fl, pol, holder = _setup()
    now = 100.0
    t = fl.by_name[holder].prefill_s_per_token(MODEL)
    assert t is not None
    done_at = None if left_s is None else now + left_s + 0.1 * t * PROMPT
    busy = state(inflight=1, inflight_tokens=pending + 200, pending_prefill=1,
                 pending_prefill_tokens=pending, prefill_done_at=done_at)
    prof = profile(request_id="r2", block_hashes=HASHES, prompt_tokens=PROMPT,
                   gated=frozenset({holder}))
    d = place(prof, snapshot(fl, {holder: busy}, now=now), pol)
    assert (d.candidate(holder).rejected_by is None) is kept
    assert any("dispatch gate: kept " + holder in n for n in d.notes) is kept


@pytest.mark.parametrize(("pending", "kept"), [(30_000, False), (10_000, False), (2_000, True)])
def test_an_overdue_prediction_counts_the_pending_tokens_again(pending: int, kept: bool) -> None:
    """A predicted first token that has passed while requests are still pending there (the
    prediction was too low) says nothing about what is left: the wait is their pending tokens'
    prefill again, as without a prediction — not 0, which would keep the holder whatever is
    queued there."""
    fl, pol, holder = _setup()
    now = 100.0
    busy = state(inflight=1, inflight_tokens=pending + 200, pending_prefill=1,
                 pending_prefill_tokens=pending, prefill_done_at=now - 5.0)
    prof = profile(request_id="r2", block_hashes=HASHES, prompt_tokens=PROMPT,
                   gated=frozenset({holder}))
    d = place(prof, snapshot(fl, {holder: busy}, now=now), pol)
    assert (d.candidate(holder).rejected_by is None) is kept
    assert any("dispatch gate: kept " + holder in n for n in d.notes) is kept


@pytest.mark.parametrize(("pending", "kept"), [(30_000, False), (10_000, False), (9_999, True)])
def test_a_gated_holder_without_a_physics_model_is_judged_in_tokens(
    pending: int, kept: bool
) -> None:
    """No roofline (llama-3.1-70b does not fit one H100): the predicted first token, in seconds
    (an observed TTFT), is not compared with a saving in tokens; the wait is the pending tokens,
    as before predictions were counted."""
    model = "llama-3.1-70b"
    cfg = config(sub("eu", n=3, models=[{"name": model, "max_context": 32768}]))
    fl = Fleet.from_config(cfg)
    assert fl.endpoints[0].prefill_s_per_token(model) is None
    pol = policies(cfg)["default"]
    first = place(profile(model=model, block_hashes=HASHES, prompt_tokens=PROMPT),
                  snapshot(fl), pol)
    assert first.picked is not None
    holder = first.picked.name
    now = 100.0
    busy = state(inflight=1, inflight_tokens=pending + 200, pending_prefill=1,
                 pending_prefill_tokens=pending, prefill_done_at=now + 0.5)
    prof = profile(request_id="r2", model=model, block_hashes=HASHES, prompt_tokens=PROMPT,
                   gated=frozenset({holder}))
    d = place(prof, snapshot(fl, {holder: busy}, now=now), pol)
    assert (d.candidate(holder).rejected_by is None) is kept


@pytest.mark.parametrize(("left_tokens", "kept"), [(9_000, True), (11_000, False)])
def test_a_predicted_wait_longer_than_the_hit_drops_the_holder(
    left_tokens: int, kept: bool
) -> None:
    """The prediction counts both ways: a holder with few pending tokens whose predicted first
    token is further away than the prefill its cached prefix saves is skipped (the 10,000-token
    prompt is held whole there, so the saving is 10,000 tokens' prefill)."""
    fl, pol, holder = _setup()
    now = 50.0
    t = fl.by_name[holder].prefill_s_per_token(MODEL)
    assert t is not None
    busy = state(inflight=1, inflight_tokens=1200, pending_prefill=1, pending_prefill_tokens=1000,
                 prefill_done_at=now + left_tokens * t)
    prof = profile(request_id="r2", block_hashes=HASHES, prompt_tokens=PROMPT,
                   gated=frozenset({holder}))
    d = place(prof, snapshot(fl, {holder: busy}, now=now), pol)
    assert (d.candidate(holder).rejected_by is None) is kept
