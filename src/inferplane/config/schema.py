"""The fleet configuration schema (pydantic v2).

One YAML file describes the gateway, the regions, the substrates and their endpoints, tenants,
workload classes, placement plugins and profiles, and (for the simulator) a traffic mix. Every
model forbids unknown keys, so a typo is a start-up error naming its path.
"""

from __future__ import annotations

import re
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from inferplane.types import ApiKind, CapacityClass, EngineType, SubstrateKind
from inferplane.upstream_headers import refusal as header_refusal

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:/-]*$"
"""What a name in the fleet file may be (an endpoint, a pool, a tenant, a ledger shard...)."""
_KEY_HASH = re.compile(r"^sha256:[0-9a-f]{64}$")
SKIP_WINDOW_MAX_S = 60
"""The longest ``gateway.health_skip_window_s``."""

Priority = Literal["critical", "standard", "sheddable", "batch"]


def _key_hashes_only(keys: list[str]) -> list[str]:
    """The ``api_keys`` validator of `MetricsSpec` and `TenantSpec`: every key a hash."""
    for i, key in enumerate(keys):
        if not _KEY_HASH.match(key):
            raise ValueError(
                f"api_keys[{i}] must be 'sha256:' + 64 lowercase hex digits "
                "(store hashes, never keys; see `inferplane hash-key`)"
            )
    return keys


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def url_port_in_range(url: str) -> str:
    """A URL whose port is not a number from 1 to 65535 (``http://host:99999``) is refused
    when the file is loaded, naming the field, not found unusable at run time. The URL itself
    is not quoted: it may carry a password."""
    try:
        port = urlsplit(url).port
    except ValueError:
        port = -1
    if port is not None and not 1 <= port <= 65535:
        given = urlsplit(url).netloc.rpartition(":")[2]
        raise ValueError(f"the port must be a number from 1 to 65535, got {given!r}")
    return url


class MetricsSpec(Strict):
    """Who may read the gateway's own ``/metrics`` (it shows every endpoint's load and, with
    ``tenant_labels``, every tenant's tokens and spend), and ``GET /v1/fleet/health`` (every
    endpoint's load)."""

    api_keys: list[str] = Field(
        default_factory=list,
        description="'sha256:<hex>' of admin keys: they may read /metrics on the API listener "
        "and GET /v1/fleet/health, and use the web console (/console, docs/console.md)",
    )
    port: int | None = Field(
        None, ge=0, le=65535,
        description="also serve /metrics, with no key, on this port of `host` (a listener for "
        "the Prometheus scraper only)",
    )
    host: str = Field("127.0.0.1", description="address of the `port` listener")
    public: bool = Field(
        False, description="serve /metrics on the API listener to anyone, with no key (not "
        "GET /v1/fleet/health)"
    )
    tenant_labels: bool = Field(
        False, description="label admission and spend metrics by tenant (else one value, 'all')"
    )
    fleet_health_for_tenants: bool = Field(
        False,
        description="let any tenant key read GET /v1/fleet/health (every endpoint's load, queue, "
        "KV use and error rate, in every jurisdiction), as every tenant could in builds "
        "before 2026-12-07; off: it needs an admin key (`api_keys`), whatever `public` says",
    )

    _hashes_only = field_validator("api_keys")(_key_hashes_only)


class FirstByteTimeoutSpec(Strict):
    """The first-byte timeout of one attempt, derived from placement's prediction.

    ``timeout = min(upstream_timeout_s, max(floor_s, factor × predicted))`` where ``predicted`` is
    the pick's predicted TTFT — plus ``max_tokens ×`` its predicted ITL for a non-streamed request,
    whose first byte comes with the whole answer. Without a prediction, ``unpredicted_s``. A
    timed-out attempt is re-placed (it sent the client nothing) and counts towards the
    endpoint's ``health.outlier.consecutive_timeouts``. Time the gateway's own event loop lost
    (`inferplane.looplag`) is not counted, up to ``max_stretch ×`` the timeout of wall time."""

    enabled: bool = Field(True, description="apply the first-byte timeout")
    factor: float = Field(5.0, ge=1, description="multiple of the predicted time allowed")
    floor_s: float = Field(5.0, gt=0, description="never less than this")
    unpredicted_s: float = Field(
        60.0, gt=0, description="the timeout when placement predicted no latency for the pick"
    )
    max_stretch: float = Field(
        3.0, ge=1, description="the gateway's own event-loop lag does not count against the "
        "timeout, but it fires by this multiple of itself in wall time however late the loop runs"
    )


class GatewaySpec(Strict):
    """How the gateway process listens, scrapes and forwards."""

    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)
    max_body_bytes: int = Field(4 * 1024 * 1024, gt=0, description="larger bodies get 413")
    metrics: MetricsSpec = Field(
        MetricsSpec(),
        description="who may read /metrics and GET /v1/fleet/health, and whether tenants are "
        "labels",
    )
    max_n: int = Field(128, gt=0, description="most choices one request may ask for (`n`)")
    header_timeout_s: float = Field(
        10.0, gt=0, description="a request head must arrive whole this soon after its first byte"
    )
    body_timeout_s: float = Field(
        30.0, gt=0, description="a request body must arrive whole this soon (else 408); uploads: "
        "the longest pause between two chunks"
    )
    upload_timeout_s: float = Field(
        600.0, gt=0, description="an upload (POST /v1/files) must arrive whole this soon after "
        "its request head (else 408 and the connection closes): with body_timeout_s (the "
        "longest pause) it bounds how long a slow client holds a connection. 600 s carries "
        "batch.max_file_bytes' default 100 MiB at 175 KB/s"
    )
    idle_timeout_s: float = Field(
        75.0, gt=0, description="close a client connection idle this long between requests"
    )
    shutdown_timeout_s: float = Field(
        120.0, gt=60, description="after SIGTERM / SIGINT, the most a gateway process (each "
        "worker of serve --workers) may take to stop, counting the up to 60 s that requests in "
        "flight are given to finish (aiohttp's grace) and then the ledger's flush: past it, it "
        "logs the step it is stuck in and exits with status 1"
    )
    drain_delay_s: float = Field(
        0.0, ge=0, le=600, description="after SIGTERM (not SIGINT), keep the listener open and "
        "serving this long with /ready answering 503 before closing it and draining: for a load "
        "balancer that drops a backend only once its health check fails. Not counted in "
        "shutdown_timeout_s. On Kubernetes a preStop hook does this instead (deploy/k8s)"
    )
    max_connections_per_client: int = Field(
        512, gt=0, description="open connections per client address; more get 429 and close. "
        "Behind a trusted proxy (trusted_proxies) each request in flight counts as a connection "
        "of the client X-Forwarded-For names; one more gets 429 and the proxy's connection stays "
        "open"
    )
    trusted_proxies: list[str] = Field(
        default_factory=list,
        description="addresses or CIDRs of proxies (Envoy, a load balancer) whose "
        "X-Forwarded-For names the client (its right-most untrusted address): for "
        "max_connections_per_client and the console's failed-log-in throttle (default: none "
        "trusted, the connection's peer is the client)",
    )

    upstream_response_headers: list[str] = Field(
        default_factory=list,
        description="more of an upstream's response headers that clients see, by name or as a "
        "'prefix*' family (case-insensitive), beside the ones always passed: content-type and "
        "the upstream's request id (x-request-id, Anthropic's request-id). Every other header "
        "of an upstream stays at the gateway: its cookies, the provider account behind the "
        "shared key (openai-organization, openai-project, anthropic-organization-id), that "
        "key's rate-limit state (x-ratelimit-*, anthropic-ratelimit-*, Retry-After) and server "
        "fingerprints, which every tenant would otherwise see. Name here only what every "
        "tenant may see (e.g. 'x-ratelimit-*' where one tenant owns the provider key). "
        "Refused, as a name or as a family (set-cookie*, x-inferplane*): set-cookie, the "
        "framing of the gateway's own response (content-length, transfer-encoding...) and "
        "x-inferplane-* (the gateway's own); a wider family (x-*) never passes those. "
        "The gateway's own headers (x-inferplane-*, the Retry-After of its "
        "refusals) are not upstream headers and are always sent. Behind Envoy the same list is "
        "written into the bootstrap's answer filter (inferplane envoy-config)",
    )

    @model_validator(mode="after")
    def _scraped_before_stale(self) -> GatewaySpec:
        # the longest wait pacing may set (fleet.scraper.Scraper.pause_s); a scrape_interval_s
        # past stale_after_s stays allowed (benches turn scrapes off with a long one)
        if (
            self.scrape_max_duty is not None
            and self.scrape_max_interval_s > self.scrape_interval_s
            and self.scrape_max_interval_s >= self.stale_after_s
        ):
            raise ValueError(
                f"scrape_max_interval_s: {self.scrape_max_interval_s:g} s must be under "
                f"stale_after_s ({self.stale_after_s:g} s): an endpoint whose scrapes are paced "
                "that far apart would read as stale between two of them"
            )
        return self

    @field_validator("health_skip_window_s", mode="before")
    @classmethod
    def _skip_window_bound(cls, window: object) -> object:
        # before the field's own le check, whose message would not say why
        if (isinstance(window, int | float) and not isinstance(window, bool)
                and window > SKIP_WINDOW_MAX_S):
            raise ValueError(
                f"{window:g} s is over {SKIP_WINDOW_MAX_S:g} s: a healthy endpoint with "
                "occasional traffic would go unprobed that long, and an engine dead meanwhile "
                "be found only by the requests failing there (null: 3 x health_interval_s, "
                "at most max(60, health_interval_s))"
            )
        return window

    @field_validator("upstream_response_headers")
    @classmethod
    def _passable(cls, entries: list[str]) -> list[str]:
        for i, entry in enumerate(entries):
            why = header_refusal(entry)
            if why is not None:
                raise ValueError(f"upstream_response_headers[{i}] {why}")
        return entries

    @field_validator("trusted_proxies")
    @classmethod
    def _networks(cls, nets: list[str]) -> list[str]:
        import ipaddress

        for i, net in enumerate(nets):
            try:
                ipaddress.ip_network(net, strict=False)
            except ValueError:
                raise ValueError(
                    f"trusted_proxies[{i}] {net!r} is not an IP address or CIDR "
                    "(e.g. 10.0.0.0/8)"
                ) from None
        return nets

    scrape_interval_s: float = Field(
        0.1, gt=0, description="engine /metrics scrape period (the shortest: see scrape_max_duty)"
    )
    scrape_max_duty: float | None = Field(
        0.05,
        gt=0,
        lt=1,
        description="most of an engine's time its /metrics may spend answering this gateway: "
        "after a fetch of the page that took t seconds (the HTTP request alone, in the "
        "gateway's running time: not its parse, not the gateway's own loop lag) the next waits "
        "t x (1/duty - 1) when that is longer than scrape_interval_s, at most "
        "scrape_max_interval_s (vLLM renders its page on the event loop that serves requests); "
        "null: always scrape_interval_s",
    )
    scrape_max_interval_s: float = Field(
        0.5,
        gt=0,
        description="the longest wait between two scrapes of an endpoint that scrape_max_duty "
        "may set (never below scrape_interval_s); must be under stale_after_s when it is above "
        "scrape_interval_s and scrape_max_duty is set",
    )
    scrape_quiet_interval_s: float | None = Field(
        3.0,
        gt=0,
        description="idle engines are scraped less: while an endpoint's page shows no request "
        "running or waiting and this gateway (with its replicas sharing slots) has none in "
        "flight there, the wait between scrapes doubles from the paced one up to this (one "
        "sleep, cut short as soon as the gateway has a request in flight there unless "
        "scrape_quiet_busy is on, the default); the first "
        "page showing a request (or no such gauges) goes back to the paced wait. Another "
        "client's traffic to an idle engine is seen up to this late (later where the engine's "
        "gauges lag, as SGLang's). At most half of stale_after_s and of "
        "health.outlier.stale_eject_s (a longer one is cut to that). null: always the paced "
        "wait",
    )
    scrape_quiet_busy: bool = Field(
        True,
        description="busy engines holding only this gateway's requests are scraped less too: "
        "while an endpoint's page shows no more requests running and waiting than this gateway "
        "(with its replicas sharing slots) has in flight there, the wait between scrapes "
        "doubles up to scrape_quiet_interval_s as for an idle engine, and the page's running "
        "and waiting are read no higher than the gateway's in-flight count while it is the "
        "latest; no wait (an idle engine's included) is cut short by the gateway's own "
        "requests, which the gateway counts itself. A page showing more (another "
        "client's requests) goes back to the paced wait. Another client's traffic is seen up to "
        "scrape_quiet_interval_s late, or later while the gateway's own requests on their way "
        "hide it; KV cache usage is refreshed as rarely. No effect without "
        "scrape_quiet_interval_s. false: busy engines are always scraped at the paced wait",
    )
    scrape_filter: bool = Field(
        True,
        description="ask a vllm engine for only the samples inferplane reads of its /metrics "
        "page (prometheus_client's name[] filter, on the /metrics/ path vLLM mounts it at; the "
        "histograms' sums and counts, not their buckets) instead of the whole ~50 KB page. The "
        "path is decided per endpoint by reading both pages (again every 5 min): the filtered "
        "one only when it parses every field the whole one does (a sample a node agent merges "
        "into /metrics only, such as DCGM power, keeps the whole page; so does vLLM with "
        "several API servers, whose multiprocess registry cannot filter), asked then for only "
        "the names the whole page carries (13 of the 20 on vLLM 0.32). false: always the "
        "whole page",
    )
    stale_after_s: float = Field(
        6.0, gt=0, description="metrics older than this are not trusted (at least twice "
        "scrape_quiet_interval_s, which is cut to half of it)"
    )
    health_interval_s: float = Field(
        1.0, gt=0, description="/health probe period (a healthy endpoint serving this "
        "gateway's requests is probed less: health_skip_while_serving)"
    )
    health_skip_while_serving: bool = Field(
        True,
        description="skip a healthy endpoint's /health probe when, within the skip's window "
        "(health_skip_window_s), a request of this gateway there was answered with a 2xx and "
        "none failed: the answer showed what the probe asks, and counts as a passed probe. An "
        "endpoint without such traffic, with a failure in the window, or marked unhealthy is "
        "probed every health_interval_s as before; with a window longer than "
        "health_interval_s, a /metrics scrape that got no answer since the last passed probe "
        "leaves only the answers after it to skip one. An engine that dies right after "
        "answering, with no request after and no failed scrape, is probed up to "
        "max(health_skip_window_s, health_interval_s) later "
        "(its failing requests still count at once). false: probe every health_interval_s",
    )
    health_skip_window_s: float | None = Field(
        None,
        gt=0,
        le=SKIP_WINDOW_MAX_S,
        description="with health_skip_while_serving, how far back a 2xx answer skips a probe, "
        "in seconds; null (the default): 3 x health_interval_s (3 s at the default 1 s), at "
        "most max(60, health_interval_s). The "
        "window in effect is max(health_skip_window_s, health_interval_s): it reaches back at "
        "least to the start of the previous probe turn, and never before a failed probe. Any "
        "failure in the window (not a 429 nor a client gone) forces the probe, even with "
        "answers after it, until a probe passes. A value no longer than health_interval_s "
        "skips exactly as the previous turn alone did; with a longer one, a /metrics scrape "
        "that got no answer (refused, reset, timed out; not a non-200, which the server "
        "answered) counts as a failed probe's turn: answers before it skip nothing, answers "
        "after it still skip. Scrapes reach an engine at least every scrape_quiet_interval_s "
        "(3 s by default), busy or idle. What a longer window gives up: an "
        "engine that dies right after answering, with no request of this gateway there after "
        "and no failed scrape (an endpoint not scraped), is probed up to this long later than "
        "without the skip; its failing requests still count at once (passive health, outlier "
        "detection) and are placed again, and each forces the next probe. At most 60 s",
    )
    stream_coalesce_ms: float = Field(
        0.0,
        ge=0,
        le=1000,
        description="relay a stream's chunks after the first at most once per this many "
        "milliseconds: after each chunk sent on, the gateway leaves the engine's next bytes in "
        "the connection's socket until this long after it and sends what gathered as one "
        "write. Fewer wake-ups and writes per streamed token (the gateway's CPU per request on "
        "a loaded host); the first token is never held, later ones reach the client in groups "
        "up to this much later (keep it well under the classes' itl_slo_ms). Only while at "
        "least stream_coalesce_min_streams streams are being relayed (by default a lone stream "
        "is not held). 0: every chunk as it arrives",
    )
    stream_coalesce_min_streams: int = Field(
        4,
        ge=1,
        description="stream_coalesce_ms holds a stream's next bytes only while at least this "
        "many streams are being relayed by this gateway process at that moment (each worker of "
        "serve --workers counts its own). A stream counts from when the engine's first chunk of "
        "it (its first token, or a chat stream's role-only opening) has reached the gateway and "
        "the gateway starts relaying it, until it ends, errs or its client goes: requests "
        "still waiting for their first chunk and answers that are not streamed do not count. "
        "With fewer, every chunk is relayed as it arrives, as with stream_coalesce_ms 0 (so "
        "with fewer streams, e.g. a lone client, token pacing is unchanged). 1: hold whenever "
        "a stream is relayed. /metrics shows the count (inferplane_streams_relayed) and the "
        "holds counter (inferplane_stream_coalesce_holds_total), per process",
    )
    send_bursts_together: bool = Field(
        False,
        description="a request the gateway places on a self-hosted engine (vllm, sglang or "
        "openai-compatible; not a provider-api substrate) waits one turn of the gateway's "
        "event loop before it is sent, behind the requests queued with it: the requests read "
        "together (a burst on kept-alive connections, with no admission step that waits) are "
        "all placed, then sent back to back, so an engine takes its share of them into one step "
        "instead of starting a step with the first alone, in the order placed (the first "
        "requests of a burst go out only after the last is placed: about a millisecond a "
        "request). Requests read in successive polls (new connections) or held in admission go "
        "in smaller groups; the batch lane, the simulator and inferplane epp (Envoy sends) are "
        "never held. false: each request is sent as soon as it is placed",
    )
    connect_timeout_s: float = Field(2.0, gt=0)
    upstream_timeout_s: float = Field(600.0, gt=0, description="whole-request upstream limit")
    stream_idle_timeout_s: float | None = Field(
        60.0,
        gt=0,
        description="a relayed stream whose upstream sends no event (an SSE `data:` line in the "
        "upstream's own bytes, so a Messages stream's thinking and ping events count; "
        "keep-alive comments do not) for this long after its first event is cut (comments "
        "before the first event, as OpenRouter sends while a model works, leave it to "
        "upstream_timeout_s): the "
        "client gets an error event, the record a 502 stream error, and the endpoint the "
        "failure (its first byte is bounded by first_byte_timeout, the whole request by "
        "upstream_timeout_s). Time the gateway spends writing to a slow client does not count. "
        "Set it above the engine's slowest step (a long prefill of a chunk mid-stream, a "
        "preempted request waiting for KV cache); null: no limit but upstream_timeout_s",
    )
    max_upstream_body_bytes: int = Field(
        64 * 1024 * 1024,
        gt=0,
        description="largest non-streamed upstream answer the gateway reads (it holds one "
        "whole to account and relay it): a larger one is not read on, and the client gets a "
        "502 naming this limit. Streams are relayed chunk by chunk and not bounded by it",
    )
    max_replacements: int = Field(
        3,
        ge=0,
        description="most re-placements of one request after failures before its first byte; "
        "re-placement also stops when no eligible endpoint remains or the retry budget "
        "(admission.retry) is spent",
    )
    gc_freeze: bool = Field(
        True, description="once `inferplane serve` or `inferplane epp` listens, collect once and "
        "move every object then alive out of the cyclic garbage collector's reach (gc.freeze): "
        "a full collection then scans only what requests left behind, not the ~100k objects of "
        "the process's code and state (a scan of those paused the event loop 190-280 ms on a "
        "shared 2-vCPU host, in the middle of a burst of requests). Frozen objects are still "
        "freed by reference counting; their reference cycles are not, so an applied reload "
        "unfreezes, collects (one pause then) and freezes again. The start-up collection can "
        "delay requests that arrive in the process's first moments. false: no freeze"
    )
    lag_max_stretch: float = Field(
        3.0, ge=1, description="engine scrapes, health probes and Redis calls do not count the "
        "gateway's own event-loop lag against their timeouts, but each fires by this multiple of "
        "its timeout in wall time however late the loop runs (the first-byte timeout has its own, "
        "first_byte_timeout.max_stretch)"
    )
    first_byte_timeout: FirstByteTimeoutSpec = Field(
        FirstByteTimeoutSpec(),
        description="give up on an endpoint that has not sent its first byte in time, re-place "
        "the request and count a timeout against the endpoint",
    )
    default_profile: str = "default"
    ledger_path: str | None = Field(
        None, description="SQLite file for decision records (relative to the current "
        "directory, not the fleet file); none keeps them in memory only (lost on restart). Also "
        "puts the local admission store, Redis's outage journal and the batch store beside it "
        "unless admission.path / admission.journal_path / batch.path say otherwise"
    )
    seed: int = 0
    token_estimate: Literal["chars", "words"] = Field(
        "chars", description="prompt size estimate: ~4 chars a token, or one word a token"
    )
    prefix_block_chars: int = Field(256, gt=0, description="block size of prompt block hashes")
    engine_block_size: int | None = Field(
        None,
        gt=0,
        description="compute engine token-block hashes of each prompt (with the model's "
        "`tokenizer`, else one word a token) so the precise prefix index fed by KV events can "
        "match it; default: the block size of the first endpoint with `kv_events` set, else off",
    )


class RegionSpec(Strict):
    """A region: network distance to other regions and the price of egress out of it."""

    name: str = Field(pattern=NAME_PATTERN)
    rtt_ms: dict[str, float] = Field(default_factory=dict, description="RTT to other regions")
    egress_usd_per_gb: float = Field(0.0, ge=0)


class CostModel(Strict):
    """Per-token prices (USD per million tokens), or an hourly rate amortised over throughput."""

    input_per_mtok: float | None = Field(None, ge=0)
    output_per_mtok: float | None = Field(None, ge=0)
    cached_input_per_mtok: float | None = Field(None, ge=0)
    hourly_usd: float | None = Field(None, ge=0, description="per endpoint, reserved or burst")

    @model_validator(mode="after")
    def _one_form(self) -> CostModel:
        per_token = self.input_per_mtok is not None or self.output_per_mtok is not None
        if per_token and self.hourly_usd is not None:
            raise ValueError("give either per-token prices or hourly_usd, not both")
        if not per_token and self.hourly_usd is None:
            raise ValueError(
                "give per-token prices (input_per_mtok, output_per_mtok) or hourly_usd"
            )
        return self


class ServedModel(Strict):
    """A model an endpoint serves, as clients name it."""

    name: str = Field(pattern=NAME_PATTERN)
    upstream_name: str | None = Field(
        None,
        min_length=1,
        description="the model's name at the upstream (a hosted provider's model id); the "
        "request body sent upstream carries it instead of `name`. Default: `name`",
    )
    profile: str | None = Field(None, description="physics model profile; defaults to name")
    variant: str = "default"
    precision: Literal["fp32", "bf16", "fp16", "fp8", "int8", "int4"] = "bf16"
    max_context: int = Field(gt=0)
    kind: Literal["generate", "embed"] = Field(
        "generate",
        description="`generate` (served through /v1/chat/completions and /v1/completions) or "
        "`embed` (/v1/embeddings): a request through another API is refused by the gateway "
        "(400 naming `model`), never sent upstream; one model name has one kind on every "
        "endpoint",
    )
    tokenizer: str | None = Field(
        None,
        description="the model's `tokenizer.json` (or a directory holding one; relative to the "
        "fleet file). With it the gateway counts prompt tokens exactly and hashes a text "
        "completion prompt's token blocks the way the engine caches them, so the KV-event prefix "
        "index matches real engines; without it one word counts as one token (the emulator's "
        "rule). Chat prompts are not rendered through the chat template and use the learned "
        "index. `inferplane` sets TOKENIZERS_PARALLELISM=false where the environment has no "
        "value (one prompt at a time: the library's thread pool would only add a hop)",
    )

    @property
    def physics_profile(self) -> str:
        return self.profile or self.name

    @property
    def upstream(self) -> str:
        """The name the upstream knows this model by."""
        return self.upstream_name or self.name


class EmulationSpec(Strict):
    """Engine settings used by the emulator and simulator (ignored for real engines)."""

    max_num_seqs: int = Field(256, gt=0)
    max_num_batched_tokens: int = Field(8192, gt=0)
    block_size: int = Field(16, gt=0)
    num_gpu_blocks: int | None = Field(None, gt=0, description="default: derived from memory")
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1)
    kv_events_port: int | None = Field(None, ge=1, le=65535, description="publish ZMQ KV events")
    rate_limit_rpm: int | None = Field(
        None,
        gt=0,
        description="requests per minute the emulated upstream accepts before answering 429 "
        "with Retry-After; default: the endpoint's limits.requests_per_min, else (provider-api "
        "substrates) the hardware profile's",
    )
    network_rtt_ms: float | None = Field(
        None,
        ge=0,
        description="network round trip added before each request; default: the hardware "
        "profile's for provider-api substrates, else none",
    )


Dialect = Literal["openai", "anthropic"]
HealthCheck = Literal["health", "models", "passive"]


class EndpointLimits(Strict):
    """Rate limits the upstream declares (a hosted provider's quota). Placement and admission
    treat the remaining requests and tokens in the last minute as capacity; a 429 answer ejects
    the endpoint for its ``Retry-After`` (``retry_after_s`` when it sends none)."""

    requests_per_min: int | None = Field(None, gt=0, description="requests per rolling minute")
    tokens_per_min: int | None = Field(
        None, gt=0, description="prompt + max output tokens per rolling minute"
    )
    retry_after_s: float = Field(
        5.0, gt=0, description="ejection after a 429 that carries no Retry-After header"
    )


class EndpointSpec(Strict):
    """One serving instance of a substrate."""

    name: str = Field(pattern=NAME_PATTERN)
    url: str = Field(
        pattern=r"^https?://[^/\s?#]+(/[^\s?#]*)?$",
        description="the API base, with or without a base path (`https://host/openai/v1`); a "
        "base path ending in `/v1` is not repeated in front of the API's own path; a port, "
        "when given, from 1 to 65535",
    )
    engine: EngineType = "vllm"
    provider: str | None = Field(
        None,
        min_length=1,
        description="`gen_ai.provider.name` on its spans and GenAI metrics (`openai`, "
        "`azure.ai.openai`, …); default: `anthropic` for that dialect, the known value of a "
        "provider-api host (else `openai`), the engine for self-hosted endpoints",
    )
    dialect: Dialect = Field(
        "openai",
        description="the API the upstream speaks: `openai` (chat/completions/embeddings) or "
        "`anthropic` (the Messages API; chat completions are translated to and from it)",
    )
    models: list[ServedModel] = Field(min_length=1)
    max_concurrency: int = Field(64, gt=0, description="the endpoint's concurrency envelope")
    tp: int = Field(1, gt=0, description="tensor-parallel degree (devices per endpoint)")
    kv_events: str | None = Field(
        None,
        pattern=r"^(tcp|ipc|inproc)://\S+$",
        description="ZMQ address of the engine's KV events (tcp://, ipc:// or inproc://)",
    )
    health_check: HealthCheck | None = Field(
        None,
        description="`health` probes GET /health, `models` probes GET /v1/models (with the "
        "endpoint's credentials), `passive` probes nothing: errors, timeouts and 429s eject "
        "it. Default: `passive` for provider-api substrates, else `health`",
    )
    scrape_metrics: bool | None = Field(
        None,
        description="scrape the engine's Prometheus /metrics; default: no for provider-api "
        "substrates, yes otherwise",
    )
    api_key_env: str | None = Field(
        None,
        pattern=r"^[A-Za-z_][A-Za-z0-9_]*$",
        description="environment variable holding the upstream's API key (read at start-up)",
    )
    api_key_file: str | None = Field(
        None,
        min_length=1,
        description="file holding the upstream's API key (relative to the fleet file; read at "
        "start-up, surrounding whitespace removed)",
    )
    api_key: str | None = Field(
        None,
        description="the upstream's API key inline: refused unless `allow_inline_key` is set "
        "(prefer `api_key_env` or `api_key_file`)",
    )
    allow_inline_key: bool = Field(False, description="accept an inline `api_key`")
    limits: EndpointLimits = Field(
        EndpointLimits(), description="the upstream's declared rate limits"
    )
    emulation: EmulationSpec = EmulationSpec()

    @field_validator("url")
    @classmethod
    def _strip(cls, v: str) -> str:
        return url_port_in_range(v.rstrip("/"))

    @field_validator("kv_events")
    @classmethod
    def _kv_port(cls, v: str | None) -> str | None:
        return v if v is None or not v.startswith("tcp://") else url_port_in_range(v)

    @model_validator(mode="after")
    def _one_key(self) -> EndpointSpec:
        given = [
            k for k in ("api_key_env", "api_key_file", "api_key") if getattr(self, k) is not None
        ]
        if len(given) > 1:
            raise ValueError(f"give one source of the upstream key, not {' and '.join(given)}")
        if self.api_key is not None and not self.allow_inline_key:
            raise ValueError(
                "an inline api_key is refused (it would sit in plain text in the fleet file): "
                "use api_key_env or api_key_file, or set allow_inline_key: true"
            )
        return self

    @property
    def base_path(self) -> str:
        """The URL's path (``/openai/v1``), or ``""``."""
        rest = self.url.split("://", 1)[1]
        cut = rest.find("/")
        return "" if cut < 0 else rest[cut:]


class SubstrateSpec(Strict):
    """A pool of one kind of hardware in one place."""

    name: str = Field(pattern=NAME_PATTERN)
    kind: SubstrateKind
    hardware: str = Field(description="physics hardware profile name")
    region: str
    zone: str = ""
    jurisdiction: str
    failure_domain: str = ""
    capacity_class: CapacityClass = "reserved"
    committed_concurrency: int | None = Field(
        None,
        gt=0,
        description="reserved capacity's size: requests in flight at once that the reservation "
        "covers, across the substrate's endpoints (default: the sum of their max_concurrency). "
        "At that size the substrate is 'reserved exhausted': new requests spill to burst or "
        "provider capacity, recorded, and wait on the reservation only when nothing else is "
        "allowed",
    )
    cost: CostModel
    power_watts: float | None = Field(None, gt=0, description="power envelope of the pool")
    endpoints: list[EndpointSpec] = Field(min_length=1)

    @model_validator(mode="after")
    def _committed_is_reserved(self) -> SubstrateSpec:
        if self.committed_concurrency is not None and self.capacity_class != "reserved":
            raise ValueError("committed_concurrency applies to reserved capacity only")
        return self


BudgetScope = Literal["tenant", "key", "workflow"]
BudgetWindow = Literal["minute", "day", "month"]


class BudgetSpec(Strict):
    """A spending limit over a calendar window (UTC), enforced before generation.

    ``scope: key`` applies the limit to each of the tenant's API keys separately; ``scope:
    workflow`` to each value of the ``x-inferplane-workflow`` header (requests without one are not
    counted against workflow budgets)."""

    scope: BudgetScope = "tenant"
    window: BudgetWindow
    usd: float | None = Field(None, gt=0, description="dollars per window")
    tokens: int | None = Field(None, gt=0, description="prompt + completion tokens per window")

    @model_validator(mode="after")
    def _some_limit(self) -> BudgetSpec:
        if self.usd is None and self.tokens is None:
            raise ValueError("a budget needs usd, tokens or both")
        return self


class RateLimitSpec(Strict):
    """Token-bucket rate limits, per tenant or per API key (each key separately)."""

    scope: Literal["tenant", "key"] = "tenant"
    requests_per_min: int | None = Field(None, gt=0)
    tokens_per_min: int | None = Field(
        None, gt=0, description="prompt estimate + max_tokens, charged at admission"
    )


class LoopLimits(Strict):
    """Agent loop limits: the step header's value, and requests per workflow in a window."""

    max_agent_step: int | None = Field(
        None, ge=0, description="x-inferplane-agent-step above this is rejected"
    )
    max_workflow_requests: int | None = Field(
        None, gt=0, description="requests per x-inferplane-workflow within workflow_window_s"
    )
    workflow_window_s: float = Field(3600.0, gt=0)


class TenantSpec(Strict):
    """A tenant: its API keys (SHA-256 hashes only), policy and default class."""

    name: str = Field(pattern=NAME_PATTERN)
    api_keys: list[str] = Field(
        min_length=1, description="'sha256:<hex>' of each key (inferplane hash-key KEY)"
    )
    allowed_jurisdictions: list[str] | None = Field(None, description="none means any")
    default_class: str = "interactive"
    region: str | None = Field(None, description="default client region")
    budgets: list[BudgetSpec] = Field(default_factory=list)
    rate_limits: list[RateLimitSpec] = Field(default_factory=list)
    max_tokens_ceiling: int | None = Field(None, gt=0, description="per-request output cap")
    max_tokens_policy: Literal["clamp", "reject"] = Field(
        "clamp", description="max_tokens above a ceiling: clamp it, or answer 400"
    )
    loop: LoopLimits = LoopLimits()
    cache_group: str | None = Field(
        None,
        pattern=NAME_PATTERN,
        description="share prefix caches, the gateway's prefix indexes and session affinity "
        "with the tenants naming the same group (they can then infer each other's prompts from "
        "cached_tokens and placement); default: all of its own",
    )

    _hashes_only = field_validator("api_keys")(_key_hashes_only)


class DataSourceSpec(Strict):
    """A data store requests use (a vector index, a dataset): where it lives and whether its
    data may leave its jurisdiction. A request names it with `x-inferplane-data-source` or
    through its class's `data_source`."""

    name: str = Field(pattern=NAME_PATTERN, description="what requests and classes call it")
    region: str = Field(description="where the data lives: placement prefers endpoints here")
    jurisdiction: str = Field(description="the jurisdiction the data is held under")
    residency: bool = Field(
        False,
        description="the data may not leave its jurisdiction: requests using it run only on "
        "endpoints of that jurisdiction (a hard filter), otherwise co-location is a preference",
    )


class WorkloadClass(Strict):
    """A workload class: latency SLOs, the placement profile it uses, its priority."""

    name: str = Field(pattern=NAME_PATTERN)
    ttft_slo_ms: float | None = Field(None, gt=0)
    itl_slo_ms: float | None = Field(None, gt=0)
    profile: str | None = Field(None, description="placement profile; default gateway's")
    priority: Priority = "standard"
    allow_burst: bool = True
    allowed_kinds: list[SubstrateKind] | None = Field(None, description="none means any kind")
    preferred_kinds: list[SubstrateKind] | None = Field(
        None,
        description="substrate kinds this class prefers wherever they meet its SLO (the "
        "slo-first picker), e.g. giant-context for long-context, low-latency for agent steps",
    )
    default_max_tokens: int = Field(1024, gt=0)
    energy_aware: bool = False
    data_source: str | None = Field(
        None, description="the data source (`data_sources`) this class's requests use"
    )
    max_tokens_ceiling: int | None = Field(None, gt=0, description="per-request output cap")
    queue_deadline_ms: float | None = Field(
        None, gt=0, description="longest wait in the admission queue; default admission.queue's"
    )


class ClassRule(Strict):
    """Assigns a class when no header names one: the first matching rule wins."""

    workload_class: str = Field(alias="class")
    min_prompt_tokens: int | None = Field(None, ge=0)
    api: ApiKind | None = None
    agent_step: bool | None = Field(None, description="request has x-inferplane-agent-step")

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class PluginSpec(Strict):
    """A placement plugin instance: its registered type, instance name and parameters."""

    type: str
    name: str | None = None
    parameters: dict[str, Any] = Field(default_factory=dict)

    @property
    def instance_name(self) -> str:
        return self.name or self.type


class PluginRef(Strict):
    ref: str
    weight: float | None = Field(None, ge=0)


class ProfileSpec(Strict):
    name: str = Field(pattern=NAME_PATTERN)
    plugins: list[PluginRef] = Field(min_length=1)
    max_candidates: int = Field(
        64,
        ge=0,
        description="a fleet with more endpoints than this is sampled before filtering: the "
        "prefix holders and the session's endpoint, plus an equal random share of every pool "
        "serving the model (the whole fleet when none of those passes the filters); 0: every "
        "endpoint is always evaluated",
    )


class MixEntry(Strict):
    """A share of replayed traffic: which tenant, class and client region it belongs to."""

    tenant: str
    workload_class: str = Field(alias="class")
    region: str | None = None
    fraction: float = Field(gt=0)
    model: str | None = None

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class RetryPolicy(Strict):
    """Client-retry recognition and the gateway's own re-placement budget (Finagle-style)."""

    window_s: float = Field(
        60.0, gt=0,
        description="a request is a client retry when the same Idempotency-Key (else the same "
        "body from the same key) failed within this window: refused (rate limit, budget, "
        "queue), an error answer, a timeout or its client gone; a shed retry does not restart "
        "it; a twin in flight or after a success is not one",
    )
    budget_ratio: float = Field(0.1, ge=0, le=1, description="re-placements per recent request")
    budget_min_per_s: float = Field(1.0, ge=0, description="re-placements always allowed")
    budget_window_s: float = Field(10.0, gt=0)
    degraded_error_rate: float = Field(
        0.5, gt=0, le=1, description="degraded when every candidate's error rate is at least this"
    )
    shed_retry_after_s: float = Field(1.0, gt=0, description="base of the jittered Retry-After")


class QueueSpec(Strict):
    """Priority queues used while the allowed endpoints are saturated."""

    enabled: bool = True
    default_deadline_ms: float = Field(10000.0, gt=0)
    max_waiting: int = Field(1024, gt=0, description="beyond this, shed the lowest band")
    tick_s: float = Field(0.05, gt=0, description="re-check period while requests wait")
    fair_share: bool = Field(
        True,
        description="cap tenants at their fair share of a pool's slots (capacity / active "
        "tenants) while others wait; tenants below their share go first inside a band",
    )
    reserve_fraction: float = Field(
        0.25,
        ge=0,
        lt=1,
        description="while several tenants are active, this fraction of a pool's slots "
        "(rounded up) is kept for tenants below their fair share",
    )
    active_window_s: float = Field(
        2.0,
        gt=0,
        description="a tenant counts as active on a pool for this long after its last request",
    )
    shed_above_utilisation: float | None = Field(
        None,
        gt=0,
        le=1,
        description="headroom for the critical and standard bands: while a pool's in-flight "
        "requests (with the one asking) would pass this fraction of its slots (Σ "
        "max_concurrency), sheddable requests are refused with 429 load_shed and batch requests "
        "wait; with the dispatch gate (max_prefill_queue_s) the pool's last ceil((1 - this) x "
        "S) starts are kept for those bands too, S being the most requests the pool can start "
        "at once (an endpoint with a physics model counts 1, any other its max_concurrency; at "
        "most S - 1 kept): sheddable and batch requests wait for a start beyond them, so a "
        "sheddable request still waiting at its queue deadline gets 503 (queue timeout) "
        "instead of 429, and a higher band's request arriving at a full queue sheds the newest "
        "of them (429); unset: off",
    )
    keep_unused_shares: bool = Field(
        False,
        description="strict fair shares: keep free the slots other active tenants hold below "
        "their fair share (at least the reserve), so a flooding tenant never takes them while "
        "those tenants are active; off: only the reserve is kept (more work-conserving)",
    )
    max_prefill_queue_s: float | None = Field(
        None,
        ge=0,
        description="dispatch gate: an endpoint takes a new request only while the prefill the "
        "gateway has sent it and not yet seen a first token for would take its engine at most "
        "this long (pending uncached prompt tokens x the roofline's prefill time per token; 0: "
        "one prefill at a time); the excess waits in this fair queue instead of the engine's "
        "FIFO, so another tenant's request is never queued behind a flood inside an engine. "
        "Placement skips gated endpoints, except for a request whose cached prefix on one "
        "makes waiting there shorter than prefilling elsewhere: after the filters, a gated "
        "endpoint holding h of the prompt's P tokens stays a candidate when its wait is "
        "below h x its prefill time per token and the wait plus (P - h) x that time is below "
        "the best open candidate's (P - h_open) x its own. The wait is the time until the "
        "latest first token predicted for the requests pending there (so a prefill that has "
        "run for a while counts only what is left of it), else (or once that prediction has "
        "passed with requests still pending) their pending uncached tokens x its prefill time "
        "per token (on equal hardware then: h - h_open > pending; an endpoint without a "
        "physics model is judged in tokens); unset: off",
    )


class AdmissionSpec(Strict):
    """The admission stage: shared state, leases and policies that are not per tenant."""

    enabled: bool = True
    store: Literal["local", "memory", "redis"] = Field(
        "local",
        description="where budgets, usage, rate limits and retry markers live: 'local' (budgets "
        "and usage in a SQLite file that survives restarts and kill -9 — `admission.path`, "
        "default beside `gateway.ledger_path`; with neither set, in memory and lost on "
        "restart), 'memory' (one process, lost on restart) or 'redis' (shared by replicas and "
        "workers)",
    )
    path: str | None = Field(
        None,
        description="SQLite file of the local store (relative to the current directory); "
        "default: '<gateway.ledger_path>.admission.sqlite' when a ledger file is set, else in "
        "memory (lost on restart)",
    )
    redis_url: str = Field(
        "redis://127.0.0.1:6379/0",
        pattern=r"^(rediss?|unix)://\S+$",
        description="redis://, rediss:// or unix:// URL of the shared store (a port, when "
        "given, from 1 to 65535)",
    )
    redis_prefix: str = "inferplane:"

    @field_validator("redis_url")
    @classmethod
    def _redis_port(cls, v: str) -> str:
        return v if v.startswith("unix://") else url_port_in_range(v)
    journal_path: str | None = Field(
        None,
        description="store: redis — SQLite file of the outage journal (settles and usage "
        "updates waiting for Redis, replayed after a restart; relative to the current "
        "directory); default: "
        "'<gateway.ledger_path>.admission-journal.sqlite' when a ledger file is set, else in "
        "memory (lost on restart)",
    )
    shared_slots: bool = Field(
        True,
        description="with store: redis, every process takes a per-endpoint in-flight slot in "
        "Redis before sending, so max_concurrency holds across replicas and workers",
    )
    slot_lease_s: float = Field(
        10.0,
        gt=0,
        description="lease of a shared in-flight slot, renewed every third of it: a replica "
        "killed with -9 stops holding capacity within this",
    )
    slot_sync_s: float = Field(
        0.05, gt=0, description="period of reading the other replicas' in-flight counts"
    )
    shared_placement: bool = Field(
        True,
        description="with store: redis, replicas share their placement state: session affinity "
        "(a key per session with session_ttl_s, read when a replica does not know the session) "
        "and every pick, published so that each replica's learned prefix index and sessions "
        "learn the others' (docs/shared-state.md); off: each process places from its own picks",
    )
    session_ttl_s: float = Field(
        1800.0, gt=0, description="shared session affinity: a session's endpoint is kept this "
        "long after its last request"
    )
    start_without_redis: bool = Field(
        True,
        description="store: redis — a Redis that refuses connections, times out, is still "
        "loading, has no route to it or a temporary DNS failure at start-up is an outage: "
        "the gateway starts degraded as a running one does "
        "(an ERROR, budgets 503 with Retry-After until Redis answers). A bad URL, an unknown "
        "host, refused credentials or ACL permissions (WRONGPASS, NOPERM) and a TLS mismatch "
        "(a server that closes or resets the connection) stay start-up errors (exit status "
        "2); false: Redis must "
        "answer at start-up (unless the outage journal holds entries)",
    )
    settle_id_ttl_s: float = Field(
        3600.0,
        gt=0,
        description="store: redis — how long Redis remembers each settle's id (two keys per "
        "request, about 234 B), so that a settle replayed from the outage journal counts once; "
        "a journal replayed later than this after the settle reached Redis could count it "
        "twice (docs/shared-state.md, sizing)",
    )
    usage_max_workflows: int | None = Field(
        1000,
        ge=0,
        description="distinct x-inferplane-workflow values kept in a tenant's usage per UTC "
        "day, in every store (redis, local, memory); the usage of further workflows that day is "
        "counted under the workflow '(other)' (client-chosen ids must not grow the store "
        "without bound); null: no cap",
    )
    redis_timeout_s: float = Field(
        0.5, gt=0, description="a Redis call slower than this counts as Redis being "
        "unreachable; the gateway's own event-loop lag does not count, up to "
        "gateway.lag_max_stretch × this in wall time"
    )
    outage_retry_after_s: float = Field(
        2.0,
        gt=0,
        description="while Redis is unreachable, or the local store's file cannot be written: "
        "Retry-After of the 503s (budgets cannot be checked) and how long before the store is "
        "tried again (Redis: the local fallback is used meanwhile; the local file: pending "
        "settles and usage are retried)",
    )
    lease_margin_s: float = Field(
        30.0,
        ge=0,
        description="lease TTL = upstream_timeout_s × (1 + gateway.max_replacements) + the "
        "longest queue deadline + this",
    )
    hourly_prefill_s_per_token: float = Field(
        0.0005, ge=0, description="hourly substrates: estimated prefill seconds per token"
    )
    hourly_decode_s_per_token: float = Field(
        0.05, ge=0, description="hourly substrates: estimated decode seconds per output token"
    )
    retry: RetryPolicy = RetryPolicy()
    queue: QueueSpec = QueueSpec()


class LedgerSpec(Strict):
    """Where decision records go and how they are made tamper-evident (docs/evidence.md).

    SQLite (``gateway.ledger_path``) is the embedded default; a PostgreSQL DSN sends records to a
    database that replicas share."""

    postgres_dsn: str | None = Field(
        None, description="PostgreSQL conninfo or URL: records go there instead of "
        "gateway.ledger_path (shared by replicas, queryable)"
    )
    postgres_dsn_env: str | None = Field(
        None, description="environment variable holding the DSN (keeps a password out of the file)"
    )
    postgres_schema: str = Field(
        "public", pattern=r"^[a-z_][a-z0-9_]*$", description="PostgreSQL schema of the tables"
    )
    table_prefix: str = Field(
        "inferplane_", pattern=r"^[a-z_][a-z0-9_]*$", description="PostgreSQL table name prefix"
    )
    shard: str = Field(
        "main", pattern=NAME_PATTERN, description="this writer's hash chain; writers sharing a "
        "shard chain one after another, writers with distinct shards in parallel"
    )
    shard_env: str | None = Field(
        None, description="environment variable naming this writer's shard instead of `shard` "
        "(each pod its own chain from one ConfigMap, e.g. POD_NAME from the Downward API); "
        "unset or empty is a start-up error"
    )
    signing_key_file: str | None = Field(
        None, description="Ed25519 private key (PKCS#8 PEM, or the 32-byte seed in hex/base64) "
        "that signs checkpoints (relative to the current directory); `inferplane ledger-keygen` "
        "makes one"
    )
    signing_key_env: str | None = Field(
        None, description="environment variable holding that key instead of a file"
    )
    checkpoint_every: int = Field(1000, gt=0, description="sign the chain head every N records")
    checkpoint_interval_s: float = Field(
        60.0, gt=0, description="and at least this often while records arrive"
    )
    durable: bool = Field(
        True, description="answer only once the request's record is committed (group commit), "
        "so a killed gateway never loses the record of an answered request; false writes "
        "records in the background every 0.2 s (a killed process loses its last ones)"
    )
    commit_timeout_s: float = Field(
        2.0, gt=0, description="longest an answer waits for its record's commit (then it is "
        "sent anyway and the wait counted in inferplane_ledger_commit_timeouts_total); while "
        "the store is known down (its last write failed, or a write has run longer than this) "
        "answers do not wait at all (counted the same)"
    )
    batch_size: int = Field(256, gt=0, description="most records one transaction commits")
    spool_path: str | None = Field(
        None, description="PostgreSQL ledger: a local SQLite file that holds records while the "
        "database is down (answers wait for it instead of the database) and is replayed in "
        "order when it answers again, at this start or the next; on a volume that outlives "
        "the process. Unset: records pending in an outage live in memory and a restart loses "
        "them (their receipts then read as deleted records). A SQLite or in-memory ledger "
        "ignores it (inferplane check notes that)"
    )

    @model_validator(mode="after")
    def _one_source(self) -> LedgerSpec:
        if self.postgres_dsn and self.postgres_dsn_env:
            raise ValueError("set postgres_dsn or postgres_dsn_env, not both")
        if self.signing_key_file and self.signing_key_env:
            raise ValueError("set signing_key_file or signing_key_env, not both")
        return self


class BatchSpec(Strict):
    """The batch lane (OpenAI Batch API): uploaded JSONL files run on spare capacity only."""

    enabled: bool = Field(True, description="serve /v1/files and /v1/batches and run batches")
    path: str | None = Field(
        None,
        description="SQLite file for files, batches and line progress (relative to the "
        "current directory); default: '<gateway.ledger_path>.batches.sqlite' when a ledger file "
        "is set, else in memory (lost on restart; `serve --workers` > 1 refuses that)",
    )
    workload_class: str = Field(
        "batch", description="class of every batch line (its placement profile and priority)"
    )
    max_utilisation: float = Field(
        0.6,
        gt=0,
        le=1,
        description="dispatch a line only while the pool's gateway in-flight / max_concurrency, "
        "counting the line, stays at or below this (or the pool is idle)",
    )
    max_concurrency: int = Field(
        8, gt=0, description="batch lines in flight at once, all batches, in each gateway process"
    )
    max_file_bytes: int = Field(
        100 * 1024 * 1024, gt=0, description="larger uploads get 413"
    )
    max_lines: int = Field(50000, gt=0, description="requests per input file")
    poll_interval_s: float = Field(
        0.05, gt=0, description="re-check period while lines wait for spare capacity"
    )
    idle_poll_interval_s: float = Field(
        1.0,
        gt=0,
        description="re-check period while no batch is active and no line runs here: a batch "
        "created through this process wakes the worker at once, one created through another "
        "replica or worker is picked up within this (an idle worker does not poll the store "
        "every poll_interval_s)",
    )
    retry_after_s: float = Field(
        1.0, gt=0, description="wait before retrying a line refused for capacity (429/503)"
    )
    lease_s: float = Field(
        30.0,
        gt=0,
        description="a claimed line's lease, renewed every lease_s/3 while it runs: a process "
        "killed mid-batch loses its lines to the others after this (docs/shared-state.md)",
    )
    postgres_dsn: str | None = Field(
        None,
        description="PostgreSQL conninfo or URL: files, batches and line claims go there "
        "(shared by replicas) instead of the SQLite file",
    )
    postgres_dsn_env: str | None = Field(
        None, description="environment variable holding the PostgreSQL DSN (instead of "
        "postgres_dsn)"
    )
    postgres_schema: str = Field("public", description="schema of the batch tables")
    table_prefix: str = Field("inferplane_batch_", description="prefix of the batch tables")

    @model_validator(mode="after")
    def _one_dsn(self) -> BatchSpec:
        if self.postgres_dsn and self.postgres_dsn_env:
            raise ValueError("set postgres_dsn or postgres_dsn_env, not both")
        return self


class OutlierSpec(Strict):
    """Outlier ejection (Envoy-style): an endpoint that errs or is slow against its peers (same
    hardware, tensor-parallel degree and served models), or (opt-in, ``stale_eject_s``) whose
    metrics went stale while its /health still answers and its alternatives' did not, is
    ejected for ``base_ejection_s`` × its ejection count."""

    enabled: bool = Field(True, description="run the outlier detector in the gateway")
    interval_s: float = Field(1.0, gt=0, description="period of the ejection sweep")
    min_requests: int = Field(
        10, gt=0, description="outcomes (or TTFT samples) an endpoint needs before it is judged"
    )
    error_window_s: float = Field(
        120.0,
        gt=0,
        description="the error-rate ejection judges an endpoint's attempts of this long ago at "
        "most (its last 100): old failures do not eject an endpoint that has recovered",
    )
    error_half_life_s: float = Field(
        10.0,
        gt=0,
        description="half-life of the error rate placement reads (predicted-latency's "
        "expected-attempts term): failures weigh 0.5^(age / this), so an endpoint steered away "
        "by its errors is tried again once they have aged",
    )
    min_error_rate: float = Field(
        0.5, gt=0, le=1, description="an error rate below this is never an outlier"
    )
    error_rate_margin: float = Field(
        0.2, ge=0, le=1, description="eject when error rate >= max(min_error_rate, peers' "
        "median + this)"
    )
    ttft_factor: float | None = Field(
        None,
        gt=1,
        description="eject when TTFT (÷ its prediction) p50 >= this × the peers' median; unset: "
        "slowness never ejects, the latency predictor already sends less to a slow endpoint "
        "(3 is a common choice)",
    )
    min_ttft_s: float = Field(
        0.05, ge=0, description="a TTFT p50 below this is never an outlier (noise floor)"
    )
    consecutive_5xx: int | None = Field(
        5,
        gt=0,
        description="eject at once after this many consecutive failures (5xx, connection "
        "errors, timeouts, broken streams) without waiting for the sweep, like Envoy's "
        "consecutive_5xx; one failure suffices while the endpoint is on probation after an "
        "ejection (half-open); null: off",
    )
    consecutive_timeouts: int | None = Field(
        2,
        gt=0,
        description="eject at once after this many consecutive first-byte timeouts (a hung "
        "engine); null: off",
    )
    stale_eject_s: float | None = Field(
        None,
        gt=0,
        description="eject a healthy endpoint whose last good scrape is this old, and only "
        "while another endpoint of one of its models has fresher metrics; null (the default): "
        "stale metrics never eject, placement stops trusting them and falls back to the "
        "gateway's own in-flight counts and outcomes",
    )
    max_ejection_percent: float = Field(
        50.0, ge=0, le=100, description="at most floor(group size × this / 100) endpoints of a "
        "peer group are ejected at once"
    )
    base_ejection_s: float = Field(
        30.0, gt=0, description="ejection lasts this × the endpoint's ejection count"
    )
    max_ejection_s: float = Field(300.0, gt=0, description="longest single ejection")
    passive_failures: int = Field(
        2,
        gt=0,
        description="endpoints with passive health (no probe): consecutive failures before the "
        "first byte (connect, timeout, 5xx) that eject one for base_ejection_s × its count",
    )
    decay_s: float = Field(
        60.0, gt=0, description="an endpoint back in service and past probation loses one "
        "ejection from its count every this many seconds"
    )


class PoolHealthSpec(Strict):
    """Per-pool concurrency health: queue-depth trend, KV pressure, P99/P50 TTFT divergence and
    in-flight ÷ concurrency envelope, each with a `pressure` and a `past-envelope` threshold."""

    window_s: float = Field(20.0, gt=0, description="scrape history the trend and KV read")
    min_ttft_samples: int = Field(
        20, gt=0, description="TTFT samples a pool needs before its P99/P50 divergence counts"
    )
    trend_pressure: float = Field(
        0.1, gt=0, description="waiting-queue growth (requests/s, pool sum) that is pressure"
    )
    trend_past: float = Field(
        0.5, gt=0, description="waiting-queue growth (requests/s) that is past the envelope"
    )
    kv_pressure: float = Field(0.8, gt=0, le=1, description="mean KV usage that is pressure")
    kv_past: float = Field(0.95, gt=0, le=1, description="max KV usage past the envelope")
    divergence_pressure: float = Field(
        3.0, gt=1, description="TTFT p99 / p50 across the pool that is pressure"
    )
    divergence_past: float = Field(
        6.0, gt=1, description="TTFT p99 / p50 across the pool that is past the envelope"
    )
    inflight_pressure: float = Field(
        0.8, gt=0, description="in-flight ÷ concurrency envelope that is pressure"
    )
    inflight_past: float = Field(
        1.0, gt=0, description="in-flight ÷ concurrency envelope that is past the envelope"
    )

    @model_validator(mode="after")
    def _ordered(self) -> PoolHealthSpec:
        for name in ("trend", "kv", "divergence", "inflight"):
            if getattr(self, f"{name}_pressure") > getattr(self, f"{name}_past"):
                raise ValueError(f"{name}_pressure must not exceed {name}_past")
        return self


class HealthSpec(Strict):
    """Health beyond up/down: outlier ejection and per-pool concurrency health."""

    outlier: OutlierSpec = Field(OutlierSpec(), description="Envoy-style outlier ejection")
    pools: PoolHealthSpec = Field(
        PoolHealthSpec(), description="per-substrate concurrency health thresholds"
    )


class EconomicsSpec(Strict):
    """Placement economics: utilisation bands, break-even sizing and reassessment triggers
    (`inferplane economics`, the gateway's `inferplane_economics_*` gauges; docs/economics.md)."""

    band_low: float = Field(
        0.40, ge=0, le=1,
        description="a pool busy below this share of its concurrency envelope is under-used",
    )
    band_high: float = Field(
        0.70, gt=0, le=1, description="above this share a pool has no headroom left"
    )
    target_utilisation: float = Field(
        0.60, gt=0, le=1, description="utilisation that owned capacity is sized for in the "
        "repatriation break-even",
    )
    out_of_band_days: int = Field(
        7, ge=1, description="consecutive days outside the band that trigger a reassessment"
    )
    divergence_days: int = Field(
        7, ge=2, description="days over which the P99/P50 TTFT divergence trend is fitted"
    )
    window_days: float = Field(
        30.0, gt=0, description="history the gateway's economics gauges read from the ledger"
    )
    refresh_s: float = Field(
        0.0, ge=0, description="how often the gateway recomputes its `inferplane_economics_*` "
        "gauges from the ledger (0: never, the default: each refresh parses the whole window in "
        "the gateway process; `inferplane economics --prometheus` serves a textfile collector "
        "instead). Needs a ledger file or PostgreSQL",
    )

    @model_validator(mode="after")
    def _ordered(self) -> EconomicsSpec:
        if self.band_low >= self.band_high:
            raise ValueError("band_low must be below band_high")
        return self


class EppSpec(Strict):
    """The endpoint picker over Envoy's external processing API (`inferplane epp`) and the
    Envoy bootstrap written for it (`inferplane envoy-config`)."""

    host: str = Field("127.0.0.1", description="address the picker's gRPC server binds")
    port: int = Field(9002, ge=0, le=65535, description="the picker's gRPC port")
    metrics_port: int | None = Field(
        None, ge=0, le=65535,
        description="serve the picker's Prometheus page (GET /metrics, no key: a listener for "
        "the scraper, like gateway.metrics.port) on this port of `metrics_host`; unset: no "
        "listener; not `port` on an overlapping host; 0: a free port (the CLI prints it). 9090 "
        "is the Gateway API Inference Extension's EPP metrics port, and deploy/k8s's",
    )
    metrics_host: str = Field(
        "127.0.0.1", description="address the `metrics_port` listener binds"
    )
    envoy_host: str = Field("127.0.0.1", description="address Envoy's listener binds")
    envoy_port: int = Field(8081, ge=0, le=65535, description="Envoy's client-facing port")
    envoy_admin_port: int = Field(9901, ge=0, le=65535, description="Envoy's admin port")
    fail_open: bool = Field(
        False,
        description="when the picker is unreachable or fails, Envoy forwards the request to an "
        "engine of its own choosing (round robin over the plain engine endpoints) instead of "
        "answering 503",
    )
    message_timeout_s: float = Field(
        30.0,
        gt=0,
        description="how long Envoy waits for the picker's answer to one message; it covers "
        "admission queueing, so keep it above the classes' queue deadlines",
    )
    request_usage: bool = Field(
        True,
        description="ask engines for stream usage (stream_options.include_usage) so streamed "
        "requests are accounted with actual tokens; the client then receives the usage chunk",
    )
    observe_responses: bool = Field(
        True,
        description="a second ext_proc filter in observability mode streams the response to "
        "the picker (TTFT, ITL, usage) without holding the data path",
    )

    @model_validator(mode="after")
    def _metrics_port_apart(self) -> EppSpec:
        wildcard = {"0.0.0.0", "::", ""}
        overlap = (self.metrics_host == self.host
                   or self.metrics_host in wildcard or self.host in wildcard)
        if self.metrics_port and self.metrics_port == self.port and overlap:
            raise ValueError(f"metrics_port {self.metrics_port} is the picker's gRPC port "
                             f"(epp.port) on an overlapping host: give the /metrics listener "
                             f"its own port")
        return self


class ModelTier(Strict):
    """One model serving an alias: a served model name, its quality, the prompts it takes."""

    model: str = Field(description="a model the fleet serves")
    quality: float = Field(ge=0, description="higher is better (e.g. 1 for an 8B, 2 for a 70B)")
    max_prompt_tokens: int | None = Field(
        None, gt=0, description="this tier takes prompts up to this size only"
    )


class TierRule(Strict):
    """The tier policy for some classes and tenants (the first matching rule applies)."""

    classes: list[str] | None = Field(None, description="workload classes; none means any")
    tenants: list[str] | None = Field(None, description="tenants; none means any")
    min_quality: float | None = Field(
        None, ge=0, description="the quality floor: only tiers at least this good"
    )
    max_ttft_slo_ms: float | None = Field(
        None,
        gt=0,
        description="applies only to requests whose TTFT SLO is at most this (tight-SLO traffic "
        "such as agent steps)",
    )
    prefer: Literal["cheapest", "best"] = Field(
        "cheapest",
        description="among the tiers that qualify: the first listed (tiers are listed cheapest "
        "first), or the highest quality",
    )


class ModelAlias(Strict):
    """A model name clients use, served by several models or variants (tiers): per request the
    gateway picks the tier by the first matching rule (quality floor, prompt length, SLO, cost
    order) and says which model answered (``x-inferplane-model`` and the answer's ``model``)."""

    name: str = Field(pattern=NAME_PATTERN, description="the model name clients send")
    tiers: list[ModelTier] = Field(min_length=1, description="cheapest first")
    rules: list[TierRule] = Field(
        default_factory=list, description="per class/tenant policy; none: the cheapest that fits"
    )


class TelemetrySpec(Strict):
    """OpenTelemetry: a trace per request (admit, place, upstream spans with the GenAI semantic
    convention attributes) and GenAI metrics, exported over OTLP. Off by default; when off the
    SDK is not even imported."""

    enabled: bool = Field(False, description="export traces and metrics over OTLP")
    service_name: str = Field("inferplane", min_length=1, description="the `service.name` resource")
    endpoint: str = Field(
        "http://127.0.0.1:4318",
        description="the collector: for http/protobuf its base URL (`/v1/traces` and "
        "`/v1/metrics` are appended), for grpc its host:port URL",
    )

    @field_validator("endpoint")
    @classmethod
    def _endpoint_port(cls, v: str) -> str:
        return url_port_in_range(v)

    protocol: Literal["http/protobuf", "grpc"] = Field(
        "http/protobuf",
        description="OTLP transport: `http/protobuf` (endpoint: the base URL, port 4318) or "
        "`grpc` (endpoint: `http://host:port`, 4317; `https://` for TLS)",
    )
    headers_env: str | None = Field(
        "OTEL_EXPORTER_OTLP_HEADERS",
        description="environment variable holding the exporter's headers as `k=v,k2=v2` "
        "(URL-encoded values; an API key for a hosted collector); never written in the file",
    )
    timeout_s: float = Field(10.0, gt=0, description="one export's timeout")
    sample_ratio: float = Field(
        1.0,
        ge=0,
        le=1,
        description="share of new traces sampled; a request that arrives with a sampled "
        "`traceparent` follows its caller's decision",
    )
    export_interval_s: float = Field(
        15.0, gt=0, description="how often metrics are exported (and spans batched at most)"
    )
    exporter: Literal["process", "thread"] = Field(
        "process",
        description="where sampled requests' spans are built, encoded to OTLP and sent, and "
        "the GenAI metrics (aggregated by the gateway) encoded and sent: a child process of the "
        "gateway (`python -m inferplane.telemetry.exporter`, off the gateway's CPU) or a thread "
        "of the gateway",
    )
    traces: bool = Field(True, description="export spans")
    metrics: bool = Field(True, description="export the GenAI metrics")
    tenant_attribute: bool = Field(
        False, description="add `inferplane.tenant` to spans (tenant names reach the collector)"
    )
    resource_attributes: dict[str, str] = Field(
        default_factory=dict,
        description="extra resource attributes (`deployment.environment.name`, …)",
    )


class FleetConfig(Strict):
    """The whole file."""

    gateway: GatewaySpec = GatewaySpec()
    hardware_profiles: list[str] = Field(
        default_factory=list,
        description="calibrated hardware profile files (`inferplane calibrate`; relative to the "
        "fleet file); substrates name a profile by its `hardware.name`",
    )
    regions: list[RegionSpec] = Field(default_factory=list)
    data_sources: list[DataSourceSpec] = Field(
        default_factory=list,
        description="data stores requests use (by header or class): co-location preference, or "
        "a hard residency filter",
    )
    substrates: list[SubstrateSpec] = Field(min_length=1)
    tenants: list[TenantSpec] = Field(default_factory=list)
    classes: list[WorkloadClass] = Field(default_factory=list)
    class_rules: list[ClassRule] = Field(default_factory=list)
    plugins: list[PluginSpec] = Field(default_factory=list)
    profiles: list[ProfileSpec] = Field(default_factory=list)
    mix: list[MixEntry] = Field(default_factory=list)
    model_aliases: list[ModelAlias] = Field(
        default_factory=list, description="tiered model routing: one name, several models"
    )
    admission: AdmissionSpec = AdmissionSpec()
    batch: BatchSpec = Field(
        BatchSpec(), description="the batch lane: /v1/files, /v1/batches and their worker"
    )
    health: HealthSpec = Field(
        HealthSpec(), description="outlier ejection and per-pool concurrency health"
    )
    ledger: LedgerSpec = Field(
        LedgerSpec(), description="decision records: backend, hash chain, signed checkpoints"
    )
    epp: EppSpec = Field(
        EppSpec(), description="the Envoy endpoint picker (`inferplane epp`, `envoy-config`)"
    )
    economics: EconomicsSpec = Field(
        EconomicsSpec(), description="utilisation bands, break-even and reassessment triggers"
    )
    telemetry: TelemetrySpec = Field(
        TelemetrySpec(), description="OpenTelemetry traces and GenAI metrics over OTLP"
    )
