"""Aggregating client records, and the fleet's prefix-cache hit rate from ``/metrics`` pages.

* percentiles interpolate linearly between order statistics (numpy's default);
* ITL percentiles pool every inter-token gap of every successful request (as vLLM's
  ``benchmark_serving`` does), so long answers weigh more;
* SLO attainment is the fraction of *all* requests that completed with TTFT within the TTFT SLO
  and a mean ITL within the ITL SLO -- the definition of ``inferplane simulate`` -- with both
  SLOs divided by the emulator's time scale (engine time runs faster than real time);
* throughput is output tokens of successful requests over the replay's wall time;
* the hit rate is ``Δ vllm:prefix_cache_hits_total / Δ vllm:prefix_cache_queries_total``
  summed over the endpoints, between a scrape before and one after the replay.
"""

from __future__ import annotations

import math
import re
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from bench.peers.client import Record

HITS = "vllm:prefix_cache_hits_total"
QUERIES = "vllm:prefix_cache_queries_total"
_SAMPLE = re.compile(r"^([A-Za-z_:][A-Za-z0-9_:]*)(\{[^}]*\})?\s+(\S+)")


def pct(xs: Sequence[float], q: float) -> float | None:
    """The ``q``-th percentile (0-100) of ``xs``, linear interpolation; None when empty."""
    if not xs:
        return None
    s = sorted(xs)
    k = (len(s) - 1) * q / 100.0
    lo, hi = math.floor(k), math.ceil(k)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def prom_sum(text: str, name: str) -> float:
    """The sum over all label sets of metric ``name`` in a Prometheus text page (0 if absent)."""
    total = 0.0
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = _SAMPLE.match(line)
        if m and m.group(1) == name:
            try:
                total += float(m.group(3))
            except ValueError:
                continue
    return total


def has(text: str, name: str) -> bool:
    """Whether a Prometheus text page has a sample of metric ``name`` (any labels)."""
    return re.search(rf"^{re.escape(name)}[{{\s]", text, re.M) is not None


@dataclass(frozen=True)
class CacheCounters:
    hits: float
    queries: float

    @classmethod
    def from_pages(cls, pages: Iterable[str]) -> CacheCounters:
        hits = queries = 0.0
        for p in pages:
            hits += prom_sum(p, HITS)
            queries += prom_sum(p, QUERIES)
        return cls(hits, queries)


ENGINE_SECONDS = {"ttft": "vllm:time_to_first_token_seconds",
                  "queue": "vllm:request_queue_time_seconds",
                  "prefill": "vllm:request_prefill_time_seconds"}
"""vLLM's own per-request histograms: time to first token from the arrival its front end
records, time waiting in the engine's queue, time in prefill."""


def engine_means_ms(before: Iterable[str], after: Iterable[str]) -> dict[str, float | None]:
    """Mean of each `ENGINE_SECONDS` histogram (ms) over the requests between two scrapes of
    the same engines' pages (``_sum`` and ``_count`` summed over engines; None: no request).
    vLLM observes TTFT at a request's first token but its queue and prefill times when it
    finishes, so a request unfinished at the second scrape counts in the first mean only."""
    b, a = list(before), list(after)
    out: dict[str, float | None] = {}
    for key, name in ENGINE_SECONDS.items():
        n = sum(prom_sum(p, name + "_count") for p in a) - sum(
            prom_sum(p, name + "_count") for p in b)
        total = sum(prom_sum(p, name + "_sum") for p in a) - sum(
            prom_sum(p, name + "_sum") for p in b)
        out[key] = round(1e3 * total / n, 1) if n > 0 else None
    return out


STEPS = "vllm:iteration_tokens_total"
"""vLLM's histogram of the tokens of each engine step (the prompt tokens it computed, not those
read from the prefix cache, and the tokens it generated), observed by the API server for each
batch of outputs the engine core hands it: one a step that produced an output (a step that ran
only part of a chunked prefill is not counted). ``_count``: those steps; ``_sum``: their
tokens."""
REQUESTS = "vllm:request_success_total"
"""Requests an engine finished (summed over ``finished_reason``)."""


def per_engine(before: Sequence[str], after: Sequence[str]) -> list[dict[str, float | None]]:
    """What each engine did between two scrapes of the same engines' pages (in order): the
    requests it finished, the engine steps it ran and their tokens (`STEPS`; None where its
    page has no such histogram), tokens per step, and its own mean TTFT (ms; None: no first
    token in between). On an engine shared by several requests a step has fixed costs
    (scheduling, the forward pass's launch, the output's hand-off), so the steps a replay took
    say what spreading or batching its requests cost."""
    if len(before) != len(after):
        raise ValueError(f"{len(before)} pages before, {len(after)} after")
    out: list[dict[str, float | None]] = []
    for b, a in zip(before, after, strict=True):
        def d(name: str, b: str = b, a: str = a) -> float:
            return prom_sum(a, name) - prom_sum(b, name)

        # an engine without the histogram (inferplane's emulator, SGLang) ran no step we know of
        counted = all(has(p, STEPS + "_count") for p in (b, a))
        steps = d(STEPS + "_count") if counted else None
        tokens = d(STEPS + "_sum") if counted else None
        out.append({
            "requests": d(REQUESTS), "steps": steps, "step_tokens": tokens,
            "tokens_per_step": round(tokens / steps, 2) if steps and tokens is not None
            else None,
            "ttft_ms": engine_means_ms([b], [a])["ttft"],
        })
    return out


ROUTER_ASKS = {"scrapes": "inferplane_engine_scrapes_total",
               "probes": "inferplane_health_probes_total"}
"""What inferplane's gateway asks of the engines besides the requests it routes (its own
``/metrics``): engine pages asked for, health probes sent."""


def router_asks(before: str | None, after: str | None) -> dict[str, float] | None:
    """`ROUTER_ASKS` between two reads of a router's own ``/metrics`` page; None when either
    read failed or a page lacks a counter (another router, an older gateway, or a page that is
    not the gateway's: behind Envoy, ``/metrics`` reaches an engine)."""
    if before is None or after is None:
        return None
    if not all(has(p, n) for p in (before, after) for n in ROUTER_ASKS.values()):
        return None
    return {k: prom_sum(after, n) - prom_sum(before, n) for k, n in ROUTER_ASKS.items()}


def hit_rate(before: CacheCounters, after: CacheCounters) -> float | None:
    """Prefix-cache hit rate between two scrapes (None when nothing was queried)."""
    dq = after.queries - before.queries
    if dq <= 0:
        return None
    return (after.hits - before.hits) / dq


@dataclass(frozen=True)
class Slo:
    """Latency SLOs in *real* seconds (the class's SLO divided by the time scale)."""

    ttft_s: float
    itl_s: float

    @classmethod
    def scaled(cls, ttft_ms: float, itl_ms: float, time_scale: float) -> Slo:
        return cls(ttft_ms / 1000.0 / time_scale, itl_ms / 1000.0 / time_scale)


def meets(r: Record, slo: Slo) -> bool:
    if not r.ok or r.ttft_s is None or r.ttft_s > slo.ttft_s:
        return False
    return not r.itl_s or statistics.fmean(r.itl_s) <= slo.itl_s


def summarize(records: Sequence[Record], wall_s: float, slo: Slo) -> dict[str, Any]:
    """The per-router numbers of the results table (latencies in milliseconds, real time)."""
    ok = [r for r in records if r.ok]
    ttft = [r.ttft_s for r in ok if r.ttft_s is not None]
    e2e = [r.e2e_s for r in ok if r.e2e_s is not None]
    itl = [g for r in ok for g in r.itl_s]
    out_tokens = sum(r.output_tokens for r in ok)
    errors: dict[str, int] = {}
    for r in records:
        if not r.ok:
            key = (r.error or "error").split(":")[0][:60]
            errors[key] = errors.get(key, 0) + 1

    def ms(v: float | None) -> float | None:
        return None if v is None else v * 1000.0

    return {
        "requests": len(records),
        "ok": len(ok),
        "errors": len(records) - len(ok),
        "error_kinds": errors,
        "ttft_ms": {f"p{q}": ms(pct(ttft, q)) for q in (50, 90, 99)},
        "itl_ms": {f"p{q}": ms(pct(itl, q)) for q in (50, 99)},
        "e2e_ms": {f"p{q}": ms(pct(e2e, q)) for q in (50, 99)},
        "output_tokens": out_tokens,
        "throughput_tok_s": out_tokens / wall_s if wall_s > 0 else 0.0,
        "slo_attainment": sum(1 for r in records if meets(r, slo)) / len(records)
        if records
        else None,
        "wall_s": wall_s,
    }

