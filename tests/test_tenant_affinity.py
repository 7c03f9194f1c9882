"""The gateway's own placement state is per cache scope (issue 12 item 6): tenant B's request
identical to tenant A's gets no session-affinity and no prefix bonus toward A's endpoint, from
neither the learned index nor the KV-event mirror; tenants that opt into one ``cache_group``
share all three. Unit level (classify + plugins + the mirror), then end to end with emulated
engines publishing KV events and the gateway in one event loop."""

from __future__ import annotations

import asyncio
import random

import aiohttp

from inferplane.api.app import serve
from inferplane.api.pipeline import Gateway
from inferplane.config.loader import parse_config
from inferplane.config.schema import FleetConfig
from inferplane.fleet.kv_events import BlockStored
from inferplane.fleet.kv_subscriber import KVEventSubscriber
from inferplane.fleet.prefix_index import PrefixIndex
from inferplane.fleet.salts import SaltBook
from inferplane.placement.classify import Classifier
from inferplane.placement.framework import CycleState
from inferplane.placement.isolation import cache_salt, cache_scope
from inferplane.placement.plugins.affinity import (
    PrefixAffinity,
    PrefixParams,
    SessionAffinity,
    SessionParams,
)
from inferplane.placement.profile import RequestProfile
from inferplane.tokenization import VOCABULARY, block_hashes, salt_root, token_ids
from inferplane.twin.emulator.server import start_emulator
from tests.builders import tenant
from tests.support.procs import free_port
from tests.test_precise_prefix import fleet_yaml as precise_fleet_yaml

KEYS = {t: f"sk-aff-{t}" for t in "abcd"}
BS = 16


def fleet_yaml(ports: list[int], ev_ports: list[int], gw: int) -> str:
    return precise_fleet_yaml(ports, ev_ports, gw, block_size=BS, tenants=[
        tenant("a", KEYS["a"]), tenant("b", KEYS["b"]),
        tenant("c", KEYS["c"], cache_group="team"), tenant("d", KEYS["d"], cache_group="team")])


def config() -> FleetConfig:
    return parse_config(fleet_yaml([1, 2], [3, 4], 5))


def prompt(seed: int, words: int = 160) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(VOCABULARY) for _ in range(words))


def profiles(cfg: FleetConfig, text: str, session: str | None = None) -> dict[str, RequestProfile]:
    clf = Classifier(cfg)
    headers = {} if session is None else {"x-session-id": session}
    out = {}
    for t in cfg.tenants:
        out[t.name] = clf.classify(
            request_id="r", api="completions", body={"model": "llama-3.1-8b", "prompt": text},
            headers=headers, tenant=t,
        )[0]
    return out


def test_session_affinity_is_per_scope() -> None:
    cfg = config()
    from inferplane.fleet.live import LiveFleet
    from inferplane.fleet.model import Fleet

    snap = LiveFleet(Fleet.from_config(cfg)).snapshot()
    e0, e1 = snap.endpoints
    plugin = SessionAffinity("session", SessionParams())
    p = profiles(cfg, "hello there", session="conversation-1")
    rng = random.Random(0)
    plugin.on_picked(CycleState(p["a"], snap, rng), e1)
    plugin.on_picked(CycleState(p["c"], snap, rng), e1)

    def score(t: str) -> list[float]:
        return list(plugin.score(CycleState(p[t], snap, rng), [e0, e1]))

    assert score("a") == [0.0, 1.0]  # its own session sticks
    assert score("b") == [0.0, 0.0]  # the same x-session-id in another tenant: no bonus
    assert score("d") == [0.0, 1.0]  # one cache_group shares its sessions
    assert plugin.propose(CycleState(p["b"], snap, rng), 8) == []


def test_learned_prefix_index_is_per_scope() -> None:
    cfg = config()
    from inferplane.fleet.live import LiveFleet
    from inferplane.fleet.model import Fleet

    snap = LiveFleet(Fleet.from_config(cfg)).snapshot()
    e0, e1 = snap.endpoints
    plugin = PrefixAffinity("prefix", PrefixParams(mode="approximate"))
    p = profiles(cfg, prompt(1, 400))
    rng = random.Random(0)
    plugin.on_picked(CycleState(p["a"], snap, rng), e1)
    plugin.on_picked(CycleState(p["c"], snap, rng), e1)

    def score(t: str) -> list[float]:
        return list(plugin.score(CycleState(p[t], snap, rng), [e0, e1]))

    assert score("a") == [0.0, 1.0]
    assert score("b") == [0.0, 0.0]
    assert score("d") == [0.0, 1.0]


def _scopes(cfg: FleetConfig) -> list[str]:
    return [cache_salt(cache_scope(t.name, t.cache_group)) for t in cfg.tenants]


def test_kv_event_mirror_keys_blocks_per_scope_emulator_hashes() -> None:
    """An engine that hashes as the gateway does (the emulator): each first block is matched to
    its scope exactly, with no note needed (another replica may have sent the request)."""
    cfg = config()
    p = profiles(cfg, prompt(2))
    ids = token_ids(prompt(2))
    index = PrefixIndex()
    sub = KVEventSubscriber(index, [], SaltBook(_scopes(cfg)))
    for t in ("a", "c"):  # A's and C's requests ran on e1: the engine's salted chains
        hashes = block_hashes(ids, BS, salt_root(p[t].cache_salt))
        sub.apply("e1", BlockStored(hashes, None, ids[: len(hashes) * BS], BS))
    n = len(p["a"].engine_block_hashes)
    assert n == 10
    assert index.match_lengths(p["a"].engine_block_hashes) == {"e1": n}
    assert index.match_lengths(p["b"].engine_block_hashes) == {}  # never another scope's
    assert index.match_lengths(p["d"].engine_block_hashes) == {"e1": n}  # the group's
    # an unsalted engine chain (a client bypassing the gateway) matches no salted request
    plain = block_hashes(ids, BS)
    sub.apply("e0", BlockStored(plain, None, ids[: len(plain) * BS], BS))
    assert index.match_lengths(p["b"].engine_block_hashes) == {}


def test_kv_event_mirror_attributes_opaque_engine_hashes_to_the_scope_that_sent_them() -> None:
    """vLLM's own block hashes cannot be recomputed: a first block is attributed to the one
    scope that recently sent that first block to the endpoint; with two such scopes it is left
    unkeyed (affinity misses, never a cross-scope match)."""
    cfg = config()
    p = profiles(cfg, prompt(3))
    ids = token_ids(prompt(3))
    n = len(p["a"].engine_block_hashes)
    book = SaltBook(_scopes(cfg))
    index = PrefixIndex()
    sub = KVEventSubscriber(index, [], book)
    rng = random.Random(5)

    def opaque() -> list[int]:
        return [rng.getrandbits(64) for _ in range(n)]

    book.note("e1", p["a"].cache_salt, p["a"].engine_block_hashes[0])
    sub.apply("e1", BlockStored(opaque(), None, ids[: n * BS], BS))
    assert index.match_lengths(p["a"].engine_block_hashes) == {"e1": n}
    assert index.match_lengths(p["b"].engine_block_hashes) == {}
    # nobody sent it to e0: not keyed
    sub.apply("e0", BlockStored(opaque(), None, ids[: n * BS], BS))
    assert index.size("e0") == 0 and book.unresolved == 1
    # A and B both sent it to e0: ambiguous, not keyed
    book.note("e0", p["a"].cache_salt, p["a"].engine_block_hashes[0])
    book.note("e0", p["b"].cache_salt, p["b"].engine_block_hashes[0])
    sub.apply("e0", BlockStored(opaque(), None, ids[: n * BS], BS))
    assert index.size("e0") == 0 and book.unresolved == 2


async def test_gateway_gives_no_cross_tenant_prefix_bonus_through_kv_events() -> None:
    ports, evs = [free_port() for _ in range(2)], [free_port() for _ in range(2)]
    gw_port = free_port()
    cfg = parse_config(fleet_yaml(ports, evs, gw_port))
    emu = await start_emulator(cfg, time_scale=50.0)
    gateway = Gateway(cfg)
    runner = await serve(gateway, "127.0.0.1", gw_port)
    url = f"http://127.0.0.1:{gw_port}/v1/completions"
    index = gateway.prefix_index
    assert index is not None
    try:
        await asyncio.sleep(0.3)  # let the SUB sockets connect

        async def send(s: aiohttp.ClientSession, tenant: str, text: str) -> dict[str, float]:
            body = {"model": "llama-3.1-8b", "max_tokens": 2, "prompt": text}
            async with s.post(url, json=body,
                              headers={"Authorization": f"Bearer {KEYS[tenant]}"}) as r:
                assert r.status == 200, await r.text()
                rec = gateway.ledger.get(r.headers["x-inferplane-decision-id"])
            assert rec is not None
            return {c["endpoint"]: c["annotations"].get("prefix_match", 0.0)
                    for c in rec["candidates"]}

        async def settle(before: int) -> None:
            for _ in range(100):  # the engine's BlockStored events reach the mirror
                if sum(index.size(e) for e in ("e0", "e1")) > before:
                    return
                await asyncio.sleep(0.02)
            raise AssertionError("no KV events arrived")

        async with aiohttp.ClientSession() as s:
            for owner, other in (("a", "b"), ("c", "d")):
                text = prompt(ord(owner), 1024)
                before = sum(index.size(e) for e in ("e0", "e1"))
                await send(s, owner, text)
                await settle(before)
                mine = await send(s, owner, text)
                assert max(mine.values()) > 0  # the owner's repeat is matched
                theirs = await send(s, other, text)
                if owner == "a":
                    assert max(theirs.values()) == 0, theirs  # B: nothing of A's
                else:
                    assert max(theirs.values()) > 0, theirs  # the group shares
    finally:
        await runner.cleanup()
        await emu.stop()
