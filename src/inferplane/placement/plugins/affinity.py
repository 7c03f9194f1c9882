"""Affinity scorers: prefix-cache affinity and session affinity, and the prefix matcher that
other plugins (latency prediction, baselines) share."""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Sequence
from functools import lru_cache
from hashlib import blake2b
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from inferplane.fleet.prefix_index import PrefixIndex
from inferplane.fleet.state import EndpointView
from inferplane.placement.framework import CycleState, Plugin, register
from inferplane.placement.profile import RequestProfile
from inferplane.types import BlockHash

PrefixMode = Literal["auto", "precise", "approximate"]


def _common_prefix(a: tuple[BlockHash, ...], b: tuple[BlockHash, ...]) -> int:
    """Length of the common leading run of two non-empty hash tuples whose first elements are
    equal (at least 1). Compares slices (in C) with a binary search instead of element by
    element in Python: a shared prefix of n blocks costs O(log n) slice comparisons."""
    m = len(a) if len(a) < len(b) else len(b)
    if a[:m] == b[:m]:
        return m
    lo, hi = 1, m - 1  # a[0] == b[0]; a[:m] != b[:m]
    while lo < hi:
        mid = (lo + hi + 1) >> 1
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


def _lengths(index: object, hashes: tuple[BlockHash, ...],
             candidates: Sequence[EndpointView]) -> dict[str, int] | None:
    """``index.match_lengths`` for the candidates (None when the index has no such method).
    When the candidates are a small part of the endpoints the index knows (a sampled large
    fleet), the walk is restricted to them."""
    if type(index) is PrefixIndex:  # (the usual index: its methods without three getattrs)
        if 4 * len(candidates) < index.endpoint_count():
            return index.match_lengths(hashes, index.mask_of([c.name for c in candidates]))
        return index.match_lengths(hashes)
    lengths = getattr(index, "match_lengths", None)
    if lengths is None:
        return None
    count = getattr(index, "endpoint_count", None)
    mask_of = getattr(index, "mask_of", None)
    if count is not None and mask_of is not None and 4 * len(candidates) < count():
        held: dict[str, int] = lengths(hashes, mask_of([c.name for c in candidates]))
        return held
    got: dict[str, int] = lengths(hashes)
    return got


class PrefixMatcher:
    """How many leading prompt blocks each candidate holds.

    ``auto``: the snapshot's precise index (KV events) for endpoints it covers, matched on the
    request's engine block hashes and scaled to prompt blocks, when classify computed them (not
    for a chat prompt on a real tokenizer, nor without ``engine_block_size``) — else this
    matcher's own approximate LRU index; ``precise``: the snapshot's index only (0 when absent);
    ``approximate``: the own index only. Where the precise index is used, a block that a
    request sent to the endpoint within the last ``pending_s`` seconds shares also counts
    (it is being computed there, and its KV event has not arrived yet). The own index learns
    from picks (``learn``); each
    endpoint's capacity is ``num_gpu_blocks × block_size ÷ block_tokens`` hash blocks when the
    engine reports its KV size, else ``capacity_blocks``.
    """

    __slots__ = ("block_tokens", "index", "mode", "pending_s", "recent")

    def __init__(
        self, mode: PrefixMode, capacity_blocks: int, block_tokens: int, pending_s: float = 10.0
    ) -> None:
        self.mode = mode
        self.block_tokens = block_tokens
        self.index = PrefixIndex(capacity_blocks)
        self.pending_s = pending_s
        # endpoint -> (when, engine block hashes) of recent picks, newest last
        self.recent: dict[str, deque[tuple[float, tuple[BlockHash, ...]]]] = {}

    def twin_of(self, other: PrefixMatcher) -> bool:
        """Whether ``other`` would hold exactly this matcher's index if both learned the same
        picks: the same parameters, and neither has learned anything yet (then one of them can
        serve both: `PrefixAffinity.share_matcher`)."""
        return (
            self.mode == other.mode
            and self.block_tokens == other.block_tokens
            and self.pending_s == other.pending_s
            and self.index.capacity_blocks == other.index.capacity_blocks
            and self.index.endpoint_count() == 0 == other.index.endpoint_count()
            and not self.recent
            and not other.recent
        )

    def _pending(self, endpoint: str, engine: tuple[BlockHash, ...], now: float) -> int:
        """Leading ``engine`` blocks that a request sent to ``endpoint`` in the last
        ``pending_s`` seconds shares: blocks being computed there that no KV event has announced
        yet (requests that share a system prompt or a conversation arrive close together)."""
        q = self.recent.get(endpoint)
        if not q:
            return 0
        horizon = now - self.pending_s
        while q and q[0][0] < horizon:
            q.popleft()
        first = engine[0]
        limit = len(engine)
        best = 0
        for _, hs in q:
            if hs[0] != first:
                continue
            n = _common_prefix(hs, engine)
            if n > best:
                best = n
                if best >= limit:  # nothing can match more than the whole prompt
                    break
        return best

    def matches(self, cycle: CycleState, candidates: Sequence[EndpointView]) -> list[float]:
        """Matched leading prompt blocks per candidate (engine-block matches are scaled to
        prompt blocks without rounding, so a short shared prefix still counts)."""
        hashes = cycle.profile.block_hashes
        if not hashes:
            return [0.0] * len(candidates)
        precise = cycle.snapshot.prefix_index if self.mode != "approximate" else None
        own = self.index if self.mode != "precise" else None
        engine = cycle.profile.engine_block_hashes
        if precise is None or not engine:
            if own is None:
                return [0.0] * len(candidates)
            held = _lengths(own, hashes, candidates)  # one walk of the chain for all
            if not held:
                return [0.0] * len(candidates)
            get = held.get
            return [get(c.name, 0) for c in candidates]
        covers = getattr(precise, "covers", None)
        precise_held = _lengths(precise, engine, candidates)
        own_held = _lengths(own, hashes, candidates) if own is not None else None
        now = cycle.snapshot.now
        nhashes, nengine = len(hashes), len(engine)
        pending = self.pending_s > 0
        out: list[float] = []
        for c in candidates:
            if covers is None or covers(c.name):
                # KV events speak engine token blocks: scale to prompt blocks
                if precise_held is not None:
                    n = precise_held.get(c.name, 0)
                else:
                    n = precise.match_length(c.name, engine)
                if n < nengine and pending:
                    n = max(n, self._pending(c.name, engine, now))
                out.append(nhashes if n == nengine else n * nhashes / nengine)
            elif own_held is not None:
                out.append(own_held.get(c.name, 0))
            else:
                out.append(0)
        return out

    def cached_tokens(self, cycle: CycleState, candidates: Sequence[EndpointView]
                      ) -> list[float]:
        """The prompt tokens each candidate holds: ``min(prompt, prompt × matched blocks ÷
        prompt blocks)`` (`matches`), as the latency prediction counts them cached."""
        prompt = cycle.profile.prompt_tokens
        nblocks = len(cycle.profile.block_hashes)
        if not nblocks or prompt <= 0:
            return [0.0] * len(candidates)
        return [float(min(prompt, int(prompt * m / nblocks)))
                for m in self.matches(cycle, candidates)]

    def room(self, cycle: CycleState, candidates: Sequence[EndpointView]) -> list[float]:
        """Relative cache room per candidate: ``1 - held ÷ the most any candidate holds``
        (blocks in the precise index where it covers the endpoint, else in the own index; all 1
        when nothing is held anywhere). Where the cache-aware routers put a prefix nobody
        holds (SGLang's and vLLM's router: the smallest tree)."""
        precise = cycle.snapshot.prefix_index if self.mode != "approximate" else None
        covers = getattr(precise, "covers", None)
        psize = getattr(precise, "size", None)
        own = self.index
        sizes: list[int] = []
        for c in candidates:
            if psize is not None and (covers is None or covers(c.name)):
                sizes.append(psize(c.name))
            elif self.mode != "precise":
                sizes.append(own.size(c.name))
            else:
                sizes.append(0)
        most = max(sizes) if sizes else 0
        if most <= 0:
            return [1.0] * len(candidates)
        return [1.0 - z / most for z in sizes]

    def propose(self, cycle: CycleState, limit: int) -> list[str]:
        """The endpoints holding the longest runs of the prompt, best first: at most
        ``max(1, limit // 4)``, from both indexes as `matches` would read them (one walk of
        the chain each). What candidate sampling must keep in a large fleet."""
        prof = cycle.profile
        want = max(1, limit // 4)
        held: dict[str, float] = {}
        if self.mode != "precise" and prof.block_hashes:
            held.update(self.index.longest(prof.block_hashes, want))
        precise = cycle.snapshot.prefix_index if self.mode != "approximate" else None
        engine = prof.engine_block_hashes
        longest = getattr(precise, "longest", None)
        if longest is not None and engine and prof.block_hashes:
            scale = len(prof.block_hashes) / len(engine)
            for name, n in longest(engine, want):
                m = n * scale
                if m > held.get(name, 0.0):
                    held[name] = m
        if not held:
            return []
        return sorted(held, key=held.__getitem__, reverse=True)[:want]

    def learn(self, cycle: CycleState, picked: EndpointView) -> None:
        engine = cycle.profile.engine_block_hashes
        if engine and self.mode != "approximate" and self.pending_s > 0:
            q = self.recent.get(picked.name)
            if q is None:
                q = self.recent[picked.name] = deque(maxlen=256)
            q.append((cycle.snapshot.now, engine))
        hashes = cycle.profile.block_hashes
        if not hashes or self.mode == "precise":
            return
        s = picked.state
        if s.num_gpu_blocks and s.block_size:
            self.index.set_capacity(
                picked.name, max(1, s.num_gpu_blocks * s.block_size // self.block_tokens)
            )
        self.index.record(picked.name, hashes)


_MASK64 = (1 << 64) - 1


@lru_cache(maxsize=65536)
def _name_hash(name: str) -> int:
    return int.from_bytes(blake2b(name.encode(), digest_size=8).digest(), "little")


def _mix(x: int) -> int:
    """splitmix64's finaliser: a stable 64-bit mix (Python's own ``hash`` of a string differs
    between processes)."""
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9 & _MASK64
    x = (x ^ (x >> 27)) * 0x94D049BB133111EB & _MASK64
    return x ^ (x >> 31)


def _rendezvous(profile: RequestProfile, candidates: Sequence[EndpointView]) -> int:
    """The index of the candidate that wins rendezvous (highest random weight) hashing of the
    request's session (else its first prompt block) over the candidates' names: the same
    winner in every replica for the same candidates, and when one candidate leaves only its
    keys move."""
    sk = profile.session_key
    if sk is not None:
        key = _name_hash(sk)
    else:
        key = profile.block_hashes[0] if profile.block_hashes else 0
    best, best_w = 0, -1
    for i, c in enumerate(candidates):
        w = _mix(key ^ _name_hash(c.name))
        if w > best_w:
            best, best_w = i, w
    return best


class PrefixParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    mode: PrefixMode = "auto"
    capacity_blocks: int = Field(
        31250, gt=0, description="approximate index size per endpoint when the engine's is unknown"
    )
    block_tokens: int = Field(
        64, gt=0, description="tokens per prompt hash block (prefix_block_chars ÷ ~4 chars)"
    )
    pending_s: float = Field(
        10.0, ge=0, description="with KV events: blocks of requests sent this recently count as "
        "held until their events arrive (0: events only)"
    )
    room_weight: float = Field(
        0.0, ge=0, le=1, description="new prefixes go where the cache holds least: the part of "
        "the prompt no endpoint holds scores this × the endpoint's relative room (0: off)"
    )
    room_by: Literal["size", "writes"] = Field(
        "writes", description="room = 1 - blocks held ÷ the most held (size), or 1 - blocks "
        "recently written ÷ the most written (writes: the slowest-churning cache)"
    )
    room_halflife_s: float = Field(
        60.0, gt=0, description="writes: half-life of the recently-written block count"
    )
    rendezvous_weight: float = Field(
        0.0, ge=0, le=1, description="new prefixes are placed identically by every replica "
        "without shared state: the part of the prompt no candidate holds scores this for the "
        "candidate that wins rendezvous hashing of the session (else the first block) over the "
        "candidates' names (0: off)"
    )


@register("prefix-affinity")
class PrefixAffinity(Plugin):
    """Scorer: the share of the prompt's blocks already cached on the endpoint.

    Formula: ``score = matched_leading_blocks / len(block_hashes)`` (0 for a prompt shorter
    than one block). Index: see `PrefixMatcher` (precise from ``snapshot.prefix_index`` where it
    covers the endpoint, else an approximate LRU index learned from this instance's picks via
    ``on_picked``), as the Gateway API Inference Extension's prefix-cache scorer
    (``pkg/epp/scheduling/framework/plugins/multi/prefix``) and llm-d's precise prefix-cache
    scorer do. Annotates ``prefix_match`` (blocks). Parameters: ``mode``,
    ``capacity_blocks``, ``block_tokens``, ``pending_s``, ``room_weight`` (new prefixes where
    the cache holds least) and ``rendezvous_weight`` (new prefixes where rendezvous hashing of
    the session, else the first block, over the candidates puts them: every replica agrees
    without shared state; `admission.shared_placement` shares the learned index instead).
    """

    Params = PrefixParams

    def __init__(self, name: str, params: BaseModel) -> None:
        super().__init__(name, params)
        assert isinstance(params, PrefixParams)
        self.matcher = PrefixMatcher(
            params.mode, params.capacity_blocks, params.block_tokens, params.pending_s
        )
        self.room_weight = params.room_weight
        self.room_by = params.room_by
        self.halflife = params.room_halflife_s
        self.rendezvous_weight = params.rendezvous_weight
        self.written: dict[str, tuple[float, float]] = {}  # endpoint → (decayed blocks, when)
        self.learns = True  # False: the matcher is another plugin's, which teaches it

    def share_matcher(self, matcher: PrefixMatcher) -> None:
        """Read ``matcher`` (another plugin's, with the same parameters, which teaches it every
        pick) instead of an index of our own: the two indexes would be identical, so one walk
        of the prompt's chain and one lesson per pick serve both. The fused scoring pass sets
        this up for `PredictedLatency`'s matcher when no other profile uses either plugin."""
        if not matcher.twin_of(self.matcher):
            raise ValueError("a shared prefix matcher must have the same parameters, unused")
        self.matcher = matcher
        self.learns = False

    def score(self, cycle: CycleState, candidates: list[EndpointView]) -> Sequence[float]:
        total = len(cycle.profile.block_hashes)
        if total == 0:
            return [0.0] * len(candidates)
        matched = self.matcher.matches(cycle, candidates)
        for c, m in zip(candidates, matched, strict=True):
            cycle.annotations_of(c.name)["prefix_match"] = float(m)
        out = [m / total for m in matched]
        w = self.room_weight
        if w > 0:
            new = 1.0 - max(out)  # the share of the prompt no candidate holds
            if new > 0:
                if self.room_by == "writes":
                    room = self._room_writes(cycle, candidates)
                else:
                    room = self.matcher.room(cycle, candidates)
                for i, r in enumerate(room):
                    out[i] += w * new * r
        rw = self.rendezvous_weight
        if rw > 0 and candidates:
            new = 1.0 - max(out)
            if new > 0:
                out[_rendezvous(cycle.profile, candidates)] += rw * new
        return out

    def propose(self, cycle: CycleState, limit: int) -> list[str]:
        return self.matcher.propose(cycle, limit)

    def cached_tokens(self, cycle: CycleState, candidates: Sequence[EndpointView]
                      ) -> list[float]:
        """The prompt tokens each candidate holds (`PrefixMatcher.cached_tokens`)."""
        return self.matcher.cached_tokens(cycle, candidates)

    def _written(self, endpoint: str, now: float) -> float:
        w = self.written.get(endpoint)
        if w is None:
            return 0.0
        return w[0] * float(0.5 ** ((now - w[1]) / self.halflife))

    def _room_writes(self, cycle: CycleState, candidates: list[EndpointView]) -> list[float]:
        now = cycle.snapshot.now
        vals = [self._written(c.name, now) for c in candidates]
        most = max(vals)
        if most <= 0:
            return [1.0] * len(candidates)
        return [1.0 - v / most for v in vals]

    def on_picked(self, cycle: CycleState, picked: EndpointView) -> None:
        if self.learns:
            self.matcher.learn(cycle, picked)
        if self.room_weight > 0:
            total = len(cycle.profile.block_hashes)
            ann = cycle.annotations.get(picked.name)
            held = ann.get("prefix_match", 0.0) if ann else 0.0
            now = cycle.snapshot.now
            self.written[picked.name] = (self._written(picked.name, now) + total - held, now)

    learn_shared = on_picked  # another replica's pick (`admission.shared_placement`)


class ApproxPrefixParams(PrefixParams):
    mode: PrefixMode = "approximate"


@register("prefix-cache-scorer")
class PrefixCacheScorer(PrefixAffinity):
    """Scorer: the Gateway API Inference Extension's ``prefix-cache-scorer`` — `PrefixAffinity`
    with its approximate index (``mode: approximate``, ``lruCapacityPerServer`` 31250) by
    default. Formula and parameters as `PrefixAffinity`."""

    Params = ApproxPrefixParams


class SessionParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    max_sessions: int = Field(100_000, gt=0, description="sessions remembered (LRU)")


def _session(profile: RequestProfile) -> str | None:
    """The session's key: within its cache scope when classify computed one, else the raw id."""
    key = profile.session_key
    return key if key is not None else profile.session_id


@register("session-affinity")
class SessionAffinity(Plugin):
    """Scorer: 1 for the endpoint that last served the request's session, else 0.

    The session is ``profile.session_key``: the ``x-session-id`` within the request's cache
    scope (`placement.isolation.session_key`), so one tenant's session id never steers another
    tenant's requests (a profile built without one uses ``session_id`` as is). State: a bounded
    LRU map session → endpoint learned via ``on_picked``; with several replicas the core also
    feeds it the other replicas' picks and Redis' answer for a session it does not know
    (`remember`; `admission.shared_placement`). Requests without a session score 0 everywhere.
    Parameters: ``max_sessions``.
    """

    Params = SessionParams

    def __init__(self, name: str, params: BaseModel) -> None:
        super().__init__(name, params)
        assert isinstance(params, SessionParams)
        self.max_sessions = params.max_sessions
        self._last: OrderedDict[str, str] = OrderedDict()

    def endpoint_of(self, profile: RequestProfile) -> str | None:
        """The endpoint that last served the request's session (None: unknown, or no
        session). The fused scoring pass scores with it directly."""
        sid = _session(profile)
        return self._last.get(sid) if sid is not None else None

    def score(self, cycle: CycleState, candidates: list[EndpointView]) -> Sequence[float]:
        last = self.endpoint_of(cycle.profile)
        if last is None:
            return [0.0] * len(candidates)
        return [1.0 if c.name == last else 0.0 for c in candidates]

    def propose(self, cycle: CycleState, limit: int) -> list[str]:
        last = self.endpoint_of(cycle.profile)
        return [] if last is None else [last]

    def knows(self, key: str) -> bool:
        """Whether the session's endpoint is known here."""
        return key in self._last

    def remember(self, key: str, endpoint: str) -> None:
        """The session ``key`` was last served by ``endpoint`` (another replica's pick)."""
        self._last[key] = endpoint
        self._last.move_to_end(key)
        while len(self._last) > self.max_sessions:
            self._last.popitem(last=False)

    def on_picked(self, cycle: CycleState, picked: EndpointView) -> None:
        sid = _session(cycle.profile)
        if sid is not None:
            self.remember(sid, picked.name)

    learn_shared = on_picked
