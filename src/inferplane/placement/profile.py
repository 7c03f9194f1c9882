"""`RequestProfile`: everything placement knows about one request (the output of classify)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from inferplane.types import ApiKind, BlockHash


@dataclass(frozen=True, slots=True)
class RequestProfile:
    """The request as placement sees it. Built by classify; never mutated (use `with_`)."""

    request_id: str
    tenant: str
    model: str
    api: ApiKind = "chat"
    workload_class: str = "interactive"
    priority: str = "standard"
    variant: str | None = None
    prompt_tokens: int = 0
    max_output_tokens: int = 0  # per generated sequence
    sequences: int = 1  # sequences generated: n × prompts (completions with a list of prompts)
    block_hashes: tuple[BlockHash, ...] = ()
    engine_block_hashes: tuple[BlockHash, ...] = ()
    session_id: str | None = None
    session_key: str | None = None  # the session within its cache scope (`isolation.session_key`)
    ttft_slo_s: float | None = None
    itl_slo_s: float | None = None
    allowed_jurisdictions: frozenset[str] | None = None
    precisions: frozenset[str] | None = None
    allowed_kinds: frozenset[str] | None = None
    allow_burst: bool = True
    energy_aware: bool = False
    client_region: str | None = None
    data_region: str | None = None
    data_source: str | None = None  # the named data store the request uses (`data_sources`)
    stream: bool = False
    cache_salt: str | None = None  # the prefix-cache scope's salt (`placement.isolation`)
    excluded: frozenset[str] = field(default_factory=frozenset)
    # failure domains / zones of failed attempts ("fd:<name>", "zone:<name>"): avoided if possible
    avoid_domains: frozenset[str] = field(default_factory=frozenset)
    preferred_kinds: frozenset[str] | None = None  # substrate kinds the class prefers (SLO met)
    model_alias: str | None = None  # the alias the client named (tiered routing); model: its tier
    tier_reason: str | None = None  # why that tier
    full: frozenset[str] = field(default_factory=frozenset)  # no free shared slot just now
    gated: frozenset[str] = field(default_factory=frozenset)  # prefill queue full just now
    attempt: int = 0

    @property
    def max_total_output_tokens(self) -> int:
        """Worst-case tokens generated for the whole request (budgets, rate limits, capacity)."""
        return self.max_output_tokens * self.sequences

    def with_(self, **changes: object) -> RequestProfile:
        """A copy with some fields changed (e.g. an endpoint excluded after a failure)."""
        return replace(self, **changes)  # type: ignore[arg-type]
