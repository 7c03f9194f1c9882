"""The inverted prefix index against a reference model: per-endpoint LRU dicts of block hashes
(the layout it replaced), under random records, KV-event stores and removals, clears, forgets
and capacity changes. Every answer — one endpoint's match, every endpoint's match in one walk,
sizes, coverage — must agree after every operation."""

from __future__ import annotations

from collections import OrderedDict

from hypothesis import given, settings
from hypothesis import strategies as st

from inferplane.fleet.prefix_index import PrefixIndex

ENDPOINTS = [f"e{i}" for i in range(6)]


class Reference:
    """Per-endpoint ordered dicts: obviously correct, O(endpoints) per lookup."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.caps: dict[str, int] = {}
        self.blocks: dict[str, OrderedDict[int, None]] = {}
        self.covered: set[str] = set()

    def cap(self, e: str) -> int:
        return self.caps.get(e, self.capacity)

    def evict(self, e: str) -> None:
        held = self.blocks.get(e)
        if held is not None and self.cap(e) > 0:
            while len(held) > self.cap(e):
                held.popitem(last=False)

    def record(self, e: str, hashes: list[int]) -> None:
        self.covered.add(e)
        held = self.blocks.setdefault(e, OrderedDict())
        for h in hashes:
            if h in held:
                held.move_to_end(h)
            else:
                held[h] = None
        self.evict(e)

    def removed(self, e: str, hashes: list[int]) -> None:
        self.covered.add(e)
        for h in hashes:
            self.blocks.get(e, OrderedDict()).pop(h, None)

    def cleared(self, e: str) -> None:
        self.covered.add(e)
        self.blocks.pop(e, None)

    def forget(self, e: str) -> None:
        self.covered.discard(e)
        self.blocks.pop(e, None)

    def set_capacity(self, e: str, n: int) -> None:
        self.caps[e] = n
        self.evict(e)

    def match(self, e: str, hashes: list[int]) -> int:
        held = self.blocks.get(e, OrderedDict())
        n = 0
        for h in hashes:
            if h not in held:
                break
            n += 1
        return n


# A small alphabet of block hashes so that endpoints share blocks and chains collide.
chains = st.lists(st.integers(0, 11), min_size=0, max_size=8)
ops = st.lists(
    st.one_of(
        st.tuples(st.just("record"), st.sampled_from(ENDPOINTS), chains),
        st.tuples(st.just("removed"), st.sampled_from(ENDPOINTS), chains),
        st.tuples(st.just("cleared"), st.sampled_from(ENDPOINTS), st.just([])),
        st.tuples(st.just("forget"), st.sampled_from(ENDPOINTS), st.just([])),
        st.tuples(st.just("capacity"), st.sampled_from(ENDPOINTS), st.lists(
            st.integers(1, 6), min_size=1, max_size=1)),
        st.tuples(st.just("sweep"), st.just(""), st.just([])),
    ),
    max_size=60,
)


@settings(max_examples=150, deadline=None)
@given(capacity=st.sampled_from([0, 3, 5]), ops=ops, probes=st.lists(chains, min_size=3,
                                                                      max_size=3))
def test_inverted_index_agrees_with_per_endpoint_lru(
    capacity: int, ops: list[tuple[str, str, list[int]]], probes: list[list[int]]
) -> None:
    idx, ref = PrefixIndex(capacity, sweep_at=2), Reference(capacity)  # sweeps often
    for step, (op, e, arg) in enumerate(ops):
        if op == "record":
            idx.record(e, arg if step % 2 else iter(arg))  # a sequence, or any iterable
            ref.record(e, arg)
        elif op == "removed":
            idx.block_removed(e, arg)
            ref.removed(e, arg)
        elif op == "cleared":
            idx.all_cleared(e)
            ref.cleared(e)
        elif op == "forget":
            idx.forget(e)
            ref.forget(e)
        elif op == "capacity":
            if capacity == 0:
                continue  # an unbounded endpoint keeps no LRU order: bounding it later evicts
                # in no particular order (the KV-event mirror is never bounded)
            idx.set_capacity(e, arg[0])
            ref.set_capacity(e, arg[0])
        else:
            idx.sweep()
        for probe in probes:
            every = idx.match_lengths(probe)
            for name in ENDPOINTS:
                want = ref.match(name, probe)
                assert idx.match_length(name, probe) == want
                assert every.get(name, 0) == want
                assert (name in every) == (want > 0)
            # the longest runs, longest first: every length as the reference has it
            wants = sorted((n for n in (ref.match(x, probe) for x in ENDPOINTS) if n), reverse=True)
            top = idx.longest(probe, 3)
            assert [n for _, n in top] == wants[:3]
            assert all(ref.match(x, probe) == n for x, n in top)
        for name in ENDPOINTS:
            assert idx.size(name) == len(ref.blocks.get(name, ())), name
            assert idx.covers(name) == (name in ref.covered)
    held = set().union(*ref.blocks.values()) if ref.blocks else set()
    idx.sweep()
    assert idx.distinct_blocks() == len(held)  # no leaked entries once retired slots are swept


def test_one_walk_reports_where_each_endpoint_drops_out() -> None:
    idx = PrefixIndex()
    idx.block_stored("a", [1, 2, 3, 4])
    idx.block_stored("b", [1, 2])
    idx.block_stored("c", [1, 2, 3, 4, 5])
    idx.block_stored("d", [9])
    assert idx.match_lengths([1, 2, 3, 4, 5, 6]) == {"b": 2, "a": 4, "c": 5}
    assert idx.match_lengths([9, 1]) == {"d": 1}
    assert idx.match_lengths([7]) == {}
    assert idx.match_lengths([]) == {}
    assert idx.distinct_blocks() == 6  # block 1 is one entry for three endpoints


def test_a_cleared_endpoint_gets_a_fresh_slot_and_holds_nothing_old() -> None:
    idx = PrefixIndex()
    idx.block_stored("a", [1, 2, 3])
    idx.block_stored("b", [1, 2])
    idx.all_cleared("a")
    assert idx.covers("a") and idx.size("a") == 0
    assert idx.match_lengths([1, 2, 3]) == {"b": 2}
    idx.block_stored("a", [1])  # new blocks after the reset count, the old ones do not
    assert idx.match_lengths([1, 2, 3]) == {"a": 1, "b": 2}
    idx.block_removed("a", [1, 2, 3])
    assert idx.size("a") == 0 and idx.match_length("a", [1]) == 0
    idx.sweep()
    assert idx.distinct_blocks() == 2


def test_longest_reads_out_only_the_longest_runs() -> None:
    idx = PrefixIndex()
    for i in range(50):
        idx.block_stored(f"e{i}", [1, 2])  # a prefix everyone shares
    idx.block_stored("deep", [1, 2, 3, 4, 5])
    idx.block_stored("mid", [1, 2, 3])
    assert idx.longest([1, 2, 3, 4, 5, 6], 2) == [("deep", 5), ("mid", 3)]
    top = idx.longest([1, 2, 3, 4], 3)
    assert top[:2] == [("deep", 4), ("mid", 3)] and top[2][1] == 2
    assert idx.longest([1], 100) == [(n, 1) for n, _ in sorted(
        idx.match_lengths([1]).items(), key=lambda kv: idx.mask_of([kv[0]]))]
    assert idx.longest([9], 3) == [] and idx.longest([1, 2], 0) == []


def test_match_lengths_among_some_endpoints() -> None:
    idx = PrefixIndex()
    idx.block_stored("a", [1, 2, 3])
    idx.block_stored("b", [1, 2])
    idx.block_stored("c", [1])
    assert idx.match_lengths([1, 2, 3], idx.mask_of(["b", "c", "unknown"])) == {"b": 2, "c": 1}
    assert idx.match_lengths([1, 2, 3], idx.mask_of([])) == {}
