"""Placement of new prefixes by cache room (prefix-affinity's ``room_weight``): the part of a
prompt no endpoint holds goes where the cache holds least (``room_by: size``) or was written
least recently (``writes``), as the cache-aware routers place a request without a good match;
a held prefix keeps its pull."""

from __future__ import annotations

from typing import Any

from inferplane.fleet.prefix_index import PrefixIndex
from inferplane.placement.hashing import prompt_block_hashes
from tests.placement_helpers import (
    MODEL,
    config,
    cycle,
    fleet,
    plugin,
    profile,
    snapshot,
    sub,
    views,
)

FLEET = fleet(sub("a", n=3))
A = prompt_block_hashes(MODEL, "first conversation " * 200)
B = prompt_block_hashes(MODEL, "second conversation " * 200)
NEW = prompt_block_hashes(MODEL, "never seen before " * 200)


def scored(p: Any, hashes: tuple[int, ...], index: PrefixIndex | None = None,
           now: float = 0.0) -> dict[str, float]:
    snap = snapshot(FLEET, prefix_index=index, now=now)
    cyc = cycle(profile(block_hashes=hashes), snap)
    cands = views(snap)
    vals = p.score(cyc, cands)
    assert all(0.0 <= v <= 1.0 for v in vals)
    return {c.name: v for c, v in zip(cands, vals, strict=True)}


def pick(p: Any, name: str, hashes: tuple[int, ...], now: float = 0.0) -> None:
    snap = snapshot(FLEET, now=now)
    cyc = cycle(profile(block_hashes=hashes), snap)
    p.score(cyc, views(snap))
    p.on_picked(cyc, snap.by_name[name])


def test_off_by_default_a_new_prefix_scores_zero_everywhere() -> None:
    p = plugin("prefix-affinity")
    pick(p, "a-0", A)
    assert scored(p, NEW) == {"a-0": 0.0, "a-1": 0.0, "a-2": 0.0}


def test_size_a_new_prefix_goes_where_the_index_holds_least() -> None:
    p = plugin("prefix-affinity", room_weight=1.0, room_by="size")
    pick(p, "a-0", A)
    pick(p, "a-0", B)
    pick(p, "a-1", A)
    s = scored(p, NEW)
    assert s["a-2"] == 1.0 and s["a-0"] == 0.0 and 0.0 < s["a-1"] < 1.0


def test_size_reads_the_kv_event_index_where_it_covers() -> None:
    idx = PrefixIndex()
    idx.block_stored("a-0", A + B)
    idx.block_stored("a-1", A)
    idx.block_stored("a-2", ())  # covered, holds nothing
    p = plugin("prefix-affinity", room_weight=1.0, room_by="size")
    s = scored(p, NEW, idx)
    assert s["a-2"] == 1.0 and s["a-0"] == 0.0


def test_writes_decay_so_old_writes_weigh_less() -> None:
    p = plugin("prefix-affinity", room_weight=1.0, room_by="writes", room_halflife_s=10.0)
    pick(p, "a-0", A, now=0.0)  # long ago
    pick(p, "a-1", A[:4], now=95.0)  # recently, fewer blocks
    s = scored(p, NEW, now=100.0)
    assert s["a-2"] == 1.0  # nothing written
    assert s["a-0"] > s["a-1"]  # its many blocks were written ten half-lives ago


def test_a_held_prefix_keeps_its_pull() -> None:
    p = plugin("prefix-affinity", room_weight=0.5, room_by="size")
    pick(p, "a-0", A)
    pick(p, "a-0", B)
    s = scored(p, A)
    assert s["a-0"] == 1.0  # holds the whole prompt: nothing is new, room does not count
    assert s["a-1"] == s["a-2"] == 0.0
    half = A[: len(A) // 2] + NEW[len(A) // 2:]
    s = scored(p, half)
    assert s["a-0"] > s["a-1"] == s["a-2"]  # the half it holds outweighs the others' room
    assert s["a-1"] == 0.5 * 0.5  # room × the new half × room_weight


def test_default_profile_ships_room_off() -> None:
    from inferplane.placement.build import build_policies

    pol = build_policies(config(sub("a", n=3)), "<test>")["default"]
    pa = next(s for s, _ in pol.scorers if s.name == "prefix-affinity")
    assert pa.room_weight == 0  # type: ignore[attr-defined]
