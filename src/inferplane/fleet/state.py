"""Live endpoint state and the immutable `FleetSnapshot` that placement reads."""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Protocol

from inferplane.fleet.model import Endpoint, Fleet
from inferplane.types import BlockHash


@dataclass(frozen=True, slots=True)
class EndpointState:
    """What is known about one endpoint at one instant.

    Engine signals (scraped from ``/metrics``) are ``None`` when never scraped; ``stale`` is true
    when the last good scrape is older than the configured limit, and placement must not trust
    engine signals then. Gateway signals (in-flight, observed latencies) are always current;
    ``pending_prefill`` / ``pending_prefill_tokens`` are the in-flight requests that have not
    yet received a first token and their uncached prompt tokens: the prefill queue the gateway
    itself put on the endpoint, and ``pending_prefill_sq`` the sum of those prompts' squared
    uncached lengths (attention grows with each prompt's length squared: a queue of one long
    and one short prompt costs more than two of their mean length); ``prefill_done_at`` is when
    that queue is expected to be done (the latest first token predicted, at placement, for
    those requests; on the snapshot's clock), None when nothing is pending or one of them had
    no prediction. ``metrics_at``: when the page in use was scraped, on the snapshot's clock
    (None: never scraped; its age at a snapshot's ``now`` is `metrics_age_at`): a time, not an
    age, so that a state stays true while the clock moves and a refresh can keep it.
    """

    healthy: bool = True
    ejected: bool = False
    ejected_reason: str = ""
    stale: bool = True
    metrics_at: float | None = None
    running: float | None = None
    waiting: float | None = None
    kv_usage: float | None = None
    prefix_queries_total: float | None = None
    prefix_hits_total: float | None = None
    block_size: int | None = None
    num_gpu_blocks: int | None = None
    power_watts: float | None = None  # live draw, where the engine page reports it
    inflight: int = 0
    inflight_tokens: int = 0
    pending_prefill: int = 0
    pending_prefill_tokens: int = 0
    pending_prefill_sq: int = 0
    prefill_done_at: float | None = None
    ttft_p50_s: float | None = None
    ttft_p99_s: float | None = None
    itl_p50_s: float | None = None
    itl_p99_s: float | None = None
    error_rate: float = 0.0
    ttft_ratio_p50: float | None = None  # median of observed ÷ predicted TTFT, recent requests
    requests_total: int = 0
    # room left under the endpoint's declared rate limits in the rolling minute (None: no limit)
    requests_left: int | None = None
    tokens_left: int | None = None

    @property
    def queue_depth(self) -> float:
        """Waiting requests per the engine, or 0 when unknown or stale."""
        return 0.0 if self.stale or self.waiting is None else self.waiting

    def metrics_age_at(self, now: float) -> float | None:
        """The scraped page's age at ``now`` (the snapshot's clock); None when never scraped."""
        return None if self.metrics_at is None else now - self.metrics_at

    @property
    def metrics_age_s(self) -> float | None:
        """Removed (session 29): a plugin that reads it is told what replaces it."""
        raise AttributeError(
            "EndpointState.metrics_age_s was removed: use state.metrics_age_at(snapshot.now)"
        )

    @property
    def usable(self) -> bool:
        """Healthy and not ejected."""
        return self.healthy and not self.ejected


@dataclass(frozen=True, slots=True)
class EndpointView:
    """An endpoint with its state at snapshot time."""

    endpoint: Endpoint
    state: EndpointState
    name: str = field(init=False)  # stored, not a property: placement reads it a lot

    def __post_init__(self) -> None:
        object.__setattr__(self, "name", self.endpoint.name)


class PrefixIndexView(Protocol):
    """Read side of a prefix-cache index: how many leading blocks an endpoint holds."""

    def match_length(self, endpoint: str, hashes: Sequence[BlockHash]) -> int: ...


class SnapshotLog:
    """Which views each of a live fleet's recent snapshots replaced: for each snapshot (by its
    ``serial``, consecutive) the positions whose view is not the previous snapshot's object, or
    None when every view may have changed (the first, or a reloaded fleet's). A reader that
    keeps something per view (a pool's sums, a substrate's in-flight count) brings it up to date
    from the snapshot it last read through `changed_between` instead of comparing every view.
    Holds positions only, never a snapshot."""

    __slots__ = ("_entries",)

    def __init__(self, size: int = 64) -> None:
        self._entries: deque[tuple[int, tuple[int, ...] | None]] = deque(maxlen=size)

    def add(self, serial: int, changed: tuple[int, ...] | None) -> None:
        """Snapshot ``serial`` (the last one's + 1) replaced the views at ``changed``."""
        self._entries.append((serial, changed))

    def changed_between(self, old: int, new: int) -> set[int] | None:
        """The positions whose view snapshot ``new`` holds is not the one snapshot ``old`` held
        (``old`` ≤ ``new``, both of this log); None when that is not known: ``old`` is too old
        for the log, or a snapshot between them replaced every view."""
        if new == old:
            return set()
        entries = self._entries
        if not entries or new < old:
            return None
        first = entries[0][0]
        if old + 1 < first or new > entries[-1][0]:
            return None
        out: set[int] = set()
        for k in range(old + 1 - first, new + 1 - first):
            changed = entries[k][1]
            if changed is None:
                return None
            out.update(changed)
        return out


@dataclass(frozen=True)
class FleetSnapshot:
    """An immutable view of the fleet for one placement. ``now`` is the snapshot's clock
    (monotonic seconds in the gateway, virtual seconds in the simulator): placement never reads a
    clock of its own."""

    fleet: Fleet
    endpoints: tuple[EndpointView, ...]
    now: float = 0.0
    version: int = 0
    prefix_index: PrefixIndexView | None = None
    # the live fleet's count of the snapshots it built, and its log of what each replaced (None:
    # a snapshot built by hand, whose readers compare every view)
    serial: int = 0
    log: SnapshotLog | None = None

    @cached_property
    def by_name(self) -> dict[str, EndpointView]:
        return {v.name: v for v in self.endpoints}
