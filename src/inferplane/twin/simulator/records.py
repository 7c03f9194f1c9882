"""One replayed request and what happened to it: the simulator's per-request record."""

from __future__ import annotations

from dataclasses import dataclass

from inferplane.fleet.live import Reservation
from inferplane.twin.engine.model import EngineRequest
from inferplane.twin.simulator.mix import TrafficShare

__all__ = ["RequestRecord"]


@dataclass(slots=True)
class RequestRecord:
    """One replayed request and what happened to it (times in virtual seconds)."""

    index: int
    request_id: str
    arrival_s: float
    prompt_tokens: int
    output_tokens: int
    share: TrafficShare
    ids: list[int]
    endpoint: str | None = None
    substrate: str | None = None
    jurisdiction: str | None = None
    rejected_by: tuple[str, ...] = ()
    spillover: bool = False
    delay_s: float = 0.0  # one-way network delay to the endpoint
    engine_request: EngineRequest | None = None
    reservation: Reservation | None = None
    completed: bool = False
    predicted_ttft_s: float | None = None  # placement's uncorrected prediction for the pick
    ttft_s: float | None = None
    itl_s: float | None = None  # mean gap between this request's tokens
    e2e_s: float | None = None
    completion_tokens: int = 0
    cached_tokens: int = 0
    preemptions: int = 0
    cost_usd: float = 0.0
    status: int | None = None  # what the client got: 200, or the gateway's error status
    error_code: str | None = None  # the OpenAI error code of a refusal or failure
    deferred: bool = False  # waited in the batch lane for spare capacity
    queued_s: float = 0.0  # waited in the admission queue
    attempts: int = 0  # endpoints tried (re-placements after failures before the first byte)
    failed: bool = False  # admitted and placed, then failed (upstream error, mid-stream loss)

    @property
    def rejected(self) -> bool:
        return bool(self.rejected_by)

    @property
    def shed(self) -> bool:
        """Refused with 429 by admission (load shedding, retry shedding, rate limits, budgets);
        not a 429 ``upstream_rate_limited`` (the endpoints answered 429: a failure)."""
        return self.status == 429 and self.error_code != "upstream_rate_limited"

    def meets_slo(self) -> bool:
        """Completed within its class's TTFT and (mean) ITL SLOs; rejected requests miss."""
        if not self.completed or self.ttft_s is None:
            return False
        cls = self.share.workload_class
        if cls.ttft_slo_ms is not None and self.ttft_s > cls.ttft_slo_ms / 1000.0:
            return False
        return not (
            cls.itl_slo_ms is not None
            and self.itl_s is not None
            and self.itl_s > cls.itl_slo_ms / 1000.0
        )
